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
from typing import Any

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


# Lightning's and other libraries' output that must not reach a training log
NOISE = ("litlogger", "tensorboard", "val_dataloader", "Epoch 0/", "deprecated", "Tip:")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny project (shards, encoder) for the tests below; each trains into its own --out."""
    root = tmp_path_factory.mktemp("project")
    make_project(root)
    return root


def _start(root: Path, *args: str, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imagen.cli", "train", "--stage", "base64", *args],
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _sets(**over: Any) -> list[str]:
    return [a for k, v in over.items() for a in ("-S", f"stages.base64.trainer.{k}={v}")]


def _wait_for_line(proc: subprocess.Popen, needle: str, lines: list[str], limit: float) -> None:
    """Read the process's output into ``lines`` until a line holds ``needle``."""
    deadline = time.time() + limit
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return
    pytest.fail(f"no {needle!r} in the output:\n" + "".join(lines)[-3000:])


@pytest.mark.slow
def test_sigterm_checkpoints_at_once_exits_143_and_the_rerun_resumes(project: Path) -> None:
    # no periodic checkpoint: the only one is the one SIGTERM writes
    args = _sets(max_steps=5000, checkpoint_every_n_steps=100000, progress_seconds=0.5,
                 batch_size=4, **{"keep.top_k": 0})  # fmt: skip
    proc = _start(project, "--out", "models/term", *args)
    lines: list[str] = []
    try:
        _wait_for_line(proc, "images/s", lines, 240)  # a progress line: training runs
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 143, log[-3000:]
    assert "loss" in lines[-1] and "left" in lines[-1]  # step, loss, images/s, time left
    assert not [n for n in NOISE if n in log], log
    last = project / "models/term/checkpoints/last.ckpt"
    step = _ckpt_step(last)
    assert f"stopped by SIGTERM at step {step}; checkpoint {last.relative_to(project)}" in log
    assert 0 < step < 5000
    res = imagen(project, "train", "--stage", "base64", "--out", "models/term",
                 *_sets(max_steps=step + 2, batch_size=4))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"(step {step})" in res.stdout and _ckpt_step(last) == step + 2


def _fsize_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_disk_full_mid_write_keeps_the_previous_checkpoint(project: Path) -> None:
    first = ["--out", "models/disk", *_sets(max_steps=2, checkpoint_every_n_steps=2, batch_size=4)]
    assert imagen(project, "train", "--stage", "base64", *first).returncode == 0
    folder = project / "models/disk/checkpoints"
    last = folder / "last.ckpt"
    before = last.read_bytes()
    # files may not grow past half a checkpoint: the next checkpoint write fails part-way
    more = ["--out", "models/disk", *_sets(max_steps=6, checkpoint_every_n_steps=2, batch_size=4),
            "-S", "mlflow.tracking_uri=http://127.0.0.1:9"]  # fmt: skip
    proc = _start(project, *more, preexec_fn=_fsize_limit(len(before) // 2))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    msg = out.strip().splitlines()[-1]
    assert f"writing checkpoint {folder}/" in msg and "failed (" in msg
    assert f"file size limit {len(before) // 2} bytes" in msg  # the cause, named
    assert f"the last good checkpoint is {last.relative_to(project)} (step 2)" in msg
    assert last.read_bytes() == before and _ckpt_step(last) == 2
    assert not list(folder.glob(".*.tmp"))  # the half-written file was removed
    res = imagen(project, "train", "--stage", "base64", *more[:-2])  # disk space again
    assert res.returncode == 0 and "(step 2)" in res.stdout and _ckpt_step(last) == 6
    listing = imagen(project, "checkpoints", "--stage", "base64", "--out", "models/disk", "-S",
                     "stages.base64.trainer.optim.lr=0.1").stdout  # fmt: skip
    row = next(line for line in listing.splitlines() if line.startswith("last.ckpt "))
    assert row.split()[1] == "6" and "trainer.optim.lr 0.002 -> 0.1" in row


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """Start a real MLflow tracking server on 127.0.0.1 (sqlite store in ``root``)."""
    bin_dir = str(Path(sys.executable).parent)  # it starts uvicorn from the environment's bin
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--default-artifact-root", (root / "server-artifacts").as_uri()]  # fmt: skip
    log = (root / "server.log").open("a")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env={**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            start_new_session=True)  # fmt: skip
    return proc


def _answering(proc: subprocess.Popen, root: Path, port: int) -> subprocess.Popen:
    """``proc`` once its server answers on ``port``."""
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text())
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_server_going_away_mid_run_loses_no_metric(project: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _answering(_mlflow_server(tmp_path, port), tmp_path, port)
    args = [*_sets(max_steps=100000, log_every_n_steps=2, checkpoint_every_n_steps=10**5,
                   progress_seconds=0.5, batch_size=4, **{"keep.top_k": 0}),
            "-S", f"mlflow.tracking_uri={uri}"]  # fmt: skip
    proc = _start(project, "--out", "models/mlflow", *args)
    lines: list[str] = []
    try:
        _wait_for_line(proc, "images/s", lines, 240)  # metrics are reaching the server
        _stop(server)
        _wait_for_line(proc, "training goes on", lines, 120)
        _wait_for_line(proc, "images/s", lines, 60)  # and it does, while the server is away
        server = _answering(_mlflow_server(tmp_path, port), tmp_path, port)  # same store, port
        _wait_for_line(proc, "answers again", lines, 120)
        _wait_for_line(proc, "images/s", lines, 60)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
        assert proc.returncode == 143, "".join(lines)[-3000:]
        run_id = json.loads((project / "models/mlflow/mlflow_run.json").read_text())["run_id"]
        client = MlflowClient(uri)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss_avg"))
        assert steps == list(range(2, steps[-1] + 1, 2)) and steps[-1] >= 10  # no gap
        assert client.get_run(run_id).info.status == "KILLED"
        assert not (project / "models/mlflow/mlflow_unlogged.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(server)


@pytest.mark.slow
def test_fine_tuning_through_the_cli_starts_from_the_weights_then_resumes(project: Path) -> None:
    from mlflow import MlflowClient

    src = ["--out", "models/ft-src", *_sets(max_steps=2)]
    assert imagen(project, "train", "--stage", "base64", *src).returncode == 0
    (project / "models/ft-src/model.pt").rename(project / "source.pt")  # a model from elsewhere
    ft = {"optim.lr": 1e-4, "init_from": "source.pt"}
    res = imagen(project, "train", "--stage", "base64", "--out", "models/ft",
                 *_sets(max_steps=3, **ft))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    took = "its EMA weights (as weights and EMA)"
    assert f"fine-tuning base64 from source.pt (source.pt, step 2: {took})" in res.stdout
    run_id = json.loads((project / "models/ft/mlflow_run.json").read_text())["run_id"]
    tags = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["imagen.init_from.source"] == "source.pt"
    assert tags["imagen.init_from.kind"] == "model" and tags["imagen.init_from.step"] == "2"
    # re-running the fine-tuning (longer) resumes it instead of starting it again
    again = imagen(project, "train", "--stage", "base64", "--out", "models/ft",
                   *_sets(max_steps=4, **ft))  # fmt: skip
    assert "resuming base64 from models/ft/checkpoints/last.ckpt (step 3)" in again.stdout
    assert "fine-tuning" not in again.stdout
    assert _ckpt_step(project / "models/ft/checkpoints/last.ckpt") == 4
