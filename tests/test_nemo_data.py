"""NeMo's dataset format read directly: real tar shards in NeMo's layout (jpg, txt, pickle with
``{precached_key: {"encodings": (n, D)}}``), a pickle that would run a command, a pickle lacking
the key; ``imagen precache --format nemo`` writes shards that come back through the same path."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import TINY_TEXT

from imagen.config import ConfigError, Params, deep_merge, resolve_params
from imagen.data.datamodule import ImagenDataModule
from imagen.data.holdout import holdout_batches
from imagen.data.ingest import ingest
from imagen.data.loader import BadRecordWarning, collate, make_dataset
from imagen.data.nemo_format import BadRecord, read_encodings, safe_loads
from imagen.data.precache import precache

REPO = Path(__file__).resolve().parents[1]
KEY = "embeddings_t5_xxl"
DIM, TOKENS = TINY_TEXT["embed_dim"], TINY_TEXT["token_length"]


class RunsACommand:
    """Unpickling this calls os.system: what a poisoned shard would do to a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_nemo_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A tar as NeMo's data preparation writes it: <key>.jpg, <key>.txt, <key>.pickle."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def nemo_sample(i: int, n_tokens: int, payload: Any = None) -> dict[str, Any]:
    enc = np.random.default_rng(i).standard_normal((n_tokens, DIM)).astype(np.float16)
    data = {KEY: {"encodings": enc}} if payload is None else payload
    return {
        "__key__": f"{i:06d}",
        "jpg": jpeg(i),
        "txt": f"caption number {i}".encode(),
        "pickle": pickle.dumps(data),
        "_enc": enc,
    }


def params_for(root: Path, source: Path | None = None, **data: Any) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    over: dict[str, Any] = {
        "data": {
            "image_size": 64,
            "min_resolution": 32,
            "num_holdout": 1,
            "samples_per_shard": 4,
            "pyramid": [],
            "shards_dir": str(root / "shards"),
            "encoded_dir": str(root / "encoded"),
        }
        | data,
        "model": {"conditioning": TINY_TEXT},
    }
    if source is not None:
        over["data"] |= {"source": "webdataset", "source_path": str(source)}
    return resolve_params(deep_merge(raw, over))


@pytest.fixture
def nemo_shards(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], Path]:
    """Two NeMo shards: good samples (one longer than token_length), a pickle that would run
    ``touch``, one without precached_key, one truncated."""
    marker = tmp_path / "pwned"
    good = [nemo_sample(i, n) for i, n in enumerate([3, 7, TOKENS + 5, 1, 4, 9])]
    bad = [
        nemo_sample(100, 2, payload={KEY: {"encodings": RunsACommand(marker)}}),
        nemo_sample(101, 2, payload={"embeddings_t5_small": {"encodings": np.zeros((2, DIM))}}),
    ]
    truncated = nemo_sample(102, 2)
    truncated["pickle"] = truncated["pickle"][:20]
    src = tmp_path / "nemo"
    src.mkdir()
    strip = [{k: v for k, v in s.items() if k != "_enc"} for s in good + bad + [truncated]]
    write_nemo_shard(src / "00000.tar", strip[:5])
    write_nemo_shard(src / "00001.tar", strip[5:])
    return src, good, marker


def test_the_allowlist_unpickler_refuses_code_and_reads_numpy(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(BadRecord) as e:
        safe_loads(pickle.dumps({KEY: RunsACommand(marker)}))
    assert e.value.reason == "unsafe_pickle" and "system" in e.value.detail
    assert not marker.exists()
    enc = np.arange(12, dtype=np.float32).reshape(3, 4)
    for protocol in (2, 3, 4, 5):  # each protocol names numpy's helpers differently
        blob = pickle.dumps(
            {KEY: {"encodings": enc, "n": np.int64(3)}, "x": [1, (2.0, None)]}, protocol
        )
        assert np.array_equal(read_encodings(blob, KEY, 4), enc)
    with pytest.raises(BadRecord, match="missing_precached_key"):
        read_encodings(pickle.dumps({"other": {"encodings": enc}}), KEY)
    with pytest.raises(BadRecord, match="embed_dim is 8"):
        read_encodings(pickle.dumps({KEY: {"encodings": enc}}), KEY, 8)


def test_nemo_shards_ingest_precache_and_load(
    nemo_shards: tuple[Path, list[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, good, marker = nemo_shards
    monkeypatch.chdir(tmp_path)
    params = params_for(tmp_path / "p", src, num_train=6, num_holdout=1)
    manifest = ingest(params.data, workers=1, progress=False, log=lambda m: None)
    assert manifest["rejected_by_reason"] == {"unreadable_pickle": 1, "unsafe_pickle": 1}
    assert manifest["counts"]["written"] == 7 and not marker.exists()
    lines: list[str] = []
    pre = precache(params, progress=False, log=lines.append)
    assert "carry NeMo's precached embeddings" in lines[0] and "not encoded" in lines[0]
    assert pre["nemo_precached"] == 6 and pre["bad_records_by_reason"] == {
        "missing_precached_key": 1
    }
    assert not (tmp_path / "data" / "encoder").exists()  # no T5 was built or loaded
    batches = _train_batches(params)  # the holdout split got the record lacking the key
    by_key = {s["__key__"]: s["_enc"] for s in good}
    seen = 0
    for b in batches:
        assert b["t5_text_embeddings"] is b["text_embed"] and b["t5_text_mask"] is b["text_mask"]
        for key, emb, mask in zip(b["key"], b["text_embed"], b["text_mask"], strict=True):
            want = by_key[key].astype(np.float32)[:TOKENS]
            n = len(want)
            assert mask.sum() == n and mask[:n].all()
            assert torch.equal(emb[:n], torch.from_numpy(want)) and (emb[n:] == 0).all()
            seen += 1
    assert seen == 6


def _train_batches(params: Params) -> list[dict[str, Any]]:
    """The training split as one batch, as the data module hands it to the LightningModule."""
    stage = params.stage("base64")
    ds = make_dataset(params, stage, "train", epochs=1, train=False)
    return [ImagenDataModule(params, stage).on_after_batch_transfer(collate(list(ds)), 0)]


def test_nemo_wdinfo_index_names_the_shards(
    nemo_shards: tuple[Path, list[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """data.source_path: NeMo's wdinfo .pkl (tar_files under local_root_path = source_root)."""
    src, _, marker = nemo_shards
    monkeypatch.chdir(tmp_path)
    wdinfo = tmp_path / "wdinfo-selene.pkl"
    info = {"tar_files": ["00000.tar", "00001.tar"], "total_key_count": 9, "chunk_size": 5}
    wdinfo.write_bytes(pickle.dumps(info))
    params = params_for(tmp_path / "p", num_train=6, num_holdout=1)
    data = params.data.model_copy(
        update={"source": "webdataset", "source_path": [str(wdinfo)], "source_root": str(src)}
    )
    manifest = ingest(data, workers=1, progress=False, log=lambda m: None)
    assert manifest["counts"]["written"] == 7 and manifest["counts"]["seen"] == 9
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"tar_files": RunsACommand(marker)}))
    with pytest.raises(ConfigError, match="refused"):
        ingest(data.model_copy(update={"source_path": str(evil)}), workers=1, progress=False)
    assert not marker.exists()


def test_the_loader_skips_and_reports_bad_pickles_in_shards_it_is_pointed_at(
    nemo_shards: tuple[Path, list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """Shards copied straight into the encoded folder (no ingest): the loader's own check."""
    src, good, marker = nemo_shards
    params = params_for(tmp_path / "p")
    enc = Path(params.data.encoded_dir)
    enc.mkdir(parents=True)
    for i, shard in enumerate(sorted(src.glob("*.tar"))):
        (enc / f"train-{i:06d}.tar").write_bytes(shard.read_bytes())
    ds = make_dataset(params, params.stage("base64"), "train", epochs=1, train=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [ex["key"] for ex in ds]
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    reasons = sorted(str(w.message) for w in caught if w.category is BadRecordWarning)
    assert len(reasons) == 3
    assert "000100" in reasons[0] and "unsafe_pickle" in reasons[0]
    assert "000101" in reasons[1] and "missing_precached_key" in reasons[1]
    assert "000102" in reasons[2] and "unreadable_pickle" in reasons[2]
    assert not marker.exists()


def test_precache_format_nemo_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded set -> `imagen precache --format nemo` (the real command) -> NeMo's layout,
    read as NeMo would -> ingested again as NeMo shards -> the same batches as the .npy path."""
    monkeypatch.chdir(tmp_path)
    a = params_for(tmp_path / "a", num_train=6, num_holdout=2)
    ingest(a.data, workers=1, progress=False, log=lambda m: None)
    precache(a, progress=False, log=lambda m: None)  # the project's .npy format
    nemo_dir = tmp_path / "nemo_out"
    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    over = {
        "data": a.data.model_dump() | {"encoded_dir": str(nemo_dir)},
        "model": {"conditioning": TINY_TEXT},
    }
    params_file.write_text(yaml.safe_dump(deep_merge(raw, over)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
    }
    cmd = [sys.executable, "-m", "imagen.cli", "precache", "--params", str(params_file)]
    run = subprocess.run(
        [*cmd, "--format", "nemo", "--no-progress"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tars = sorted(nemo_dir.glob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        blob = tar.extractfile(next(n for n in names if n.endswith(".pickle"))).read()
    assert not any(n.endswith(".npy") for n in names)
    entry = pickle.loads(blob)  # NeMo's own reader: a plain dict of a dict of an array
    assert set(entry) == {KEY} and entry[KEY]["encodings"].shape[1] == DIM
    b = params_for(tmp_path / "b", nemo_dir, num_train=6, num_holdout=2)
    ingest(b.data, workers=1, progress=False, log=lambda m: None)
    lines: list[str] = []
    precache(b, progress=False, log=lines.append)
    assert "not encoded" in lines[0]
    first = {k: e for bt in _train_batches(a) + holdout_batches(a, 2) for k, e in _rows(bt)}
    held = holdout_batches(b, 2)
    assert held[0]["t5_text_embeddings"] is held[0]["text_embed"]
    second = {k: e for bt in _train_batches(b) + held for k, e in _rows(bt)}
    assert set(second) == set(first) and len(first) == 8
    for k in first:
        assert torch.equal(first[k][0], second[k][0]) and torch.equal(first[k][1], second[k][1])
    meta = json.loads((Path(b.data.encoded_dir) / "manifest.json").read_text())
    assert meta["nemo_precached"] == 8 and meta["bad_records"] == 0


def _rows(batch: dict[str, Any]) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    return [
        (k, (e, m))
        for k, e, m in zip(batch["key"], batch["text_embed"], batch["text_mask"], strict=True)
    ]
