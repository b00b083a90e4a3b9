"""The MLflow model registry: stage models + the imagen-cascade pyfunc, on a real SQLite store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny import make_tiny_cascade

from imagen.checkpoint import read_stage
from imagen.images import to_pil
from imagen.mlops.registry import CASCADE_MODEL, decode_png, load_cascade, register_models
from imagen.sample import Cascade

PROMPTS = ["a large red circle on the left, dark background", "a small blue square at the top"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("registry")
    params = make_tiny_cascade(tmp)
    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("test", artifact_location=(tmp / "artifacts").as_uri())
    run = client.create_run(exp)
    versions = register_models(
        run.info.run_id,
        params.models_dir,
        params.conditioning.encoder_path,
        tracking_uri=uri,
        alias="champion",
    )
    client.set_terminated(run.info.run_id)
    return tmp, params, uri, run.info.run_id, versions


@pytest.fixture
def tracking(registered, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    uri = registered[2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def test_stage_models_are_registered_with_the_alias(registered, tracking, tmp_path) -> None:
    import mlflow
    from mlflow import MlflowClient

    _, params, uri, run_id, versions = registered
    assert versions == {
        "imagen-base64": "1",
        "imagen-sr256": "1",
        "imagen-sr1024": "1",
        "imagen-cascade": "1",
    }
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("imagen-sr256", "champion")
    assert mv.run_id == run_id
    local = mlflow.artifacts.download_artifacts("models:/imagen-sr256@champion", dst_path=tmp_path)
    stage, state, _ = read_stage(Path(local) / "model.pt")
    assert stage.name == "sr256" and stage.resolution == 32
    original = torch.load(Path(params.models_dir) / "sr256" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], original["state_dict"][k]) for k in state)


def test_pyfunc_loads_from_the_registry_and_generates_pngs(registered, tracking) -> None:
    import mlflow

    tmp, params, *_ = registered
    model = mlflow.pyfunc.load_model(f"models:/{CASCADE_MODEL}@champion")
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"seed": 5})
    assert list(out.columns) == ["prompt", "stage", "width", "height", "image"]
    assert out["prompt"].tolist() == PROMPTS and set(out["stage"]) == {"sr1024"}
    images = [decode_png(s) for s in out["image"]]
    assert all(img.size == (64, 64) for img in images)
    # the same pixels as the cascade loaded from the model files directly
    direct = Cascade.from_models_dir(params.models_dir).generate(PROMPTS, seed=5)
    assert list(images[0].getdata()) == list(to_pil(direct["sr1024"][0]).getdata())
    # a plain list of prompts, a partial cascade, every stage
    small = model.predict(PROMPTS[:1], params={"depth": "base64", "steps": 1})
    assert (small["width"][0], small["stage"][0]) == (16, "base64")
    every = model.predict(PROMPTS[:1], params={"depth": "sr256", "all_stages": True, "steps": 1})
    assert every["stage"].tolist() == ["base64", "sr256"]


def test_the_pyfunc_pickles_no_torch_module(registered, tracking, tmp_path) -> None:
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{CASCADE_MODEL}@champion", dst_path=tmp_path)
    )
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("python_model*"))
    assert (local / "code" / "imagen" / "sample" / "cascade.py").exists()
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == [
        "base64", "encoder", "sr1024", "sr256"
    ]  # fmt: skip


def test_sample_from_a_registered_model(registered, tracking) -> None:
    cascade = load_cascade(
        f"models:/{CASCADE_MODEL}@champion", depth="sr256", tracking_uri=tracking
    )
    out = cascade.generate(PROMPTS[:1], seed=0)
    assert out["sr256"].shape == (1, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="imagen evaluate"):
        load_cascade("models:/imagen-cascade@nope", tracking_uri=tracking)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_models_serve_generates_images(registered, tmp_path) -> None:
    uri = registered[2]
    port = _free_port()
    # `mlflow models serve` runs uvicorn from PATH: the environment's bin folder, as activated
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m",
        f"models:/{CASCADE_MODEL}@champion", "--env-manager", "local", "-h", "127.0.0.1",
        "-p", str(port), "-w", "1",
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("server did not start:\n" + (tmp_path / "serve.log").read_text())
                time.sleep(1)
        body = {"dataframe_records": [{"prompt": PROMPTS[0]}], "params": {"depth": "sr256"}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            predictions = json.loads(resp.read())["predictions"]
        assert len(predictions) == 1 and predictions[0]["stage"] == "sr256"
        assert decode_png(predictions[0]["image"]).size == (32, 32)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
