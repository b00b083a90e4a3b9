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
