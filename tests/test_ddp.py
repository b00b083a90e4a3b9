"""Data parallelism: two real DDP processes (gloo on the CPU, launched by Lightning) take the
same number of steps on different samples and end with identical weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import imagen, make_project


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    make_project(tmp_path)
    res = imagen(
        tmp_path,
        "train",
        "--stage",
        "base64",
        "--record-keys",
        "-S",
        "stages.base64.trainer.accelerator=cpu",
        "-S",
        "stages.base64.trainer.devices=2",
        "-S",
        "stages.base64.trainer.max_steps=3",
        "-S",
        "stages.base64.trainer.batch_size=4",
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    out = tmp_path / "models" / "base64"
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]
    k0, k1 = (set(r["keys"]) for r in ranks)
    assert len(k0) == len(k1) == 12  # 3 steps x batch 4 per rank
    assert not k0 & k1, "both ranks trained on the same samples"
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged
    assert ranks[0]["ema_weights"] == ranks[1]["ema_weights"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
