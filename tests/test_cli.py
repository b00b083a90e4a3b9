"""The `imagen` command and the pipeline helpers behind `make demo` and the Prefect flow:
parent runs, DVC execution detection, stage timing, params overrides."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagen.cli import main as imagen_main
from imagen.config import ConfigError
from imagen.mlops.parent import (
    EXECUTION_TAG,
    TRIGGER_TAG,
    _dvc_command,
    create_parent_run,
    end_parent_run,
    execution_parent_run,
    latest_parent_run,
    stage_runs,
)
from imagen.mlops.pipeline import ReproTimer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml and its own MLflow SQLite store."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("IMAGEN_PARENT_RUN_ID", raising=False)
    return tmp_path


def _params():
    from imagen.config import load_params

    return load_params("params.yaml")


def test_help_lists_every_stage_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        imagen_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("ingest", "precache", "train", "evaluate", "pipeline"):
        assert name in out


def test_misspelt_override_is_rejected_with_its_key(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = imagen_main(["pipeline", "-S", "stages.base64.trainer.max_stepz=3", "runs"])
    assert rc == 2
    assert "stages.base64.trainer.max_stepz" in capsys.readouterr().err


def test_the_learn_profile_resolves_to_its_documented_recipe(tmp_path: Path) -> None:
    """profiles/learn.yaml (README, docs/recipe.md) validates against params.yaml, its keys land
    where they are meant to, and a misspelt key in a profile is refused by name."""
    from imagen.cli import profile_overrides
    from imagen.config import load_params

    params = load_params(
        REPO / "params.yaml", profile_overrides([str(REPO / "profiles" / "learn.yaml")])
    )
    base = params.stages["base64"]
    assert params.conditioning.encoder.tokenizer == "word"
    assert base.model.unet.image_size == 32 and params.data.image_size == 64
    assert (base.model.preconditioning.p_mean, base.model.preconditioning.p_std) == (0.5, 1.5)
    assert (base.trainer.batch_size, base.trainer.max_steps) == (32, 8000)
    assert base.trainer.progressive is None  # the demo's 32 px steps would be its own size
    assert params.data.shards_dir == "data/learn/shards" and params.models_dir == "models/learn"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages.base64.trainer.max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"stages\.base64\.trainer\.max_stepz"):
        load_params(REPO / "params.yaml", profile_overrides([str(bad)]))


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/v/bin/python", "/v/bin/dvc", "repro"], "dvc repro"),
        (["/v/bin/dvc", "exp", "run", "-S", "seed=1"], "dvc exp run"),
        (["python3", "-m", "dvc", "repro", "-s", "ingest"], "dvc repro"),
        (["/v/bin/python", "/v/bin/imagen", "train"], None),
        (["bash", "-c", "dvc repro"], None),
    ],
)
def test_dvc_command_lines_are_recognised(cmdline: list[str], expected: str | None) -> None:
    assert _dvc_command(cmdline) == expected


def test_a_process_finds_the_dvc_process_it_runs_under(tmp_path: Path) -> None:
    # A real process tree: an executable named `dvc` starts a Python child that looks upwards.
    dvc = tmp_path / "dvc"
    probe = (
        "from imagen.mlops.parent import find_dvc_execution as f; e = f(); "
        "print(e.pid, e.command, e.key)"
    )
    dvc.write_text(f"#!/bin/sh\n'{sys.executable}' -c '{probe}'\n")
    dvc.chmod(dvc.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(
        [str(dvc), "repro"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    pid, command, key = int(out[0]), " ".join(out[1:3]), out[3]
    assert command == "dvc repro"
    assert key.split(":")[1] == str(pid)
    assert pid != os.getpid()


def test_outside_dvc_there_is_no_execution_parent(workdir: Path) -> None:
    assert execution_parent_run(_params()) is None


def test_repro_timer_follows_dvc_output() -> None:
    lines = [
        (-1.0, "Running stage 'source':"),
        (-0.5, "> imagen ingest --fingerprint data/source.json"),
        (0.0, "Stage 'ingest' didn't change, skipping"),
        (1.0, "Running stage 'train@base64':"),
        (1.5, "> imagen train --stage base64"),
        (9.0, "Updating lock file 'dvc.lock'"),
        (9.5, "Running stage 'evaluate':"),
        (12.0, "> imagen evaluate"),
    ]
    timer = ReproTimer()
    for t, line in lines:
        timer.feed(line, now=t)
    stages = timer.finish(ok=False, now=14.0)
    assert [(s.stage, s.status) for s in stages] == [
        ("source", "checked"),  # DVC runs it at every repro: a listing, not work
        ("ingest", "skipped"),
        ("train@base64", "ran"),
        ("evaluate", "failed"),
    ]
    assert stages[2].seconds == pytest.approx(8.0)
    assert stages[3].seconds == pytest.approx(4.5)
    assert "train@base64" in timer.summary(14.0)


def test_stage_runs_nest_under_the_parent_and_the_parent_reports_failures(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagen.mlops.tracking import stage_run

    params = _params()
    parent = create_parent_run(params, "test")
    monkeypatch.setenv("IMAGEN_PARENT_RUN_ID", parent)
    with stage_run(params, "ingest") as run:
        run.log_metrics({"samples": 3})
    with pytest.raises(RuntimeError), stage_run(params, "precache"):
        raise RuntimeError("boom")
    children = stage_runs(params, parent)
    assert [r.data.tags["imagen.stage"] for r in children] == ["ingest", "precache"]
    assert [r.info.status for r in children] == ["FINISHED", "FAILED"]
    assert end_parent_run(params, parent) == "FAILED"
    latest = latest_parent_run(params)
    assert latest.info.run_id == parent
    assert latest.data.tags[TRIGGER_TAG] == "test"
    assert "imagen.params_hash" in latest.data.tags
    assert EXECUTION_TAG not in latest.data.tags


def test_pipeline_runs_prints_the_parent_and_its_stages(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagen.mlops.tracking import stage_run

    assert imagen_main(["pipeline", "runs"]) == 1  # nothing yet
    assert imagen_main(["pipeline", "parent-run", "--new", "--trigger", "cli"]) == 0
    parent = capsys.readouterr().out.strip().splitlines()[-1]
    monkeypatch.setenv("IMAGEN_PARENT_RUN_ID", parent)
    with stage_run(_params(), "ingest"):
        pass
    assert imagen_main(["pipeline", "runs"]) == 0
    out = capsys.readouterr().out
    assert f"parent  {parent}" in out
    assert "FINISHED" in out and "ingest" in out


def test_flow_overrides_are_validated_then_written_with_comments_kept(tmp_path: Path) -> None:
    from flows.cascade import apply_overrides

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="stages.base64.trainer.max_stepz"):
        apply_overrides(tmp_path, {"stages.base64.trainer.max_stepz": 5})
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    params = apply_overrides(
        tmp_path, {"stages.base64.trainer.max_steps": 5, "evaluate.guidance_scales": [1, 2]}
    )
    assert params.stage("base64").trainer.max_steps == 5
    text = (tmp_path / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["stages"]["base64"]["trainer"]["max_steps"] == 5
    assert raw["evaluate"]["guidance_scales"] == [1, 2]
    assert "# The one file a user edits" in text  # comments survive


def test_stage_failure_classification() -> None:
    from flows.cascade import StageFailed

    config = StageFailed("ingest", 255, ["ERROR: failed to run: imagen ingest, exited with 2"])
    crash = StageFailed("ingest", 255, ["ERROR: failed to run: imagen ingest, exited with -9"])
    lock = StageFailed("ingest", 255, ["ERROR: Unable to acquire lock"])
    assert not config.transient
    assert crash.transient and lock.transient
