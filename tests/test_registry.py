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
from tiny import imagen, make_tiny_cascade, shrink, write_params

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
    stage, state, _ = read_stage(Path(local) / "artifacts" / "sr256" / "model.pt")
    assert stage.name == "sr256" and stage.resolution == 32
    original = torch.load(Path(params.models_dir) / "sr256" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], original["state_dict"][k]) for k in state)


def test_stage_models_are_pyfunc_models_with_a_signature(registered, tracking) -> None:
    """imagen-base64 turns prompts into 16 px images; imagen-sr256 super-resolves a low-res
    image given beside its prompt, the same pixels as the cascade from those files."""
    import mlflow

    from imagen.mlops.registry import encode_png

    _, params, *_ = registered
    base = mlflow.pyfunc.load_model("models:/imagen-base64@champion")
    assert base.metadata.get_input_schema() is not None
    low = base.predict(PROMPTS[:1], params={"seed": 1, "steps": 2})
    assert (low["stage"][0], low["width"][0]) == ("base64", 16)
    sr = mlflow.pyfunc.load_model("models:/imagen-sr256@champion")
    assert sr.metadata.get_input_schema().input_names() == ["prompt", "lowres"]
    frame = pd.DataFrame({"prompt": PROMPTS[:1], "lowres": [low["image"][0]]})
    out = sr.predict(frame, params={"seed": 2, "steps": 1})
    assert (out["stage"][0], out["width"][0]) == ("sr256", 32)
    pixels = torch.tensor(list(decode_png(low["image"][0]).getdata()), dtype=torch.float32)
    lowres = pixels.T.reshape(1, 3, 16, 16) / 127.5 - 1.0
    files = {"sr256": Path(params.models_dir) / "sr256"}
    direct = Cascade.from_files(files, encoder_path=params.conditioning.encoder_path)
    same = direct.generate(PROMPTS[:1], seed=2, steps=1, lowres=lowres, depth="sr256")
    assert list(decode_png(out["image"][0]).getdata()) == list(to_pil(same["sr256"][0]).getdata())
    with pytest.raises(Exception, match="lowres"):
        sr.predict(pd.DataFrame({"prompt": PROMPTS[:1], "lowres": ["not a png"]}))
    assert encode_png(decode_png(low["image"][0])) == low["image"][0]


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
    # a negative prompt (a param for every prompt, or a "negative" column) changes the image
    neg = model.predict(
        PROMPTS[:1], params={"depth": "base64", "steps": 1, "negative_prompt": "blue"}
    )
    assert neg["image"][0] != small["image"][0]
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


def test_the_champion_moves_only_on_evidence(tmp_path: Path) -> None:
    """New versions are challengers; champion moves when the selection metric is at least as
    good under the same evaluation settings, or by `imagen registry promote`."""
    from mlflow import MlflowClient

    from imagen.config import ConfigError, resolve_params
    from imagen.mlops.promote import Evidence, promote, promote_on_evidence, show

    raw = shrink(tmp_path)
    params = resolve_params(raw)
    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("test", artifact_location=(tmp_path / "art").as_uri())
    names = ("imagen-base64", "imagen-cascade")
    for name in names:
        client.create_registered_model(name)

    def evaluated(value: float, settings: str = "s1") -> tuple[dict[str, str], bool, str]:
        run = client.create_run(exp).info
        ev = Evidence("caption_agreement_embedded", value, True, settings)
        versions = {
            n: str(
                client.create_model_version(n, run.artifact_uri, run.run_id, tags=ev.tags()).version
            )
            for n in names
        }
        return versions, *promote_on_evidence(params, versions, ev, uri=uri)

    def at(alias: str) -> list[str]:
        return [str(client.get_model_version_by_alias(n, alias).version) for n in names]

    _, first, text = evaluated(0.60)
    assert first and "no champion before" in text and at("champion") == ["1", "1"]
    worse, promoted, text = evaluated(0.55)  # a worse model stays challenger
    assert not promoted and at("champion") == ["1", "1"] and at("challenger") == ["2", "2"]
    assert "0.5500" in text and "0.6000" in text and ">=" in text
    assert client.get_model_version("imagen-base64", worse["imagen-base64"]).description == text
    _, tie, _ = evaluated(0.60)  # at least as good: moves
    assert tie and at("champion") == ["3", "3"]
    _, other, text = evaluated(0.95, settings="s2")  # not comparable: stays challenger
    assert not other and "other settings" in text and at("champion") == ["3", "3"]
    print(text)
    # by hand: `imagen registry promote` moves champion to the challenger and its stage models
    write_params(raw, tmp_path / "params.yaml")
    res = imagen(tmp_path, "registry", "promote", timeout=120)
    assert res.returncode == 0, res.stdout
    assert at("champion") == ["4", "4"]
    assert "promoted by hand" in client.get_model_version("imagen-cascade", "4").description
    rows = show(params)
    assert rows[0]["version"] == "4" and "champion" in rows[0]["aliases"].split(",")
    assert rows[1]["selection"] == "caption_agreement_embedded 0.6000"
    with pytest.raises(ConfigError, match="--version 99"):
        promote(params, "99")
