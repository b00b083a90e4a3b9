"""Where a flow run works: the checkout itself (one run at a time), or an isolated copy whose
results come back as a DVC experiment.

A flow run without overrides reproduces the checkout's pipeline in the checkout, as ``dvc
repro`` does, holding :func:`workspace_lock` so a second flow run on the same checkout waits
instead of failing on DVC's own lock.

A flow run with overrides never edits the checkout. :func:`isolated_copy` makes a git worktree
of the checkout's HEAD under ``.dvc/tmp/flows/<experiment>`` (git-ignored), brings in the
checkout's uncommitted changes, its untracked files (``dvc.lock``), its local DVC config and
every stage output and untracked dependency, and points the copy's DVC cache at the checkout's:
DVC then sees exactly the checkout's state and re-runs only the stages the overrides touch.
The overrides are written into the copy's params.yaml; :func:`save_experiment` records the
result with ``dvc exp save`` as a DVC experiment of the checkout (a worktree shares its refs),
its metrics and plots files included, so ``dvc exp show`` lists it and ``dvc exp apply <name>``
brings it into the checkout. The copy is removed after a successful run and kept, with its
path in the log, after a failed one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from imagen.config import ConfigError

COPIES_DIR = Path(".dvc") / "tmp" / "flows"
LOCK_FILE = Path(".dvc") / "tmp" / "imagen-flow.lock"
# DVC's own experiment variables (DVC 3: dvc/env.py): the stages tag their MLflow runs with them.
EXP_NAME_ENV = "DVC_EXP_NAME"
EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {res.stderr.strip()}")
    return res


def _dvc_bin() -> str:
    """The dvc command of this environment (beside its Python), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.is_file() else "dvc"


def _dvc(root: Path, *args: str) -> str:
    res = subprocess.run(
        [_dvc_bin(), *args], cwd=root, capture_output=True, text=True, check=False, env=_dvc_env()
    )
    if res.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}:\n{res.stdout}{res.stderr}")
    return res.stdout


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def anchored(uri: str, root: Path) -> str:
    """A relative ``sqlite:///file.db`` tracking URI made absolute under ``root``: the copy's
    stages log to the checkout's store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel, sep, query = uri[len("sqlite:///") :].partition("?")
        if rel and rel != ":memory:":
            return f"sqlite:///{root / rel}{sep}{query}"
    return uri


def experiment_name(name: str | None, flow_run_name: str | None) -> str:
    """The DVC experiment name: ``name``, else ``prefect-<flow run name>``, else a timestamp.

    Raises ConfigError if ``name`` is not a valid experiment name."""
    if name:
        if not _NAME.fullmatch(name) or name.endswith((".", ".lock")) or ".." in name:
            raise ConfigError(
                f"experiment: {name!r} is not a valid DVC experiment name (letters, digits, "
                "'-', '_' and '.', starting with a letter or digit)"
            )
        return name
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run_name or "").strip("-")
    return f"prefect-{base}" if base else time.strftime("prefect-%Y%m%d-%H%M%S")


def baseline_rev(root: Path) -> str:
    """The checkout's HEAD commit. Raises ConfigError when it has none (experiments need one)."""
    res = _git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    if res.returncode != 0:
        raise ConfigError(
            f"overrides: they run as a DVC experiment, which needs a git commit in {root} "
            "(git add -A && git commit -m baseline)"
        )
    return res.stdout.strip()


def check_new_experiment(root: Path, name: str) -> None:
    """Raise ConfigError if the checkout already has an experiment called ``name``."""
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    if any(r.rsplit("/", 1)[-1] == name for r in refs):
        raise ConfigError(
            f"experiment: {name!r} already exists (dvc exp show); choose another name or "
            f"remove it with dvc exp remove {name}"
        )


@contextmanager
def workspace_lock(root: Path, log: object = print) -> Iterator[None]:
    """Hold the checkout's flow lock (``.dvc/tmp/imagen-flow.lock``); wait for it if another
    flow run holds it, saying so."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log(f"another flow run holds {root} ({path}); waiting for it")  # type: ignore[operator]
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _stage_paths(root: Path) -> tuple[list[Path], list[Path]]:
    """Every stage's local outputs and dependencies, as absolute paths."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [Path(o.fs_path) for o in repo.index.outs if o.protocol == "local"]
        deps = [Path(d.fs_path) for d in repo.index.deps if d.protocol == "local"]
        cache = repo.cache.local_cache_dir
    return outs, deps + [Path(cache)]


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    elif src.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def isolated_copy(root: Path, name: str) -> Path:
    """A git worktree of ``root``'s HEAD with ``root``'s working-tree state and stage outputs,
    sharing ``root``'s DVC cache; returns its path."""
    dest = root / COPIES_DIR / name
    if dest.exists():
        raise ConfigError(f"experiment: {dest} exists (a kept copy of a failed run?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", "-q", str(dest), "HEAD")
    try:
        _fill_copy(root, dest)
    except BaseException:
        remove_copy(root, dest)
        raise
    return dest


def _fill_copy(root: Path, dest: Path) -> None:
    """Bring ``root``'s working-tree state, outputs and DVC cache into the worktree ``dest``."""
    # the checkout's uncommitted edits, untracked files (dvc.lock) and deletions
    changed = _git(root, "ls-files", "-z", "--modified", "--others", "--exclude-standard")
    for rel in filter(None, changed.stdout.split("\0")):
        if (root / rel).is_file():
            _copy(root / rel, dest / rel)
    deleted = _git(root, "ls-files", "-z", "--deleted").stdout
    for rel in filter(None, deleted.split("\0")):
        (dest / rel).unlink(missing_ok=True)
    local = root / ".dvc" / "config.local"
    if local.is_file():
        _copy(local, dest / ".dvc" / "config.local")
    outs, deps = _stage_paths(root)
    cache = deps.pop()
    _dvc(dest, "cache", "dir", "--local", str(cache))
    tracked = set(filter(None, _git(root, "ls-files", "-z").stdout.split("\0")))
    for path in outs + deps:
        rel = path.relative_to(root)
        inside = str(rel) in tracked or any(t.startswith(f"{rel}/") for t in tracked)
        if path in outs or not inside:  # outputs, and dependencies git does not carry
            _copy(path, dest / rel)


def save_experiment(copy: Path, name: str, include: list[Path]) -> str:
    """``dvc exp save -n <name>`` in the copy, with ``include`` (metrics and plots files that
    git ignores); returns DVC's message."""
    args = ["exp", "save", "-n", name]
    for path in include:
        if path.is_file():
            args += ["-I", str(path.relative_to(copy))]
    return _dvc(copy, *args).strip()


def uncached_reports(copy: Path) -> list[Path]:
    """The copy's metrics and plots files (JSON, CSV) that DVC does not cache."""
    from dvc.repo import Repo

    with Repo(str(copy)) as repo:
        files = [
            Path(o.fs_path)
            for o in repo.index.outs
            if o.protocol == "local" and not o.use_cache and (o.metric or o.plot)
        ]
    return [f for f in files if f.suffix in (".json", ".csv", ".tsv", ".yaml")]


def remove_copy(root: Path, copy: Path) -> None:
    """Remove the worktree ``copy`` of ``root`` (its files and git's record of it)."""
    res = _git(root, "worktree", "remove", "--force", str(copy), check=False)
    if res.returncode != 0 and copy.exists():
        shutil.rmtree(copy, ignore_errors=True)
    _git(root, "worktree", "prune", check=False)
