"""A throw-away copy of this repository with tiny params, for the pipeline and flow tests.

The copy holds the tracked and untracked (not ignored) files, its own git history (one commit:
DVC experiments and the runs' git-commit tag need one) and params.yaml with
tests/params_tiny.yaml merged over it, so the tests follow the real params layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from imagen.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "tests" / "params_tiny.yaml"


def project_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for commands run in the copy: this venv first on PATH, the copy's code on
    PYTHONPATH (before the editable install of the original), a local MLflow database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IMAGEN_"))}
    env.pop("PREFECT_API_URL", None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(root),
        IMAGEN_THREADS="2",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.update(extra)
    return env


def tiny_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = deep_merge(raw, yaml.safe_load(TINY.read_text()))
    return deep_merge(raw, overrides or {})


def copy_project(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the repository to ``dest`` with tiny params and commit it; returns ``dest``."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listed):
        src = REPO / rel
        if not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def run(
    cmd: list[str], root: Path, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the copy; the result keeps stdout and stderr merged in ``.stdout``."""
    return subprocess.run(
        cmd,
        cwd=root,
        env=project_env(root, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
