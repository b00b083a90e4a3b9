"""How a Prefect flow run with overrides leaves the checkout alone (flows/isolate.py), on a
two-stage DVC project of a few lines: the isolated copy sees exactly the checkout's state
(uncommitted edits, dvc.lock, outputs, an untracked dependency, the shared cache), re-runs only
what its params touch, comes back as a DVC experiment with its metrics, and goes away."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import env as project_env
from tiny import run

from flows import isolate
from imagen.config import ConfigError

STAGE1 = (
    "import yaml\np = yaml.safe_load(open('params.yaml'))\nopen('o1', 'w').write(str(p['a']))\n"
)
STAGE2 = """import json, yaml
p = yaml.safe_load(open('params.yaml'))
extra = int(open('extra/n').read())
json.dump({'m': p['b'] + int(open('o1').read()) + extra}, open('m.json', 'w'))
"""
DVC_YAML = f"""stages:
  s1:
    cmd: {sys.executable} s1.py
    deps: [s1.py]
    params: [a]
    outs: [o1]
  s2:
    cmd: {sys.executable} s2.py
    deps: [s2.py, o1, extra]
    params: [b]
    metrics:
      - m.json:
          cache: false
"""


def _ok(cmd: list[str], root: Path) -> str:
    res = run(cmd, root)
    assert res.returncode == 0, res.stdout
    return res.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    _ok(["git", "init", "-q"], root)
    _ok(["dvc", "init", "-q"], root)
    (root / "params.yaml").write_text("a: 1\nb: 2\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "s1.py").write_text(STAGE1)
    (root / "s2.py").write_text(STAGE2)
    (root / ".gitignore").write_text("/m.json\n/extra\n")
    (root / "notes.txt").write_text("committed\n")
    _ok(["git", "add", "-A"], root)
    _ok(["git", "commit", "-qm", "baseline"], root)
    (root / "extra").mkdir()  # a dependency git does not carry
    (root / "extra" / "n").write_text("10")
    (root / "notes.txt").write_text("edited, not committed\n")
    out = _ok(["dvc", "repro"], root)
    assert "Running stage 's2'" in out
    return root


def test_an_isolated_run_comes_back_as_an_experiment_and_leaves_the_checkout_alone(
    project: Path,
) -> None:
    root = project
    before = {f: (root / f).read_bytes() for f in ("params.yaml", "dvc.lock", "m.json", "o1")}
    baseline = isolate.baseline_rev(root)
    copy = isolate.isolated_copy(root, "b-is-5")
    # the copy is the checkout's state: nothing to re-run, the uncommitted edit is there
    assert (copy / "notes.txt").read_text() == "edited, not committed\n"
    assert "up to date" in _ok(["dvc", "status"], copy)

    (copy / "params.yaml").write_text("a: 1\nb: 5\n")  # what the flow's overrides do
    out = _ok(["dvc", "repro"], copy)
    assert "Running stage 's2'" in out and "Running stage 's1'" not in out
    assert json.loads((copy / "m.json").read_text()) == {"m": 16}
    saved = isolate.save_experiment(copy, "b-is-5", isolate.uncached_reports(copy))
    assert "b-is-5" in saved
    isolate.remove_copy(root, copy)

    # the checkout: byte-identical, no worktree left; the experiment with its param and metric
    assert {f: (root / f).read_bytes() for f in before} == before
    assert not copy.exists()
    worktrees = _ok(["git", "worktree", "list", "--porcelain"], root)
    assert worktrees.count("worktree ") == 1
    shown = json.loads(_ok(["dvc", "exp", "show", "--json"], root))
    [base] = [b for b in shown if b["rev"] == baseline]
    [exp] = [e for x in base["experiments"] for e in x["revs"] if e["name"] == "b-is-5"]
    assert exp["data"]["params"]["params.yaml"]["data"]["b"] == 5
    assert exp["data"]["metrics"]["m.json"]["data"]["m"] == 16

    # the name is now taken, and is refused before any work
    with pytest.raises(ConfigError, match="already exists"):
        isolate.check_new_experiment(root, "b-is-5")
    isolate.check_new_experiment(root, "another")


def test_experiment_names_and_a_checkout_without_a_commit_are_refused(tmp_path: Path) -> None:
    # a relative SQLite store is the checkout's, not the copy's
    assert isolate.anchored("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert isolate.anchored("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert isolate.anchored("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert isolate.experiment_name(None, "crafty lemur") == "prefect-crafty-lemur"
    assert isolate.experiment_name("steps50", "x") == "steps50"
    for bad in ("../up", "-x", "a b", "x.lock", "a..b"):
        with pytest.raises(ConfigError, match="experiment"):
            isolate.experiment_name(bad, None)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(ConfigError, match="git commit"):
        isolate.baseline_rev(tmp_path)


def test_a_second_flow_run_on_the_checkout_waits_for_the_first(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from flows.isolate import workspace_lock\n"
        "with workspace_lock(Path(sys.argv[1])):\n    print('holds it', flush=True)\n"
    )
    with isolate.workspace_lock(tmp_path):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=project_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert "waiting for it" in proc.stdout.readline()  # type: ignore[union-attr]
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting while this one holds the checkout
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "holds it" in out
