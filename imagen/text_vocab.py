"""A word-level tokenizer for the embedded captions, saved beside a small random T5 encoder.

The embedded default encoder (:mod:`imagen.text`) reads captions byte by byte: a randomly
initialised T5 then has to compose bytes into words before the UNet can tell ``red`` from
``green``, and a 113-byte caption overflows a 64-token budget. The embedded grammar has a closed
vocabulary of about a hundred words, so a word-level tokenizer gives every word its own token
(its own random T5 embedding) and a caption fits in ~20 tokens. :func:`build_word_encoder` writes
a folder that :func:`imagen.text.load_text_encoder` loads unchanged (``T5EncoderModel`` +
``AutoTokenizer``, which finds a ``PreTrainedTokenizerFast`` in ``tokenizer.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from imagen.config import ConditioningConfig, ConfigError
from imagen.data import embedded

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MARKER = "imagen_encoder.json"
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


def build_word_encoder(cond: ConditioningConfig, path: str | os.PathLike[str]) -> Path:
    """Build a random T5 encoder of ``cond.encoder`` with the word tokenizer and save both.

    Same construction as :func:`imagen.text.build_default_encoder` (fixed seed, T5 v1.1
    gated-GELU, never trained) but with ``vocab_size`` = the word vocabulary. Written to a
    temporary sibling and renamed, so a reader never sees half a folder.
    """
    from transformers import T5Config, T5EncoderModel

    enc = cond.encoder
    if enc.d_model != cond.embed_dim:
        raise ConfigError(
            f"model.conditioning.embed_dim: is {cond.embed_dim} but encoder.d_model is "
            f"{enc.d_model}; they must be equal"
        )
    if enc.d_model % enc.num_heads:
        raise ConfigError(
            f"model.conditioning.encoder.num_heads: {enc.num_heads} does not divide "
            f"d_model {enc.d_model}"
        )
    tokenizer = word_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=enc.d_model,
        d_kv=enc.d_model // enc.num_heads,
        d_ff=enc.d_ff,
        num_layers=enc.num_layers,
        num_heads=enc.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(enc.seed)
        model = T5EncoderModel(config).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"built_from": enc.model_dump(), "tokenizer": "word"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m imagen.text_vocab PATH [--params params.yaml]``: build a word encoder folder
    from ``model.conditioning.encoder`` of params.yaml (point encoder_path at it)."""
    import argparse

    from imagen.config import load_params

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("path", help="folder to write (must not exist)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    if Path(args.path).exists():
        raise SystemExit(f"{args.path}: already exists; remove it first")
    cond = load_params(args.params).conditioning
    print(build_word_encoder(cond, args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
