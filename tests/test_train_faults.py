"""Fault tolerance: atomic checkpoints, SIGKILL + re-run resumes the same step, optimiser,
EMA, schedule and MLflow run; a non-finite loss stops (naming the step) or is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import batches, tiny_stage
from tiny import env, imagen, make_project

from imagen.train import AtomicCheckpointIO, ImagenStage, NonFiniteLossError, build_trainer


def _with_inf(stage, n: int, bad: int) -> list[dict]:
    data = batches(stage, n)
    data[bad]["image"][0, 0, 0, 0] = float("inf")
    return data


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path: Path) -> None:
    stage = tiny_stage("base64", **{"trainer.max_steps": 4, "trainer.checkpoint_every_n_steps": 1})
    trainer = build_trainer(stage, tmp_path, [], logger=False)
    loader = torch.utils.data.DataLoader(_with_inf(stage, 4, bad=2), batch_size=None)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(ImagenStage(stage), train_dataloaders=loader)
    msg = str(err.value)
    assert "step 2" in msg and "last.ckpt" in msg
    # the last good checkpoint is intact and holds the step before the bad batch
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_nonfinite_loss_is_skipped_and_counted(tmp_path: Path) -> None:
    stage = tiny_stage("base64", **{"trainer.max_steps": 3, "trainer.nan_policy": "skip"})
    module = ImagenStage(stage)
    trainer = build_trainer(stage, tmp_path, [], logger=False)
    loader = torch.utils.data.DataLoader(_with_inf(stage, 4, bad=1), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3  # Lightning counts the skipped batch as a step ...
    assert module.skipped_nonfinite == 1
    assert int(module.ema.n_averaged) == 2  # ... but it updated neither weights nor EMA
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["imagen"]["skipped_nonfinite"] == 1


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1  # the old file survived whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_step_optimizer_ema_and_mlflow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    make_project(tmp_path)
    args = [
        "train",
        "--stage",
        "base64",
        "-S",
        "stages.base64.trainer.max_steps=16",
        "-S",
        "stages.base64.trainer.checkpoint_every_n_steps=4",
        "-S",
        "stages.base64.trainer.log_every_n_steps=2",
        "-S",
        "stages.base64.trainer.batch_size=4",
    ]
    out = tmp_path / "models" / "base64"
    last = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagen.cli", *args],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and _ckpt_step(last) >= 4:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _ckpt_step(last)
    assert 4 <= killed_at < 16
    first = torch.load(last, weights_only=True)
    assert first["optimizer_states"][0]["state"]  # AdamW moments are in the checkpoint
    assert any(k.startswith("ema.") for k in first["state_dict"])
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]

    res = imagen(tmp_path, *args)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resuming base64 from models/base64/checkpoints/last.ckpt" in res.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 16
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 16
    # the schedule continued: the lr scheduler counted every step of both halves
    assert final["lr_schedulers"][0]["last_epoch"] == 16
    assert int(final["state_dict"]["ema.n_averaged"]) == 16
    # the same MLflow run, with metrics from both halves
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "train/loss_avg")}
    assert min(steps) <= killed_at < max(steps) == 16
    assert {s for s in steps if s > killed_at} == set(range(killed_at + 2, 17, 2))
    # loss.csv (dvc plots) holds both halves: the first half's history came back with the ckpt
    logged = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert logged == list(range(2, 17, 2))
