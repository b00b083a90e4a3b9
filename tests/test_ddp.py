"""Data parallelism: two real DDP processes (gloo on the CPU, launched by Lightning) take the
same number of steps on different samples and end with identical weights; SIGTERM stops both
at the same step with one checkpoint written by rank zero."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import env, imagen, make_project


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    """Two ranks train 3 steps on different samples and end with the same weights. The UNet
    has self attention and attention pooling: self attention reads no text tokens and
    attention pooling pools the raw embeddings, so the text projection and null token get no
    gradient, which DDP rejects unless they are frozen."""
    unet = {"attention_type": "self", "feature_pooling_type": "attention", "use_null_token": True}
    make_project(tmp_path, {"stages": {"base64": {"model": {"unet": unet}}}}, stages=("base64",))
    sets = {"accelerator": "cpu", "devices": 2, "max_steps": 3, "batch_size": 4,
            "checkpoint_every_n_steps": 2}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("-S", f"stages.base64.trainer.{k}={v}")]
    res = imagen(tmp_path, "train", "--stage", "base64", "--record-keys", *args, timeout=600)
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
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "denoiser.net.cond.text_to_cond.weight" in state  # still saved (NeMo's keys)


def _processes_in(folder: Path) -> list[int]:
    """Process ids whose working directory is ``folder`` (leftover ranks)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == folder.resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_sigterm_under_ddp_rank_zero_writes_the_others_wait(tmp_path: Path) -> None:
    make_project(tmp_path)
    sets = {"accelerator": "cpu", "devices": 2, "max_steps": 5000, "batch_size": 4,
            "checkpoint_every_n_steps": 10**5, "progress_seconds": 0.5,
            "keep.top_k": 0}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("-S", f"stages.base64.trainer.{k}={v}")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagen.cli", "train", "--stage", "base64", *args],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.time() + 300
        while time.time() < deadline and not (lines and "images/s" in lines[-1]):
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)  # to rank zero only, as Kubernetes does
        rest, _ = proc.communicate(timeout=120)  # no rank hangs in a collective
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 143, log[-3000:]
    assert log.count("SIGTERM: writing") == 1  # rank zero wrote, rank one waited
    folder = tmp_path / "models" / "base64" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    step = int(torch.load(folder / "last.ckpt", weights_only=True)["global_step"])
    assert f"stopped by SIGTERM at step {step}" in log
    time.sleep(1)
    assert not _processes_in(tmp_path), "a rank is still running"
    # the re-run on one device resumes the two-device state (devices is not state-relevant)
    res = imagen(tmp_path, "train", "--stage", "base64", "-S",
                 f"stages.base64.trainer.max_steps={step + 2}")  # fmt: skip
    assert res.returncode == 0 and f"(step {step})" in res.stdout, res.stdout[-3000:]
    assert "trainer.devices 2 -> 1" in res.stdout and "split over the new ranks" in res.stdout
    assert json.loads((tmp_path / "models/base64/metrics.json").read_text())["steps"] == step + 2
