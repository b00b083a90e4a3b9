"""One MLflow parent run per pipeline execution, whoever started it.

Every stage (ingest, precache, train@<stage>, evaluate) logs one MLflow child run; the runs of
one pipeline execution hang under one parent run:

- ``make demo`` (``imagen pipeline repro``) and the Prefect flow create the parent run first and
  pass it to every stage in ``$IMAGEN_PARENT_RUN_ID``;
- a bare ``dvc repro`` or ``dvc exp run`` passes nothing, so the first stage that runs finds
  the ``dvc`` process it runs under (walking up the process tree), names the execution by that
  process's host, pid and start time, and creates a parent run tagged with that name; the later
  stages of the same execution find it by the tag (:func:`execution_parent_run`);
- a DVC experiment (``dvc exp run``, ``--temp``, ``--queue`` + ``dvc queue start -j N``) adds
  DVC's own experiment name and baseline revision (``$DVC_EXP_NAME``,
  ``$DVC_EXP_BASELINE_REV``) to that name, so one queue worker running several experiments, or
  several workers at once, give one parent per experiment, tagged ``imagen.dvc.exp_name`` and
  ``imagen.dvc.baseline_rev`` (:func:`experiment_parent_runs` finds them by name).

:func:`resolve_parent_run_id` consults these in order: an explicit id, ``$IMAGEN_PARENT_RUN_ID``,
the enclosing DVC execution, the file ``.imagen/parent_run``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagen.config import Params
from imagen.mlops.client import (
    EXP_NAME_TAG,
    client_and_experiment,
    dvc_experiment,
    reachable,
    retry_locked,
    run_tags,
    tracking_uri,
)

PARENT_ENV = "IMAGEN_PARENT_RUN_ID"
PARENT_RUN_FILE = Path(".imagen/parent_run")
EXECUTION_TAG = "imagen.pipeline.execution"
TRIGGER_TAG = "imagen.pipeline.trigger"
KIND_TAG = "imagen.kind"


# --------------------------------------------------------------------------------------------
# Which pipeline execution is this process part of?
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DvcExecution:
    """The ``dvc`` process a stage runs under: its identity and what it was asked to do."""

    pid: int
    started: float
    command: str  # e.g. "dvc repro", "dvc exp run"

    @property
    def key(self) -> str:
        """Unique across time on this host: a pid is reused, pid + start time is not."""
        return f"{socket.gethostname()}:{self.pid}:{self.started:.2f}"


def _dvc_command(cmdline: Sequence[str]) -> str | None:
    """``"dvc repro"`` when ``cmdline`` is a DVC command line, else None."""
    for i, arg in enumerate(cmdline[:3]):
        name = os.path.basename(arg)
        is_module = arg == "dvc" and i > 0 and cmdline[i - 1] == "-m"
        if name == "dvc" or is_module:
            words = [a for a in cmdline[i + 1 :] if not a.startswith("-")][:2]
            if words[:1] == ["exp"]:
                return "dvc " + " ".join(words)
            return "dvc " + (words[0] if words else "")
    return None


def find_dvc_execution(pid: int | None = None) -> DvcExecution | None:
    """The nearest ``dvc`` ancestor of process ``pid`` (default: this process), or None."""
    import psutil

    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None:
            try:
                command = _dvc_command(proc.cmdline())
            except (psutil.AccessDenied, psutil.ZombieProcess):
                command = None
            if command is not None:
                return DvcExecution(proc.pid, proc.create_time(), command.strip())
            proc = proc.parent()
    except psutil.NoSuchProcess:
        return None
    return None


# --------------------------------------------------------------------------------------------
# Parent runs
# --------------------------------------------------------------------------------------------
def create_parent_run(
    params: Params,
    trigger: str,
    *,
    execution: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create the parent run of one pipeline execution; return its id.

    Tagged with the trigger (``make demo``, ``prefect``, ``dvc repro`` ...), the git commit,
    the params hash and, for a DVC-started execution, the execution key.
    """
    client, exp_id = client_and_experiment(params)
    exp_name = dvc_experiment().get(EXP_NAME_TAG)
    what = f"{trigger} {exp_name}" if exp_name and exp_name not in trigger else trigger
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')} ({what})"
    all_tags = run_tags(
        params, name, tags, **{KIND_TAG: "pipeline", TRIGGER_TAG: trigger, EXECUTION_TAG: execution}
    )
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    return run.info.run_id


def _runs_tagged(params: Params, tag: str, value: str, order: str, limit: int) -> list[Any]:
    """Runs of the experiment whose ``tag`` is ``value``, by start time (ASC or DESC)."""
    client, exp_id = client_and_experiment(params)
    return list(
        client.search_runs(
            [exp_id],
            filter_string=f"tags.`{tag}` = '{value}'",
            order_by=[f"attributes.start_time {order}"],
            max_results=limit,
        )
    )


def stage_runs(params: Params, parent_run_id: str) -> list[Any]:
    """The stage runs nested under ``parent_run_id``, oldest first."""
    return _runs_tagged(params, "mlflow.parentRunId", parent_run_id, "ASC", 1000)


def end_parent_run(params: Params, parent_run_id: str, status: str | None = None) -> str:
    """Mark the parent run terminated; ``status`` None: FAILED if a stage run failed, else
    FINISHED. Returns the status set."""
    client, _ = client_and_experiment(params)
    if status is None:
        failed = any(
            r.info.status in ("FAILED", "KILLED") for r in stage_runs(params, parent_run_id)
        )
        status = "FAILED" if failed else "FINISHED"
    client.set_terminated(parent_run_id, status)
    return status


def experiment_parent_runs(params: Params, exp_name: str) -> list[Any]:
    """The parent runs of DVC experiment ``exp_name`` (``dvc exp run -n NAME`` or DVC's
    generated name), newest first: where a caller that queued an experiment finds its runs."""
    return [
        r
        for r in _runs_tagged(params, EXP_NAME_TAG, exp_name, "DESC", 100)
        if r.data.tags.get(KIND_TAG) == "pipeline"
    ]


def execution_key() -> tuple[str, str] | None:
    """(key, trigger) of the DVC execution this process runs under, or None outside DVC.

    The key is the ``dvc`` process (host, pid, start time) and, inside a DVC experiment, the
    experiment's name and baseline revision: a queue worker runs several experiments in one
    process, and they must not share a parent.
    """
    execution = find_dvc_execution()
    exp = dvc_experiment()
    if execution is None and not exp:
        return None
    key = execution.key if execution is not None else socket.gethostname()
    if exp:
        name = exp.get(EXP_NAME_TAG, "")
        base = exp.get("imagen.dvc.baseline_rev", "")
        return f"{key}|exp:{name}@{base}", "dvc exp run"
    assert execution is not None
    return key, execution.command


def latest_parent_run(params: Params) -> Any | None:
    """The most recently started parent run of the experiment, or None."""
    runs = _runs_tagged(params, KIND_TAG, "pipeline", "DESC", 1)
    return runs[0] if runs else None


_closing: set[str] = set()


def execution_parent_run(params: Params | None) -> str | None:
    """The parent run of the ``dvc repro`` / ``dvc exp run`` this process runs under.

    Found by the execution's tag, or created by the first stage of the execution. The parent is
    marked RUNNING while a stage runs; when this process exits it is marked FINISHED (or FAILED
    if one of its stage runs failed), so after the last stage it shows the execution's outcome.
    Returns None outside DVC or when tracking is unavailable (a stage never fails for this).
    """
    if params is None:
        return None
    found_key = execution_key()
    if found_key is None:
        return None
    key, command = found_key
    if reachable(tracking_uri(params)) is not None:
        return None  # the stage itself reports the unreachable server
    try:
        run_id = retry_locked(lambda: _find_or_create(params, key, command))
    except Exception as e:  # noqa: BLE001 - tracking must never stop a stage
        print(f"imagen: no MLflow parent run for this DVC execution ({e})", file=sys.stderr)
        return None
    if run_id not in _closing:
        _closing.add(run_id)
        atexit.register(_end_quietly, params, run_id)
    return run_id


def _find_or_create(params: Params, key: str, command: str) -> str:
    client, exp_id = client_and_experiment(params)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    return create_parent_run(params, command, execution=key)


def _end_quietly(params: Params, run_id: str) -> None:
    # at exit: a failure here must not change the stage's own outcome
    with contextlib.suppress(Exception):
        end_parent_run(params, run_id)


def resolve_parent_run_id(explicit: str | None = None, params: Params | None = None) -> str | None:
    """The pipeline's parent run: explicit, else $IMAGEN_PARENT_RUN_ID, else (given ``params``)
    the parent run of the ``dvc repro`` / ``dvc exp run`` this process runs under
    (:func:`execution_parent_run`), else .imagen/parent_run."""
    if explicit:
        return explicit
    env = os.environ.get(PARENT_ENV)
    if env:
        return env
    if params is not None:
        found = execution_parent_run(params)
        if found:
            return found
    if PARENT_RUN_FILE.is_file():
        text = PARENT_RUN_FILE.read_text().strip()
        return text or None
    return None
