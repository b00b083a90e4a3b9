"""A word-level tokenizer for the embedded captions, saved beside a small random T5 encoder.

The embedded default encoder (:mod:`imagen.text`) reads captions byte by byte: a randomly
initialised T5 then has to compose bytes into words before the UNet can tell ``red`` from
``green``, and a 113-byte caption overflows a 64-token budget. The embedded grammar has a closed
vocabulary of about a hundred words, so a word-level tokenizer gives every word its own token
(its own random T5 embedding) and a caption fits in ~20 tokens. Select it with
``model.conditioning.encoder.tokenizer: word``: :func:`imagen.text.build_default_encoder` then
saves this tokenizer beside the T5, and the folder loads like any other (``AutoTokenizer`` finds
a ``PreTrainedTokenizerFast`` in ``tokenizer.json``).
"""

from __future__ import annotations

import re

from imagen.embedded import dataset as embedded

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_TOKEN = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on


def caption_vocabulary() -> list[str]:
    """Every lower-case word and punctuation token the embedded caption grammar can produce."""
    phrases: list[str] = [re.sub(r"\{\w+\}", " ", t) for t in embedded._TEMPLATES]
    for table in (
        embedded._SIZE_WORDS,
        embedded._SHAPE_WORDS,
        embedded._COLOR_WORDS,
        embedded._POSITION_WORDS,
        embedded._BACKGROUND_WORDS,
        embedded._TEXTURE_WORDS,
    ):
        for words in table.values():
            phrases.extend(words)
    return sorted({tok for p in phrases for tok in _TOKEN.findall(p.lower())})


def word_tokenizer(vocabulary: list[str] | None = None):
    """A ``PreTrainedTokenizerFast``: lower-case, split on words/punctuation, append ``</s>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = vocabulary if vocabulary is not None else caption_vocabulary()
    vocab = {PAD: 0, EOS: 1, UNK: 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512
    )
