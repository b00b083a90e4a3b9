"""bench/bench_gpu.py runs its tiny CPU version: every row measured, the project beside NeMo."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_tiny_bench_measures_every_row(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    rows, samples = _bench().main(["--tiny", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["training"]) == len(rows) >= 4
    impls = {r.impl for r in rows}
    assert "project" in impls
    for r in rows:
        assert not r.note.startswith("failed"), r
        assert r.images_per_s > 0 and r.tflop_per_step > 0 and 0 < r.mfu < 1
        assert r.host_reads >= 0
        if r.impl == "project":  # the project's UNet step reads nothing from the device
            assert r.host_reads == 0, r
    # sampling: every stage of the cascade, in bf16, at the tiny step count
    assert [s.stage for s in samples] == ["base64", "sr256", "sr1024"]
    assert [s["stage"] for s in saved["sampling"]] == ["base64", "sr256", "sr1024"]
    for s in samples:
        assert not s.note.startswith("failed"), s
        assert s.bf16 and s.steps == 2 and s.images_per_s > 0 and s.seconds_per_batch > 0
    if "nemo" in impls:  # the same model on both sides: about the same FLOPs per step
        # (NeMo's einsum attention and its custom backward count a little differently)
        by = {(r.impl, r.model, r.bf16): r.tflop_per_step for r in rows}
        for (impl, model, bf16), flops in by.items():
            if impl == "nemo":
                ours = by[("project", model, bf16)]
                assert abs(ours / flops - 1) < 0.1, (model, ours, flops)
