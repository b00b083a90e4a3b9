"""MLflow stage runs: URI and parent resolution, nesting, params/metrics/artifacts, resume,
and an unreachable server that must not stop a stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from imagen.config import load_params
from imagen.mlops import client, parent, tracking

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _params(uri: str | None, experiment: str = "imagen-test"):
    over = {"mlflow.experiment": experiment}
    if uri:
        over["mlflow.tracking_uri"] = uri
    return load_params(PARAMS_YAML, over)


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert client.tracking_uri(_params(None)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert client.artifact_location(client.tracking_uri(None)) == (
        (tmp_path.resolve() / "mlartifacts").as_uri()
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert client.tracking_uri(_params(None)) == "http://127.0.0.1:5000"
    assert client.tracking_uri(_params("sqlite:////x/y.db")) == "sqlite:////x/y.db"


def test_parent_run_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEN_PARENT_RUN_ID", raising=False)
    assert parent.resolve_parent_run_id(None) is None
    (tmp_path / ".imagen").mkdir()
    (tmp_path / ".imagen" / "parent_run").write_text("fromfile\n")
    assert parent.resolve_parent_run_id(None) == "fromfile"
    monkeypatch.setenv("IMAGEN_PARENT_RUN_ID", "fromenv")
    assert parent.resolve_parent_run_id(None) == "fromenv"
    assert parent.resolve_parent_run_id("explicit") == "explicit"


def test_stage_run_logs_everything_nested_under_parent(db: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    params = _params(db)
    client = MlflowClient(db)
    exp_id = client.create_experiment("imagen-parent-test")
    parent = client.create_run(exp_id).info.run_id
    resume = tmp_path / "mlflow_run.json"
    (tmp_path / "note.txt").write_text("hello")
    with tracking.stage_run(params, "base64", parent_run_id=parent, resume_file=resume) as run:
        assert run.active
        for step in range(3):
            run.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-3}, step=step)
        run.log_image(Image.new("RGB", (8, 8), "red"), "samples/grid.png")
        run.log_dict({"a": 1}, "summary.json")
        run.log_artifact(tmp_path / "note.txt")
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent
    assert got.data.tags["imagen.stage"] == "base64"
    assert got.data.tags["imagen.params_hash"]
    # the whole resolved config, flattened (more than one 100-param batch)
    assert got.data.params["stages.base64.trainer.max_steps"] == str(
        params.stage("base64").trainer.max_steps
    )
    assert got.data.params["stages.base64.model.conditioning.encoder.tokenizer"] == "word"
    assert len(got.data.params) > 100
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"samples", "summary.json", "note.txt"} <= names
    assert json.loads(resume.read_text())["run_id"] == run.run_id


def test_unfinished_run_is_resumed_finished_is_not(db: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    params = _params(db)
    client = MlflowClient(db)
    resume = tmp_path / "mlflow_run.json"
    with tracking.stage_run(params, "sr256", resume_file=resume) as first:
        first.log_metrics({"x": 1.0}, step=1)
    # a run left RUNNING (the process was killed) is continued
    client.update_run(first.run_id, status="RUNNING")
    with tracking.stage_run(params, "sr256", resume_file=resume) as again:
        again.log_metrics({"x": 2.0}, step=2)
    assert again.run_id == first.run_id
    assert [m.value for m in client.get_metric_history(first.run_id, "x")] == [1.0, 2.0]
    # a finished run is not reopened: a new run starts
    with tracking.stage_run(params, "sr256", resume_file=resume) as fresh:
        pass
    assert fresh.run_id != first.run_id


def test_failed_body_marks_run_failed(db: str) -> None:
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError), tracking.stage_run(_params(db), "sr1024") as run:
        raise RuntimeError("boom")
    assert MlflowClient(db).get_run(run.run_id).info.status == "FAILED"


def test_unreachable_server_warns_once_and_becomes_no_op(tmp_path: Path) -> None:
    params = _params("http://127.0.0.1:9")
    t0 = time.perf_counter()
    with (
        pytest.warns(RuntimeWarning, match="cannot be reached"),
        tracking.stage_run(params, "base64", resume_file=tmp_path / "r.json") as run,
    ):
        assert not run.active
        run.log_metrics({"a": 1.0}, step=0)
        run.log_artifact(tmp_path)
        run.log_dict({"a": 1}, "x.json")
    assert time.perf_counter() - t0 < 10
    assert run.run_id is None


def test_what_a_server_never_got_is_queued_then_reported_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = tracking.StageRun(
        MlflowClient(uri), "run0", uri, unlogged_file=tmp_path / "unlogged.json", retry_seconds=0
    )
    run.log_metrics({"train/loss_avg": 1.5}, step=2)  # no exception: queued
    run.log_metrics({"train/loss_avg": 1.2, "train/lr": 1e-3}, step=4)
    assert len(run.pending) == 2
    with pytest.warns(RuntimeWarning, match=r"did not get 3 calls of run run0 \(3 metric values"):
        run.close("FINISHED")
    unlogged = json.loads((tmp_path / "unlogged.json").read_text())["unlogged"]
    assert [(m["key"], m["step"]) for u in unlogged for m in u.get("metrics", [])] == [
        ("train/loss_avg", 2), ("train/loss_avg", 4), ("train/lr", 4)
    ]  # fmt: skip
    assert unlogged[-1] == {"call": "set_terminated", "args": ["FINISHED"]}


def test_a_dvc_experiment_logs_to_the_projects_store_tagged_with_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In DVC's temporary executor (cwd .dvc/tmp/exps/...) the store is the repository's
    ($DVC_ROOT), a relative SQLite path is anchored there, and every run carries DVC's
    experiment name and baseline revision."""
    root = tmp_path / "repo"
    executor = root / ".dvc" / "tmp" / "exps" / "tmpabc"
    executor.mkdir(parents=True)
    monkeypatch.chdir(executor)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert client.tracking_uri(None) == f"sqlite:///{root.resolve()}/mlflow.db"
    assert client.tracking_uri(_params("sqlite:///db/x.db")) == (
        f"sqlite:///{root.resolve()}/db/x.db"
    )
    params = _params(None)
    tags = client.run_tags(params, "x")
    assert tags["imagen.dvc.exp_name"] == "lr-low"
    assert tags["imagen.dvc.baseline_rev"] == tags["mlflow.source.git.commit"] == "a" * 40
    key, trigger = parent.execution_key()
    assert key.endswith(f"|exp:lr-low@{'a' * 40}") and trigger == "dvc exp run"
    with tracking.stage_run(params, "sr256") as run:
        run.log_metrics({"x": 1.0})
    assert (root / "mlflow.db").is_file() and not (executor / "mlflow.db").exists()
    import sqlite3

    with sqlite3.connect(root / "mlflow.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (found,) = parent.experiment_parent_runs(params, "lr-low")
    runs = parent.stage_runs(params, found.info.run_id)
    assert [r.data.tags["imagen.stage"] for r in runs] == ["sr256"]
    assert "lr-low" in found.info.run_name


def test_parallel_writers_share_one_sqlite_store(tmp_path: Path) -> None:
    """Two writers starting runs and logging metrics to one SQLite file at once both get
    through (the queued experiments' processes do this in tests/test_pipeline.py)."""
    import threading

    params = _params(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.client_and_experiment(params)  # the tables, as the first stage makes them
    problems: list[str] = []

    def writer(w: int) -> None:
        for i in range(3):
            with tracking.stage_run(params, f"w{w}-{i}") as run:
                for step in range(3):
                    run.log_metrics({f"m{k}": k for k in range(10)}, step=step)
                if not run.active or run.pending or run.lost:
                    problems.append(f"w{w}-{i}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not problems
    c, exp_id = client.client_and_experiment(params)
    runs = c.search_runs([exp_id], max_results=100)
    assert len(runs) == 6 and all(len(r.data.metrics) == 10 for r in runs)
