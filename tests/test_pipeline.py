"""The DVC pipeline end to end on tiny params: `dvc repro` of the whole cascade, caching,
narrow params dependencies, metrics, plots, experiments, and the MLflow run structure.

The data is a user's own folder (drawn pictures with captions the embedded grammar does not
know), so this is also the "your own images" path: the trained evaluator measures the sweep.
The Prefect test (tests/test_flow.py) runs the same pipeline on the embedded data."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny import copy_project, run, write_caption_folder

from imagen.mlops.experiments import by_name
from imagen.mlops.pipeline import CHECK_STAGES, DVC_STAGES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

STAGE_RUNS = {"ingest", "precache", "base64", "sr256", "sr1024", "evaluator", "evaluate"}


def _runs(root: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imagen")
    assert exp is not None, "no MLflow experiment 'imagen' was created"
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def _parents(runs: list[Any]) -> list[Any]:
    return [r for r in runs if r.data.tags.get("imagen.kind") == "pipeline"]


def _children(runs: list[Any], parent_id: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _ran(output: str) -> set[str]:
    """The stages that did work (DVC runs the source listing at every repro)."""
    return set(re.findall(r"Running stage '([^']+)'", output)) - set(CHECK_STAGES)


def _stale(root: Path) -> set[str]:
    status = run(["dvc", "status", "--json"], root)
    assert status.returncode == 0, status.stdout
    return set(json.loads(status.stdout)) - set(CHECK_STAGES)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("pipeline")
    folder = write_caption_folder(base / "my-images")
    data = {"data": {"source": "folder", "source_path": str(folder), "num_holdout": 8}}
    # the toy sizes' embed_dim unset: params.yaml's encoder_path auto gives a user's captions
    # the packaged pretrained MiniLM (at the toy token_length)
    text = {"model": {"conditioning": {"embed_dim": None}}}
    root = copy_project(base / "repo", {**data, **text})
    start = time.monotonic()
    first = run(["dvc", "repro"], root, timeout=1200)
    elapsed = time.monotonic() - start
    assert first.returncode == 0, first.stdout[-6000:]
    return {"root": root, "output": first.stdout, "seconds": elapsed}


def test_repro_runs_every_stage_and_writes_the_reports(project: dict[str, Any]) -> None:
    root = project["root"]
    # every stage of dvc.yaml ran, and they are the ones the timing summary and flow know
    assert _ran(project["output"]) == set(DVC_STAGES) - set(CHECK_STAGES)
    assert "Running stage 'source'" in project["output"]
    for stage in ("base64", "sr256", "sr1024"):
        assert (root / "models" / stage / "model.pt").is_file()
        assert json.loads((root / "models" / stage / "metrics.json").read_text())["steps"] >= 1
    reports = root / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["scales"] and "best" in metrics
    # the user's captions are measured by the trained evaluator, named for it
    assert (metrics["fidelity_metric"], metrics["alignment_metric"]) == (
        "fd_dual",
        "caption_auc_dual",
    )
    assert metrics["evaluator_quality"]["heldout"]["pairs"] == 8
    # the user's captions were encoded by the pretrained MiniLM, and precache said why
    assert "encoder_path auto: data.source is 'folder'" in project["output"]
    encoder = json.loads((root / "data/encoded/encoder.json").read_text())
    assert encoder["embed_dim"] == 384 and "minilm" in encoder["path"].lower()
    cut = json.loads((root / "data/encoded/manifest.json").read_text())["captions_cut"]
    assert (cut > 0) == ("were cut to it" in project["output"])
    assert "caption_agreement_embedded" not in metrics["scales"][0]
    # params.yaml's own_data recipe reached the base stage, and training said so
    assert "own_data recipe replaces the demo's values: stages.base64." in project["output"]
    # the SR stages run on the user's pictures too, their tiles measured by the evaluator
    assert metrics["sr256"]["fidelity_metric"] == "fd_dual" and (reports / "sr_sr256.png").exists()
    assert (reports / "fid_clip.csv").read_text().startswith("guidance_scale,")
    assert (reports / "fid_clip.png").stat().st_size > 0
    assert (reports / "cascade.png").stat().st_size > 0
    assert list((reports / "grids").glob("*.png"))
    assert (root / "dvc.lock").is_file()
    # the log speaks of the pipeline: no library's advice, advertisement or warning
    for noise in ("Add type hints", "UserWarning", "litlogger", "Epoch 0/", "Tip:"):
        assert noise not in project["output"], noise
    print(f"tiny dvc repro of the whole cascade: {project['seconds']:.0f} s")


def test_one_parent_run_holds_every_stage_run(project: dict[str, Any]) -> None:
    runs = _runs(project["root"])
    parents = _parents(runs)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["imagen.pipeline.trigger"] == "dvc repro"
    assert "imagen.pipeline.execution" in parent.data.tags
    children = _children(runs, parent.info.run_id)
    assert {r.data.tags["imagen.stage"] for r in children} == STAGE_RUNS
    assert len(children) == len(STAGE_RUNS)
    assert len(runs) == 1 + len(STAGE_RUNS)  # nothing unparented
    commit = parent.data.tags["mlflow.source.git.commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    for r in children:
        assert r.info.status == "FINISHED", r.data.tags["imagen.stage"]
        # the own_data recipe (base stage keys only) is tagged on the run it changed
        own = r.data.tags.get("imagen.own_data", "")
        assert ("p_mean=0.5" in own) == (r.data.tags["imagen.stage"] == "base64")
        assert r.data.tags["mlflow.source.git.commit"] == commit
        assert r.data.tags["imagen.params_hash"] == parent.data.tags["imagen.params_hash"]


def test_a_second_repro_does_nothing(project: dict[str, Any]) -> None:
    root = project["root"]
    before = len(_runs(root))
    start = time.monotonic()
    again = run(["dvc", "repro"], root)
    seconds = time.monotonic() - start
    assert again.returncode == 0, again.stdout
    assert _ran(again.stdout) == set()
    assert "didn't change, skipping" in again.stdout
    assert len(_runs(root)) == before
    assert seconds < 60, f"a no-op dvc repro took {seconds:.0f} s"


def test_an_image_added_to_the_folder_makes_ingest_stale(project: dict[str, Any]) -> None:
    """DVC sees the repository's files only: the source stage's listing of the user's folder
    is what tells it an image came or went."""
    root = project["root"]
    folder = Path(yaml.safe_load((root / "params.yaml").read_text())["data"]["source_path"])
    added = [folder / "added-later.png", folder / "added-later.txt"]
    shutil.copy(sorted(folder.glob("*.png"))[0], added[0])
    added[1].write_text("a picture added after the first repro")
    try:
        assert run(["dvc", "repro", "source"], root).returncode == 0
        assert _stale(root) == {"ingest"}
    finally:
        for f in added:
            f.unlink()
    assert run(["dvc", "repro", "source"], root).returncode == 0
    assert _stale(root) == set()


def test_the_demo_driver_prints_a_summary_and_leaves_no_empty_parent(
    project: dict[str, Any],
) -> None:
    root = project["root"]
    before = len(_runs(root))
    demo = run(["imagen", "pipeline", "repro"], root)  # what `make demo` runs
    assert demo.returncode == 0, demo.stdout
    summary = demo.stdout.split("Pipeline summary")[-1]
    for stage in ("ingest", "precache", "train@base64", "train@sr1024", "evaluate"):
        assert re.search(rf"^{re.escape(stage)}\s+skipped", summary, re.M), summary
    assert re.search(r"^total\s+[\d.]+s$", summary, re.M)
    assert len(_runs(root)) == before  # nothing ran, so no parent run is kept


def test_metrics_and_plots(project: dict[str, Any], tmp_path: Path) -> None:
    root = project["root"]
    shown = run(["dvc", "metrics", "show", "--json"], root)
    assert shown.returncode == 0, shown.stdout
    text = shown.stdout
    assert "reports/metrics.json" in text and "models/base64/metrics.json" in text
    assert "final_loss" in text and "seconds" in text
    plots = run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root)
    assert plots.returncode == 0, plots.stdout
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "fid_clip.csv" in html and "fid_clip.png" in html


def test_a_stage_param_change_makes_only_that_stage_stale(project: dict[str, Any]) -> None:
    root = project["root"]
    params_file = root / "params.yaml"
    original = params_file.read_text()
    try:
        for stage in ("base64", "sr256"):
            raw = yaml.safe_load(original)
            raw["stages"][stage]["trainer"]["max_steps"] += 1
            params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            # DVC reports the stage whose inputs changed; evaluate follows once its model does
            assert _stale(root) == {f"train@{stage}"}
            dry = run(["dvc", "repro", "--dry"], root)
            assert _ran(dry.stdout) == {f"train@{stage}"}, dry.stdout
    finally:
        params_file.write_text(original)
    assert _stale(root) == set()


def test_dvc_exp_run_reruns_exactly_what_a_base64_change_affects(project: dict[str, Any]) -> None:
    root = project["root"]
    before = {r.info.run_id for r in _runs(root)}
    steps = yaml.safe_load((root / "params.yaml").read_text())["stages"]["base64"]["trainer"][
        "max_steps"
    ]
    exp = run(
        ["dvc", "exp", "run", "-S", f"stages.base64.trainer.max_steps={steps + 1}"],
        root,
        timeout=900,
    )
    assert exp.returncode == 0, exp.stdout[-6000:]
    assert _ran(exp.stdout) == {"train@base64", "evaluate"}
    # training continued from the kept checkpoint to the new step count
    assert json.loads((root / "models/base64/metrics.json").read_text())["steps"] == steps + 1
    new = [r for r in _runs(root) if r.info.run_id not in before]
    parents = _parents(new)
    assert len(parents) == 1
    assert parents[0].data.tags["imagen.pipeline.trigger"] == "dvc exp run"
    assert parents[0].info.status == "FINISHED"
    children = _children(new, parents[0].info.run_id)
    assert sorted(r.data.tags["imagen.stage"] for r in children) == ["base64", "evaluate"]
    shown = run(["dvc", "exp", "show", "--json"], root)
    assert shown.returncode == 0, shown.stdout
    assert "stages.base64" in shown.stdout or "max_steps" in shown.stdout


def _steps(data: dict[str, Any], path: str) -> int:
    return data["metrics"][path]["data"]["steps"]


def test_queued_experiments_run_in_parallel_and_keep_everything(project: dict[str, Any]) -> None:
    """`dvc exp run --queue` x 2 + `dvc queue start -j 2`: each experiment's MLflow runs land in
    the project's store under one parent tagged with its name and baseline, `dvc exp show` has
    both experiments' metrics, only what the change touches re-runs, and `dvc exp apply` leaves
    checkpoints that agree with the model and a clean `dvc status`."""
    from imagen.train.checkpoints import read_info

    root = project["root"]
    # a clean baseline: the workspace as the earlier tests left it (dvc.lock too), committed
    assert run(["git", "add", "-A"], root).returncode == 0
    assert run(["git", "commit", "-qm", "baseline"], root).returncode == 0
    baseline = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    before = {r.info.run_id for r in _runs(root)}
    names = {"sr-a": 3, "sr-b": 4}
    for name, steps in names.items():
        q = run(["dvc", "exp", "run", "--queue", "-n", name,
                 "-S", f"stages.sr256.trainer.max_steps={steps}"], root)  # fmt: skip
        assert q.returncode == 0, q.stdout
    start = time.monotonic()
    try:
        assert run(["dvc", "queue", "start", "-j", "2"], root).returncode == 0
        while time.monotonic() - start < 900:
            status = run(["dvc", "queue", "status"], root).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(3)
        seconds = time.monotonic() - start
    finally:
        run(["dvc", "queue", "stop", "--kill"], root)
    assert re.findall(r"\bSuccess\b", status) == ["Success"] * 2, status
    for name in names:  # each re-ran what its change touches, and nothing else
        logs = run(["dvc", "queue", "logs", name], root).stdout
        assert _ran(logs) == {"train@sr256", "evaluate"}, logs[-3000:]
    # every MLflow run is in the project's store, one parent per experiment
    new = [r for r in _runs(root) if r.info.run_id not in before]
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
    parents = {p.data.tags.get("imagen.dvc.exp_name"): p for p in _parents(new)}
    assert set(parents) == set(names), [p.data.tags for p in _parents(new)]
    spans = []
    for name, parent in parents.items():
        assert parent.data.tags["imagen.dvc.baseline_rev"] == baseline
        assert parent.data.tags["imagen.pipeline.trigger"] == "dvc exp run"
        children = _children(new, parent.info.run_id)
        assert sorted(r.data.tags["imagen.stage"] for r in children) == ["evaluate", "sr256"]
        assert all(r.info.status == "FINISHED" for r in children), name
        assert all(r.data.tags["imagen.dvc.exp_name"] == name for r in children)
        spans.append((min(r.info.start_time for r in children),
                      max(r.info.end_time for r in children)))  # fmt: skip
    assert len(new) == 2 * 3  # nothing unparented
    overlap = min(e for _, e in spans) - max(s for s, _ in spans)
    # `dvc exp show` has both experiments' metrics (read from the cache by the exp commits)
    shown = run(["dvc", "exp", "show", "--json"], root)
    assert shown.returncode == 0, shown.stdout
    exps = by_name(json.loads(shown.stdout))
    for name, steps in names.items():
        assert _steps(exps[name], "models/sr256/metrics.json") == steps, exps.get(name)
        assert "reports/metrics.json" in exps[name]["metrics"]
    # apply one: its model, metrics and checkpoints come back together, nothing is stale
    applied = run(["dvc", "exp", "apply", "sr-b"], root)
    assert applied.returncode == 0, applied.stdout
    assert _stale(root) == set()
    metrics = json.loads((root / "models/sr256/metrics.json").read_text())
    assert metrics["steps"] == 4
    assert read_info(root / "models/sr256/checkpoints/last.ckpt").step == 4
    print(f"two queued experiments (-j 2): {seconds:.0f} s, stage runs overlapped "
          f"{overlap / 1000:.0f} s; runs {len(before)} -> {len(before) + len(new)}")  # fmt: skip
