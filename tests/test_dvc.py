"""dvc.yaml's dependencies: a change that can alter a stage's output makes the stage stale.

The first test walks each stage command's imports (tests/test_layout.py's walker) and checks
that every module it reaches is a dependency. The second edits files in a temporary copy of the
project and asks DVC itself: a preset value makes train stale; a helper train does not use
does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_layout import ROOT, graph, modules

# The module behind each stage's command. The MLflow glue (imagen.mlops) and the CLI dispatcher
# log and dispatch; they compute nothing a stage writes, so they are not dependencies.
ENTRY = {
    "ingest": "imagen.data.ingest",
    "precache": "imagen.data.precache",
    "train": "imagen.train",
    "evaluator": "imagen.evaluate.dual_stage",
    "evaluate": "imagen.evaluate.stage",
}
NOT_OUTPUT = ("imagen.mlops", "imagen.cli")


def closure(entry: str) -> set[str]:
    g, seen, todo = graph(), set(), [entry]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    return {m for m in seen if m != "imagen" and not m.startswith(NOT_OUTPUT)}


def stage_deps(name: str) -> list[str]:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    return list(stage.get("do", stage)["deps"])


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_every_imported_module_is_a_dependency(stage: str) -> None:
    files = modules()
    deps = stage_deps(stage)
    missing = sorted(
        files[m].relative_to(ROOT).as_posix()
        for m in closure(ENTRY[stage])
        if not covered(files[m], deps)
    )
    assert not missing, f"dvc.yaml stage {stage} imports but does not depend on: {missing}"


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    out = subprocess.run(
        [str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_dvc_status_sees_a_preset_edit_and_ignores_unused_code(tmp_path: Path) -> None:
    work = tmp_path / "project"
    top_level = {"data", "models", "reports", "mlruns", "mlartifacts", "dvc.lock", ".git"}
    anywhere = shutil.ignore_patterns(
        ".venv", "*.db", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "cache", "tmp"
    )

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(anywhere(folder, names))
        return skip | (top_level & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, work, ignore=ignore)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    # the stage's data dependencies and outputs, as a finished run leaves them
    for d in ("data/encoded", "data/encoder", "data/init", "models/base64/samples"):
        (work / d).mkdir(parents=True, exist_ok=True)
        (work / d / "x").write_text("x")
    for f in ("model.pt", "metrics.json", "loss.csv"):
        (work / "models/base64" / f).write_text("{}" if f == "metrics.json" else "x")
    (work / "models/base64/checkpoints").mkdir()
    _dvc(work, "commit", "-f", "-q", "train@base64")
    assert "up to date" in _dvc(work, "status", "train@base64")

    helper = work / "imagen/mlops/pipeline.py"  # not imported by train
    helper.write_text(helper.read_text() + "\n\ndef _unused(x):\n    return x + 1\n")
    assert "up to date" in _dvc(work, "status", "train@base64")

    presets = work / "imagen/presets.py"
    text = presets.read_text()
    assert "embed_dim=16," in text  # the small base preset's width
    presets.write_text(text.replace("embed_dim=16,", "embed_dim=12,", 1))
    status = _dvc(work, "status", "train@base64")
    assert "changed deps" in status and "imagen/presets.py" in status, status
