"""The word-level caption tokenizer and the random T5 saved with it."""

from __future__ import annotations

import json

import pytest
import torch

from imagen.config import ConditioningConfig, ConfigError
from imagen.embedded.dataset import EmbeddedDataset
from imagen.text import BUILT_MARKER, build_default_encoder, load_text_encoder
from imagen.text.vocab import EOS, UNK, word_tokenizer


def _cond(path, **kw) -> ConditioningConfig:
    enc = dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, tokenizer="word") | kw
    return ConditioningConfig(
        embed_dim=enc["d_model"], token_length=24, encoder_path=str(path), encoder=enc
    )


def test_every_caption_word_has_its_own_token() -> None:
    tok = word_tokenizer()
    captions = [
        EmbeddedDataset(300, split=s).caption(i) for s in ("train", "holdout") for i in range(300)
    ]
    ids = tok(captions)["input_ids"]
    unk, eos = tok.convert_tokens_to_ids(UNK), tok.convert_tokens_to_ids(EOS)
    assert all(unk not in x for x in ids)
    assert all(x[-1] == eos for x in ids)
    assert max(map(len, ids)) <= 24  # a byte tokenizer needs up to ~113 tokens
    # synonyms stay distinct words; case does not matter
    red, violet = tok("red")["input_ids"][0], tok("Violet")["input_ids"][0]
    assert red != violet and tok("violet")["input_ids"][0] == violet
    assert tok("a zebra")["input_ids"][1] == unk


def test_built_folder_loads_with_the_project_loader(tmp_path) -> None:
    path = tmp_path / "encoder-word"
    cond = _cond(path)
    build_default_encoder(cond, path)
    assert json.loads((path / BUILT_MARKER).read_text())["tokenizer"] == "word"
    enc = load_text_encoder(cond)
    embeds, mask = enc.encode(
        [
            "a small red circle on the left, dark background",
            "a small green circle on the left, dark background",
        ]
    )
    assert embeds.shape == (2, 24, 32)
    assert mask.sum(1).tolist() == [11, 11]  # 10 tokens (the comma is one) + </s>
    assert not torch.allclose(embeds[0], embeds[1])
    assert (embeds[~mask] == 0).all()
    # deterministic: a second build gives the very same weights
    again = tmp_path / "again"
    build_default_encoder(_cond(again), again)
    e2, _ = load_text_encoder(_cond(again)).encode(["a small red circle on the left"])
    e1, _ = enc.encode(["a small red circle on the left"])
    assert torch.equal(e1, e2)


def test_bad_encoder_shape_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        build_default_encoder(_cond(tmp_path / "x", num_heads=3), tmp_path / "x")


def test_default_folder_built_with_another_tokenizer_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    load_text_encoder(_cond("data/encoder", tokenizer="byt5"))  # builds the default folder
    with pytest.raises(ConfigError, match=r"model\.conditioning\.encoder\.tokenizer: .*'byt5'"):
        load_text_encoder(_cond("data/encoder"))  # now asks for the word tokenizer
