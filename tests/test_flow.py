"""The Prefect flow imagen/cascade-train on one real Prefect server on 127.0.0.1 (the session's,
tests/conftest.py): served with the documented command
(`python -m flows.serve`, what `make prefect` runs) for a run in the checkout, followed by a run
of the served imagen-sample/sample (negative prompts) on the models it trained; then deployed
from prefect.yaml to a process work pool (`prefect deploy`, `prefect worker start`) for two
concurrent runs with overrides, each a DVC experiment in an isolated copy that leaves the
checkout's params.yaml byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny import BIN, copy_project, imagen, run
from tiny import env as project_env

from imagen.mlops.experiments import by_name, flat
from imagen.mlops.pipeline import CHECK_STAGES, DVC_STAGES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

STAGES = list(DVC_STAGES)
POOL = "imagen"


def _spawn(cmd: list[str], root: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=root,
        env=project_env(root, **env),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_group(proc: subprocess.Popen) -> None:
    """A worker stops on SIGINT (Ctrl-C); SIGKILL after 10 s (it keeps nothing of its own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(
    prefect_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The session's Prefect server, and a tiny project (a git copy of the repository)."""
    base = tmp_path_factory.mktemp("flow")
    root = copy_project(base / "repo")
    return {"root": root, "base": base, "env": {**prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"}}


def _trigger(server: dict[str, Any], *params: str) -> subprocess.CompletedProcess:
    cmd = ["prefect", "deployment", "run", "imagen/cascade-train", "--watch"]
    for p in params:
        cmd += ["--param", p]
    return run(cmd, server["root"], timeout=1200, **server["env"])


def _mlflow_runs(root: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imagen")
    assert exp is not None
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def _children(runs: list[Any], parent: Any) -> set[str]:
    pid = parent.info.run_id
    return {
        r.data.tags["imagen.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == pid
    }


def _tables(server: dict[str, Any], key: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """The table artifacts under ``key``, newest first: (description, rows)."""
    cmd = ["prefect", "artifact", "inspect", key, "--output", "json"]
    shown = run(cmd, server["root"], **server["env"])
    assert shown.returncode == 0, shown.stdout
    found = json.loads(shown.stdout[shown.stdout.index("[") :])
    assert found and all(a["type"] == "table" for a in found), found
    out = []
    for a in found:
        rows = json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]
        out.append((a["description"] or "", rows))
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    files = ["params.yaml", "dvc.lock", "models/sr1024/metrics.json", "reports/metrics.json"]
    return {f: (root / f).read_bytes() for f in files}


def _experiments(root: Path) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json``: experiment name -> its params and metrics (flattened files)."""
    shown = run(["dvc", "exp", "show", "--json"], root)
    assert shown.returncode == 0, shown.stdout
    listed = by_name(json.loads(shown.stdout[shown.stdout.index("[") :]))
    return {name: flat(data) for name, data in listed.items()}


def test_make_prefect_serves_the_flow_which_runs_in_the_checkout(server: dict[str, Any]) -> None:
    root, env = server["root"], server["env"]
    log = server["base"] / "serve.log"
    before = (root / "params.yaml").read_bytes()
    proc = _spawn([str(BIN / "python"), "-m", "flows.serve", "--no-server"], root, log, env)
    try:
        deadline = time.monotonic() + 120
        while any(
            run(["prefect", "deployment", "inspect", name], root, **env).returncode
            for name in ("imagen/cascade-train", "imagen-sample/sample")
        ):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the deployment was not served within 120 s"
            time.sleep(1)
        start = time.monotonic()
        result = _trigger(server)
        seconds = time.monotonic() - start
        assert result.returncode == 0, result.stdout[-3000:] + log.read_text()[-6000:]
        assert "Completed" in result.stdout
        print(f"served deployment run of the tiny cascade in the checkout: {seconds:.0f} s")

        # the second served deployment samples the trained cascade, negative prompts included
        prompts = ["a red circle", "a blue square"]
        sampled = run(
            ["prefect", "deployment", "run", "imagen-sample/sample", "--watch"]
            + ["--param", f"prompts={json.dumps(prompts)}", "--param", 'negative=["red"]']
            + ["--param", "depth=sr256", "--param", "guidance=3", "--param", "out=samples/flow"],
            root,
            timeout=600,
            **env,
        )
        assert sampled.returncode == 0, sampled.stdout[-3000:] + log.read_text()[-6000:]
    finally:
        _stop_group(proc)

    # exactly what `imagen sample` makes with the same options, the negative prompt recorded
    cli = ["sample", *prompts, "--negative", "red", "--depth", "sr256", "--guidance", "3"]
    made = imagen(root, *cli, "--out", "samples/cli", "--no-progress")
    assert made.returncode == 0, made.stdout[-3000:]
    flow_images = json.loads((root / "samples/flow/images.json").read_text())
    assert [(r["prompt"], r["negative"], r["seed"]) for r in flow_images] == [
        ("a red circle", "red", 0),
        ("a blue square", "red", 1),
    ]
    for stage in ("base64", "sr256"):
        for name in sorted(p.name for p in (root / "samples/cli" / stage).iterdir()):
            flow_png = (root / "samples/flow" / stage / name).read_bytes()
            assert flow_png == (root / "samples/cli" / stage / name).read_bytes(), (stage, name)
    _, sample_rows = _tables(server, "imagen-samples")[0]
    assert [(r["prompt"], r["negative"]) for r in sample_rows] == [(p, "red") for p in prompts]
    assert all(Path(r["file"].removeprefix("file://")).is_file() for r in sample_rows)

    # the checkout's pipeline ran in the checkout: outputs and dvc.lock agree, params untouched
    assert (root / "params.yaml").read_bytes() == before
    assert json.loads((root / "models/base64/metrics.json").read_text())["steps"] == 2
    status = run(["dvc", "status", "--json"], root)
    assert set(json.loads(status.stdout)) <= set(CHECK_STAGES), status.stdout

    runs = _mlflow_runs(root)
    parents = [r for r in runs if r.data.tags.get("imagen.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["imagen.pipeline.trigger"] == "prefect"
    assert parent.info.status == "FINISHED"
    assert _children(runs, parent) == {
        "ingest",
        "precache",
        "base64",
        "sr256",
        "sr1024",
        "evaluator",
        "evaluate",
    }
    assert "Running stage 'train@sr1024'" in log.read_text()

    # the artifacts are tables: each stage with its MLflow run and report files, the metrics
    description, rows = _tables(server, "imagen-cascade")[0]
    assert [r["stage"] for r in rows] == STAGES
    work = [r for r in rows if r["stage"] not in CHECK_STAGES]
    assert {r["dvc"] for r in work} == {"ran"}
    assert {r["dvc"] for r in rows if r["stage"] in CHECK_STAGES} == {"checked"}
    assert parent.info.run_id in description
    assert all(r["mlflow_run"].startswith("http://127.0.0.1:5000/#/experiments/") for r in work)
    evaluate = rows[-1]["files"].split()
    assert (root / "reports" / "metrics.json").as_uri() in evaluate
    assert all(Path(f.removeprefix("file://")).is_file() for f in evaluate)
    metrics = {r["metric"]: r["value"] for r in _tables(server, "imagen-cascade-metrics")[0][1]}
    assert metrics["train@base64/steps"] == 2


@pytest.fixture(scope="module")
def worker(server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """prefect.yaml deployed to a process work pool, and a worker of that pool."""
    root, env = server["root"], server["env"]
    made = run(["prefect", "work-pool", "create", POOL, "--type", "process"], root, **env)
    assert made.returncode == 0, made.stdout
    # `prefect deploy` records the directory it runs from ({{ $PWD }} in prefect.yaml)
    deployed = run(
        ["prefect", "--no-prompt", "deploy", "--name", "cascade-train"], root, PWD=str(root), **env
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:]
    log = server["base"] / "worker.log"
    wenv = env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
    proc = _spawn(["prefect", "worker", "start", "--pool", POOL], root, log, wenv)
    try:
        yield {**server, "worker_log": log}
    finally:
        _stop_group(proc)


def test_overrides_run_as_concurrent_dvc_experiments_on_a_work_pool(
    worker: dict[str, Any],
) -> None:
    root, env = worker["root"], worker["env"]
    shown = run(["prefect", "deployment", "inspect", "imagen/cascade-train"], root, **env)
    assert POOL in shown.stdout and "set_working_directory" in shown.stdout, shown.stdout
    before_files = _snapshot(root)
    before_runs = {r.info.run_id for r in _mlflow_runs(root)}

    cmd = ["prefect", "deployment", "run", "imagen/cascade-train", "--watch", "--param"]
    runs = {
        "sr1024-steps": 'overrides={"stages.sr1024.trainer.max_steps": 3}',
        "two-scales": 'overrides={"evaluate.guidance_scales": [1, 2]}',
    }
    start = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [*cmd, p, "--param", f"experiment={name}"],
            cwd=root,
            env=project_env(root, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, p in runs.items()
    }
    outputs = {name: p.communicate(timeout=1200)[0] for name, p in procs.items()}
    seconds = time.monotonic() - start
    wlog = worker["worker_log"].read_text()
    for name, p in procs.items():
        assert p.returncode == 0, outputs[name][-3000:] + wlog[-6000:]
        assert "Completed" in outputs[name]
    print(f"two concurrent experiment runs on the work pool: {seconds:.0f} s")

    # the checkout is byte-identical, and no copy is left behind
    assert _snapshot(root) == before_files
    assert (root / ".dvc/tmp/flows").is_dir() and not list((root / ".dvc/tmp/flows").iterdir())
    worktrees = run(["git", "worktree", "list", "--porcelain"], root).stdout
    assert worktrees.count("worktree ") == 1, worktrees

    # both came back as DVC experiments with their params and metrics
    exps = _experiments(root)
    assert set(runs) <= set(exps), exps.keys()
    sr = exps["sr1024-steps"]
    assert sr["params"]["stages"]["sr1024"]["trainer"]["max_steps"] == 3
    assert sr["metrics"]["models/sr1024/metrics.json"]["steps"] == 3
    assert exps["two-scales"]["params"]["evaluate"]["guidance_scales"] == [1, 2]
    assert "reports/metrics.json" in exps["two-scales"]["metrics"]
    for name, e in sorted((n, exps[n]) for n in runs):
        sr1024 = e["params"]["stages"]["sr1024"]["trainer"]["max_steps"]
        steps = e["metrics"]["models/sr1024/metrics.json"]["steps"]
        scales = e["params"]["evaluate"]["guidance_scales"]
        print(f"dvc exp show: {name}: sr1024 max_steps {sr1024}, steps {steps}, scales {scales}")

    # their MLflow runs are in the checkout's store, and overlapped in time; each experiment
    # re-ran only the stages its change touches
    new = [r for r in _mlflow_runs(root) if r.info.run_id not in before_runs]
    parents = {
        r.data.tags.get("imagen.dvc.exp_name"): r
        for r in new
        if r.data.tags.get("imagen.kind") == "pipeline"
    }
    assert set(parents) == set(runs), [r.data.tags for r in new]
    a, b = parents["sr1024-steps"], parents["two-scales"]
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
    assert _children(new, a) == {"sr1024", "evaluate"}
    assert _children(new, b) == {"evaluate"}
    for parent in (a, b):
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["imagen.dvc.baseline_rev"]

    tables = {
        d.split("dvc exp apply ")[-1].strip("`"): rows
        for d, rows in _tables(worker, "imagen-cascade")[:2]
    }
    assert set(tables) == set(runs), tables.keys()
    print(json.dumps(tables["sr1024-steps"], indent=1))
    ran = {r["stage"]: r for r in tables["sr1024-steps"] if r["dvc"] == "ran"}
    assert set(ran) == {"train@sr1024", "evaluate"}
    assert ran["evaluate"]["files"].endswith("/artifacts")
    assert ran["train@sr1024"]["mlflow_run"] in ran["train@sr1024"]["files"]


def test_a_bad_override_fails_before_any_work_naming_the_key(worker: dict[str, Any]) -> None:
    root = worker["root"]
    before = _snapshot(root)
    result = _trigger(worker, 'overrides={"stages.base64.trainer.max_stepz": 3}')
    assert result.returncode != 0
    assert "Failed" in result.stdout, result.stdout[-3000:]
    log = worker["worker_log"].read_text()
    assert "max_stepz" in log, log[-4000:]
    assert _snapshot(root) == before
    assert run(["git", "worktree", "list", "--porcelain"], root).stdout.count("worktree ") == 1
