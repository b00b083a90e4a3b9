"""The T5 text encoder and `imagen precache`: a real tiny T5 built from the config, unpadded
fp16 embeddings in the shards, finished shards skipped on re-run, clear errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from tiny import TINY_TEXT

from imagen.config import ConfigError, Params, deep_merge, resolve_params
from imagen.data.ingest import ingest
from imagen.data.precache import precache
from imagen.text import from_storage, load_text_encoder, to_storage

REPO = Path(__file__).resolve().parents[1]


def make_params(tmp_path: Path, data: dict[str, Any] | None = None, **cond: Any) -> Params:
    """params.yaml with a tiny T5 and a tiny embedded data set under tmp_path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    over = {
        "data": {
            "num_train": 6,
            "num_holdout": 2,
            "image_size": 64,
            "samples_per_shard": 4,
            "shards_dir": str(tmp_path / "shards"),
            "encoded_dir": str(tmp_path / "encoded"),
        }
        | (data or {}),
        "model": {"conditioning": deep_merge(TINY_TEXT, cond)},
    }
    return resolve_params(deep_merge(raw, over))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory (the default encoder folder data/encoder is relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_encoder_is_built_saved_and_reloaded(project: Path) -> None:
    params = make_params(project, encoder={"tokenizer": "byt5"})  # any caption, byte by byte
    enc = load_text_encoder(params.conditioning)
    assert (project / "data" / "encoder" / "config.json").exists()
    caps = ["a red circle", "a blue square at the top left on a dark background", "x" * 100]
    emb, mask = enc.encode(caps)
    assert emb.shape == (3, 16, 32) and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert mask[2].all() and mask.sum(1)[0] == len("a red circle") + 1  # bytes + </s>
    assert (emb[~mask] == 0).all()
    # distinct captions give distinct, unit-RMS (final RMS norm) token features
    assert not torch.allclose(emb[0, :3], emb[1, :3])
    rms = emb[mask].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=0.05)
    # loading again (from the folder) gives the same features
    emb2, _ = load_text_encoder(params.conditioning).encode(caps)
    assert torch.equal(emb, emb2)


def test_precache_writes_unpadded_embeddings_and_skips_finished_shards(project: Path) -> None:
    params = make_params(project)
    ingest(params.data, progress=False)
    m = precache(params, batch_size=4, progress=False)
    out = project / "encoded"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        p.name for p in (project / "shards").glob("*.tar")
    )
    record = json.loads((out / "encoder.json").read_text())
    assert record["path"] == "data/encoder" and len(record["sha256"]) == 64
    assert m["samples"] == 8 and 0 < m["bytes_per_sample"] < 16 * 32 * 2 + 200
    enc = load_text_encoder(params.conditioning)
    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    assert len(samples) == 4
    caps = [s["txt"].decode() for s in samples]
    ref, mask = enc.encode(caps)
    for s, r, mk in zip(samples, ref, mask, strict=True):
        stored = np.load(io.BytesIO(s["embeddings_t5_xxl.npy"]))
        assert stored.dtype == np.float16 and stored.shape == (int(mk.sum()), 32)  # unpadded
        np.testing.assert_allclose(stored.astype(np.float32), r[mk].numpy(), atol=1e-2)
        assert "png" in s and "json" in s  # the samples themselves are carried over
    # a re-run skips every finished shard; a lost output is redone alone
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    m2 = precache(params, progress=False)
    assert all(s["skipped"] for s in m2["shards"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    (out / "train-000001.tar").unlink()
    m3 = precache(params, progress=False)
    assert [s["name"] for s in m3["shards"] if not s["skipped"]] == ["train-000001.tar"]
    # a changed input shard (re-ingest with other captions) is re-encoded
    ingest(params.data.model_copy(update={"max_caption_chars": 10}), progress=False)
    m4 = precache(params, progress=False)
    assert not any(s["skipped"] for s in m4["shards"])


def test_missing_encoder_says_how_to_provide_one(project: Path) -> None:
    params = make_params(project, encoder_path=str(project / "t5-v1_1-xxl"))
    with pytest.raises(ConfigError) as e:
        load_text_encoder(params.conditioning)
    msg = str(e.value)
    assert "t5-v1_1-xxl" in msg and "huggingface-cli download" in msg
    assert "model.conditioning.encoder_path" in msg
    assert not (project / "t5-v1_1-xxl").exists()  # nothing is built for a user's path


def test_embed_dim_mismatch_is_a_clear_error(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.conditioning\.embed_dim"):
        load_text_encoder(make_params(project, embed_dim=48).conditioning)
    load_text_encoder(make_params(project).conditioning)  # builds d_model 32
    # an existing encoder folder with another width than the configured embed_dim
    bad = make_params(project, embed_dim=48, encoder={"d_model": 48, "num_heads": 2})
    with pytest.raises(ConfigError, match=r"embed_dim: is 48 .* d_model 32"):
        load_text_encoder(bad.conditioning)


def test_online_encoding_skips_precache(project: Path) -> None:
    params = make_params(project, online_encoding=True)
    ingest(params.data, progress=False)
    m = precache(params, progress=False)
    assert m["online_encoding"] is True and not list((project / "encoded").glob("*.tar"))
    assert (project / "data" / "encoder" / "config.json").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtypes_round_trip(dtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    back = from_storage(np.load(io.BytesIO(_save(to_storage(x, dtype)))))
    np.testing.assert_allclose(back, x, rtol=1e-2 if dtype != "float32" else 0, atol=1e-2)


def _save(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_own_captions_on_the_stand_in_encoder_get_a_note(project: Path) -> None:
    """A caption folder encoded by the built random T5 is told how to use a real encoder."""
    from PIL import Image

    src = project / "photos"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 40, 200)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"photo number {i}")
    params = make_params(project, {"source": "folder", "source_path": str(src), "num_holdout": 1})
    ingest(params.data, progress=False, log=lambda _m: None)
    said: list[str] = []
    precache(params, progress=False, log=said.append)
    assert any("encoder_path to minilm" in m for m in said), said
    said.clear()
    shutil.rmtree(project / "data" / "encoder")  # the embedded captions' one reads words
    precache(make_params(project), progress=False, log=said.append)  # embedded: no note
    assert not any("minilm" in m for m in said)
