"""bench/demo_seeds.py's table: median and range per measure over seeds' reports/metrics.json."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "demo_seeds.py"


def _module():
    spec = importlib.util.spec_from_file_location("demo_seeds", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_seeds"] = mod
    spec.loader.exec_module(mod)
    return mod


def _metrics(fd: list[float], agree: list[float], best: int) -> dict:
    scales = [
        {"guidance_scale": w, "fd_embedded": f, "caption_agreement_embedded": a,
         "agreement_color": a / 2, "sharpness": 1.5, "seconds": 3.0}
        for w, f, a in zip((1.0, 2.0), fd, agree, strict=True)
    ]  # fmt: skip
    return {"fidelity_metric": "fd_embedded", "alignment_metric": "caption_agreement_embedded",
            "scales": scales, "best": {**scales[best], "rule": "..."}}  # fmt: skip


def test_median_and_range_per_scale_and_at_the_best_scale() -> None:
    mod = _module()
    per_seed = {
        0: _metrics([300, 250], [0.60, 0.64], best=1),
        1: _metrics([280, 260], [0.50, 0.62], best=0),
        2: _metrics([320, 240], [0.70, 0.58], best=1),
    }
    rows = {(r["at"], r["measure"]): r for r in mod.table(per_seed)}
    fd1 = rows[("guidance 1", "fd_embedded")]
    assert (fd1["median"], fd1["min"], fd1["max"]) == (300, 280, 320)
    assert fd1["seeds"] == {0: 300, 1: 280, 2: 320}
    best = rows[("best", "caption_agreement_embedded")]
    assert (best["median"], best["min"], best["max"]) == (0.58, 0.5, 0.64)
    assert rows[("best", "guidance_scale")]["seeds"] == {0: 2.0, 1: 1.0, 2: 2.0}
    assert ("guidance 2", "agreement_color") in rows and ("best", "sharpness") in rows
    assert not any(k[1] in ("seconds", "rule") for k in rows)  # timings and text are not measures


def test_experiments_are_found_by_name_at_any_depth() -> None:
    mod = _module()
    exp = {"name": "base64-seed-1", "rev": "8f71", "data": {"metrics": {"m": 1}}}
    shown = [{"rev": "workspace", "data": {}}, {"rev": "abc", "experiments": [{"revs": [exp]}]}]
    assert mod.experiments(shown) == {"base64-seed-1": {"metrics": {"m": 1}, "rev": "8f71"}}
