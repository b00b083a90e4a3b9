"""Precache at scale: captions sorted by length and padded to the batch's longest give the
features of fixed padding (within fp16 storage rounding), the encoder dtype and device options,
ranks from torchrun giving the bytes of one process, online encoding in the encoder dtype, and
progress lines when the output is not a terminal."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import BIN, TINY_TEXT, run, shrink, write_params

from imagen.config import ConditioningConfig, ConfigError, deep_merge, resolve_params
from imagen.data.ingest import ingest
from imagen.data.loader import OnlineEncoding
from imagen.data.precache import precache, resolve_device, world_from_env
from imagen.progress import ENV, Lines, interval
from imagen.text import build_default_encoder, load_text_encoder, to_storage

CAPTIONS = [
    "a red circle",
    "a small blue square at the top left on a dark background",
    "x",
    "a green triangle in the middle",
    "two yellow stars and a purple hexagon near the bottom right corner of a light background",
    "an orange ring",
    "a",
]


def _cond(tmp_path: Path, plain_folder: bool, **over: object) -> ConditioningConfig:
    """The toy conditioning with the byte tokenizer (captions of many lengths); with
    ``plain_folder`` the built T5 copied to a folder without the project's marker, so it loads
    as any T5 folder does."""
    text = deep_merge(TINY_TEXT, {"encoder": {"tokenizer": "byt5"}, **over})
    cond = resolve_params(shrink(tmp_path, {"model": {"conditioning": text}})).conditioning
    build_default_encoder(cond, cond.encoder_path)
    if plain_folder:
        folder = tmp_path / "t5"
        shutil.copytree(cond.encoder_path, folder)
        (folder / "imagen_encoder.json").unlink()
        cond = cond.model_copy(update={"encoder_path": str(folder)})
    return cond


@pytest.mark.parametrize("plain_folder", [False, True], ids=["built", "t5-folder"])
def test_sorted_dynamic_padding_gives_the_fixed_padding_features(
    tmp_path: Path, plain_folder: bool
) -> None:
    torch.set_num_threads(2)
    cond = _cond(tmp_path, plain_folder)
    enc = load_text_encoder(cond)
    assert enc.built is not plain_folder
    fixed = enc.encode_unpadded(CAPTIONS, padding="max_length")  # every caption to token_length
    seen: list[int] = []
    dynamic = enc.encode_sorted(CAPTIONS, batch_size=3, on_batch=seen.append)
    assert seen == [3, 3, 1]
    # the sorted batches really are shorter than token_length (the work saved)
    lengths = enc.token_lengths(CAPTIONS)
    assert sorted(lengths)[:3] == [2, 2, 13] and max(lengths) == cond.token_length
    for f, d in zip(fixed, dynamic, strict=True):
        assert f.shape == d.shape and f.dtype == d.dtype == np.float32
        np.testing.assert_allclose(d, f, rtol=1e-5, atol=1e-5)
        # what is stored (fp16) is the same value, or one fp16 step apart at the value's
        # magnitude (at least that of the features' scale, unit RMS, near zero)
        a, b = to_storage(f, "float16"), to_storage(d, "float16")
        step = np.spacing(np.maximum(np.maximum(np.abs(a), np.abs(b)), np.float16(1)))
        assert (np.abs(a.astype(np.float32) - b) <= step).all() and (a == b).mean() > 0.99


def test_encoder_dtype_bf16_and_device_options(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    cond = _cond(tmp_path, False, encoder_dtype="bfloat16")
    enc = load_text_encoder(cond, dtype=None)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in enc.model.parameters())
    emb, mask = enc.encode(CAPTIONS)
    assert emb.dtype == torch.float32 and not emb.requires_grad
    ref, _ = load_text_encoder(
        cond.model_copy(update={"encoder_dtype": "float32"}), dtype=None
    ).encode(CAPTIONS)
    cos = torch.nn.functional.cosine_similarity(emb[mask], ref[mask], dim=-1)
    assert cos.min() > 0.98 and not torch.equal(emb, ref)
    auto = cond.model_copy(update={"encoder_dtype": "auto"})
    assert {p.dtype for p in load_text_encoder(auto, dtype=None).model.parameters()} == {
        torch.float32
    }  # auto on the CPU
    assert resolve_device(None) == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device.*'potato'"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device.*no CUDA"):
            resolve_device("cuda")


def test_online_encoding_one_frozen_bf16_forward_per_batch(tmp_path: Path) -> None:
    cond = _cond(tmp_path, False, encoder_dtype="bfloat16", online_encoding=True)
    params = resolve_params(shrink(tmp_path, {"model": {"conditioning": cond.model_dump()}}))
    online = OnlineEncoding(params)
    online({"caption": CAPTIONS[:1]}, device="cpu")  # loads the encoder
    calls: list[int] = []
    online.encoder.model.register_forward_hook(
        lambda m, i, o: calls.append(o.last_hidden_state.shape[0])
    )
    for b in (CAPTIONS[:4], CAPTIONS[4:]):
        batch = online({"caption": b}, device="cpu")
        assert batch["text_embed"].shape == (len(b), 16, 32) and batch["text_mask"].any(1).all()
        assert batch["text_embed"].dtype == torch.float32 and batch["text_embed"].grad_fn is None
    assert calls == [4, 3]  # one forward a batch
    assert next(online.encoder.model.parameters()).dtype == torch.bfloat16


def test_world_from_torchrun_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    assert world_from_env() == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world_from_env() == (1, 2)  # torchrun's first
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK: 2 is not a rank of WORLD_SIZE 2"):
        world_from_env()


def test_progress_lines_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    out = io.StringIO()
    lines = Lines("precache", 100, "caption", 30.0, out, clock=lambda: next(clock))
    for n in (10, 21, 9, 20):
        lines.update(n)
    assert out.getvalue().splitlines() == [
        "precache: 31/100 caption, 1.0 caption/s, 1m09s left",
        "precache: 60/100 caption, 1.0 caption/s, 0m41s left",
    ]
    monkeypatch.setenv(ENV, "0.5")
    assert interval() == 0.5
    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(ConfigError, match=ENV):
        interval()


def test_torchrun_two_ranks_write_the_bytes_of_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ranks under a real torchrun split the shards and give byte-identical shards,
    side-cars and manifest; progress lines appear (not a terminal) at a short interval."""
    raw = shrink(None, {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})  # none: faster
    write_params(raw, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV, "0.001")
    params = resolve_params(raw)
    ingest(params.data, progress=False, log=lambda s: None)
    assert "ingest: " in capsys.readouterr().err  # its progress lines
    one = precache(params, batch_size=3, progress=False, log=lambda s: None)
    assert re.search(
        r"precache: \d+/40 caption, [\d.]+ caption/s, \dm\d\ds left", capsys.readouterr().err
    )
    assert one["samples"] == 40 and len(one["shards"]) == 5
    res = run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "imagen.cli",
         "precache", "--no-progress", "--batch-size", "3", "-S", "data.encoded_dir=data/two"],
        tmp_path, timeout=300, **{ENV: "0.001"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    assert re.search(r"precache rank 1/2: 2 shards, 16 captions encoded", res.stdout)
    assert re.search(r"precache rank 0/2: \d+/24 caption", res.stdout)  # its progress lines
    assert "precache rank 0/2: 3 shards, 24 captions encoded" in res.stdout
    a, b = Path(params.data.encoded_dir), tmp_path / "data" / "two"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 12
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # a second run: every shard finished, nothing encoded
    params.data.encoded_dir = str(b)
    again = precache(params, progress=False, log=lambda s: None)
    assert all(s["skipped"] for s in again["shards"]) and again["captions_per_s"] == 0


@pytest.mark.gpu
def test_on_cuda_the_encoder_runs_in_bf16_close_to_the_cpu_features(tmp_path: Path) -> None:
    cond = _cond(tmp_path, True)  # a plain T5 folder
    cpu = load_text_encoder(cond, "cpu", dtype=None)
    gpu = load_text_encoder(cond, resolve_device("cuda"), dtype=None)
    assert next(gpu.model.parameters()).dtype == torch.bfloat16  # auto on an accelerator
    for a, b in zip(cpu.encode_sorted(CAPTIONS, 3), gpu.encode_sorted(CAPTIONS, 3), strict=True):
        assert a.shape == b.shape and b.dtype == np.float32
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b))
        assert cos.min() > 0.98
