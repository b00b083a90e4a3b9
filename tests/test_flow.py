"""The Prefect deployment imagen/cascade-train on a real Prefect server on 127.0.0.1: served with
the documented command (`python -m flows.serve`, what `make prefect` runs), triggered with the
Prefect CLI, the whole tiny cascade run through DVC under one MLflow parent run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny import BIN, copy_project, run
from tiny import env as project_env

from imagen.mlops.pipeline import DVC_STAGES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

STAGES = list(DVC_STAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("flow")
    root = copy_project(base / "repo")
    port = _free_port()
    env = {
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log = (base / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "flows.serve", "--port", str(port)],
        cwd=root,
        env=project_env(root, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            found = run(["prefect", "deployment", "inspect", "imagen/cascade-train"], root, **env)
            if found.returncode == 0:
                break
            assert proc.poll() is None, (base / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the deployment was not served within 180 s"
            time.sleep(2)
        yield {"root": root, "env": env, "proc": proc, "log": base / "serve.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # flows.serve stops its Prefect server
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _trigger(served: dict[str, Any], *params: str) -> subprocess.CompletedProcess:
    cmd = ["prefect", "deployment", "run", "imagen/cascade-train", "--watch"]
    for p in params:
        cmd += ["--param", p]
    return run(cmd, served["root"], timeout=1200, **served["env"])


def _mlflow_runs(root: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imagen")
    assert exp is not None
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def _artifact(served: dict[str, Any]) -> str:
    shown = run(
        ["prefect", "artifact", "inspect", "imagen-cascade"], served["root"], **served["env"]
    )
    assert shown.returncode == 0, shown.stdout
    return shown.stdout


def test_the_deployment_runs_the_cascade_through_dvc(served: dict[str, Any]) -> None:
    root = served["root"]
    start = time.monotonic()
    result = _trigger(served, 'overrides={"stages.base64.trainer.max_steps": 3}')
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + served["log"].read_text()[-6000:]
    assert "Completed" in result.stdout
    print(f"deployment run of the tiny cascade: {seconds:.0f} s")

    # the override went into params.yaml, and DVC recorded the stages it ran with it
    assert "max_steps: 3" in (root / "params.yaml").read_text()
    assert json.loads((root / "models/base64/metrics.json").read_text())["steps"] == 3
    assert (root / "reports" / "metrics.json").is_file()
    status = run(["dvc", "status", "--json"], root)
    assert json.loads(status.stdout) == {}, status.stdout

    # one MLflow parent run created by the flow, one child per stage
    runs = _mlflow_runs(root)
    parents = [r for r in runs if r.data.tags.get("imagen.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["imagen.pipeline.trigger"] == "prefect"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["imagen.stage"] for r in children} == {
        "ingest",
        "precache",
        "base64",
        "sr256",
        "sr1024",
        "evaluator",
        "evaluate",
    }

    # the stage output reached the Prefect run log, the summary artifact links the runs
    log = served["log"].read_text()
    assert "Running stage 'train@sr1024'" in log
    artifact = _artifact(served)
    for stage in STAGES:
        assert stage in artifact
    assert parent.info.run_id in artifact
    assert "evaluate/best" in artifact or "evaluate/" in artifact


def test_a_second_deployment_run_reuses_the_cached_stages(served: dict[str, Any]) -> None:
    root = served["root"]
    before = _mlflow_runs(root)
    result = _trigger(served)
    assert result.returncode == 0, result.stdout[-3000:]
    new = [r for r in _mlflow_runs(root) if r.info.run_id not in {b.info.run_id for b in before}]
    # the flow's own parent run, and no stage ran again
    assert [r.data.tags.get("imagen.kind") for r in new] == ["pipeline"]
    artifact = _artifact(served)
    assert artifact.count("| cached |") == len(STAGES)
