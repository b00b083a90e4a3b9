"""Pipeline orchestration: one MLflow parent run per pipeline execution, timed `dvc repro`.

Every stage (ingest, precache, train@<stage>, evaluate) logs one MLflow child run; the runs of
one pipeline execution hang under one parent run, whoever started the execution:

- ``make demo`` (``imagen pipeline repro``) and the Prefect flow create the parent run first and
  pass it to every stage in ``$IMAGEN_PARENT_RUN_ID``;
- a bare ``dvc repro`` or ``dvc exp run`` passes nothing, so the first stage that runs finds
  the ``dvc`` process it runs under (walking up the process tree), names the execution by that
  process's host, pid and start time, and creates a parent run tagged with that name; the later
  stages of the same execution find it by the tag (:func:`execution_parent_run`).

:func:`imagen.tracking.resolve_parent_run_id` consults these in order: an explicit id,
``$IMAGEN_PARENT_RUN_ID``, the enclosing DVC execution, the file ``.imagen/parent_run``.

Sub-commands (``imagen pipeline <action>``):

- ``repro [DVC ARGS]``  run ``dvc repro`` under a new parent run, time each stage, print a summary
- ``parent-run``        print (and with ``--new`` create) the parent run id for this context
- ``runs``              print the latest parent run and its stage runs
- ``ui``                serve the MLflow UI on 127.0.0.1
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.config import Params

PARENT_ENV = "IMAGEN_PARENT_RUN_ID"
EXECUTION_TAG = "imagen.pipeline.execution"
TRIGGER_TAG = "imagen.pipeline.trigger"
KIND_TAG = "imagen.kind"
STAGES: tuple[str, ...] = (
    "ingest",
    "precache",
    "train@base64",
    "train@sr256",
    "train@sr1024",
    "evaluate",
)

# What `dvc repro` prints around each stage (DVC 3).
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_LOCK = re.compile(r"^Updating lock file")


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
def _client(params: Params) -> tuple[Any, str]:
    """An MlflowClient for the configured tracking URI and the experiment id (created here)."""
    from mlflow import MlflowClient

    from imagen.tracking import artifact_location, tracking_uri

    uri = tracking_uri(params)
    client = MlflowClient(tracking_uri=uri)
    name = params.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return client, exp.experiment_id
    try:
        return client, client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 - created by another process a moment ago
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return client, exp.experiment_id


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
    from imagen.tracking import run_tags

    client, exp_id = _client(params)
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')} ({trigger})"
    all_tags = run_tags(
        params, name, tags, **{KIND_TAG: "pipeline", TRIGGER_TAG: trigger, EXECUTION_TAG: execution}
    )
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    return run.info.run_id


def stage_runs(params: Params, parent_run_id: str) -> list[Any]:
    """The stage runs nested under ``parent_run_id``, oldest first."""
    client, exp_id = _client(params)
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    return list(runs)


def end_parent_run(params: Params, parent_run_id: str, status: str | None = None) -> str:
    """Mark the parent run terminated; ``status`` None: FAILED if a stage run failed, else
    FINISHED. Returns the status set."""
    client, _ = _client(params)
    if status is None:
        failed = any(
            r.info.status in ("FAILED", "KILLED") for r in stage_runs(params, parent_run_id)
        )
        status = "FAILED" if failed else "FINISHED"
    client.set_terminated(parent_run_id, status)
    return status


def latest_parent_run(params: Params) -> Any | None:
    """The most recently started parent run of the experiment, or None."""
    client, exp_id = _client(params)
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
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
    execution = find_dvc_execution()
    if execution is None:
        return None
    from imagen.tracking import _reachable, tracking_uri

    if _reachable(tracking_uri(params)) is not None:
        return None  # the stage itself reports the unreachable server
    try:
        client, exp_id = _client(params)
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{EXECUTION_TAG}` = '{execution.key}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = create_parent_run(params, execution.command, execution=execution.key)
    except Exception as e:  # noqa: BLE001 - tracking must never stop a stage
        print(f"imagen: no MLflow parent run for this DVC execution ({e})", file=sys.stderr)
        return None
    if run_id not in _closing:
        _closing.add(run_id)
        atexit.register(_end_quietly, params, run_id)
    return run_id


def _end_quietly(params: Params, run_id: str) -> None:
    # at exit: a failure here must not change the stage's own outcome
    with contextlib.suppress(Exception):
        end_parent_run(params, run_id)


# --------------------------------------------------------------------------------------------
# `dvc repro` with a parent run and a timing summary
# --------------------------------------------------------------------------------------------
@dataclass
class StageTiming:
    """How one stage went in a `dvc repro`."""

    stage: str
    status: str  # ran | skipped | failed
    seconds: float = 0.0


@dataclass
class ReproTimer:
    """Follows the lines `dvc repro` prints and times each stage from its start to its lock
    update (DVC writes dvc.lock right after a stage's command succeeds)."""

    stages: list[StageTiming] = field(default_factory=list)
    _current: StageTiming | None = None
    _started: float = 0.0

    def feed(self, line: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        text = line.strip()
        if m := _RUNNING.match(text):
            self._close("ran", now)
            self._current = StageTiming(m.group(1), "running")
            self._started = now
        elif m := _SKIPPED.match(text):
            self.stages.append(StageTiming(m.group(1), "skipped"))
        elif _LOCK.match(text):
            self._close("ran", now)

    def finish(self, ok: bool, now: float | None = None) -> list[StageTiming]:
        self._close("ran" if ok else "failed", time.monotonic() if now is None else now)
        return self.stages

    def _close(self, status: str, now: float) -> None:
        if self._current is not None:
            self._current.status = status
            self._current.seconds = now - self._started
            self.stages.append(self._current)
            self._current = None

    def summary(self, total: float) -> str:
        width = max([len(s.stage) for s in self.stages] + [12])
        lines = [f"{'stage':<{width}}  {'status':<8}  {'time':>9}"]
        for s in self.stages:
            t = f"{s.seconds:8.1f}s" if s.status != "skipped" else "        -"
            lines.append(f"{s.stage:<{width}}  {s.status:<8}  {t}")
        lines.append(f"{'total':<{width}}  {'':<8}  {total:8.1f}s")
        return "\n".join(lines)


def stream(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Any = None,
) -> int:
    """Run ``cmd``, handing each output line (stdout and stderr merged) to ``on_line``; returns
    the exit code. Children run unbuffered so lines arrive as they are printed."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if on_line is not None:
                on_line(line.rstrip("\n"))
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    return proc.wait()


def repro(
    params: Params,
    dvc_args: Iterable[str] = (),
    *,
    trigger: str = "make demo",
    echo: Any = print,
) -> tuple[int, list[StageTiming], str | None]:
    """``dvc repro`` under a new parent run; returns (exit code, stage timings, parent run id).

    A repro in which no stage ran leaves no parent run behind (there is nothing to group).
    """
    try:
        parent = create_parent_run(params, trigger)
    except Exception as e:  # noqa: BLE001 - the pipeline still runs; stages warn themselves
        echo(f"imagen: could not create the MLflow parent run ({e}); continuing without it")
        parent = None
    timer = ReproTimer()

    def on_line(line: str) -> None:
        echo(line)
        timer.feed(line)

    env = {PARENT_ENV: parent} if parent else {}
    start = time.monotonic()
    rc = stream(["dvc", "repro", *dvc_args], env=env, on_line=on_line)
    timings = timer.finish(rc == 0)
    total = time.monotonic() - start
    if parent:
        _close_repro_parent(params, parent, rc, timings, total)
        if not any(t.status != "skipped" for t in timings):
            parent = None
    return rc, timings, parent


def _close_repro_parent(
    params: Params, parent: str, rc: int, timings: list[StageTiming], total: float
) -> None:
    try:
        client, _ = _client(params)
        if not any(t.status != "skipped" for t in timings):
            client.delete_run(parent)
            return
        for t in timings:
            if t.status != "skipped":
                key = "time_s/" + t.stage.replace("@", "_")
                client.log_metric(parent, key, t.seconds)
        client.log_metric(parent, "time_s/total", total)
        client.set_terminated(parent, "FINISHED" if rc == 0 else "FAILED")
    except Exception as e:  # noqa: BLE001 - reporting only
        print(f"imagen: could not close the MLflow parent run {parent} ({e})", file=sys.stderr)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    p = sub.add_parser("repro", help="dvc repro under a new MLflow parent run, timed per stage")
    p.add_argument("--trigger", default="make demo", help="tag of the parent run")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro")
    p = sub.add_parser("parent-run", help="print the parent run id for this context")
    p.add_argument("--new", action="store_true", help="always create a new parent run")
    p.add_argument("--trigger", default="manual", help="tag of a new parent run")
    p.add_argument(
        "--save",
        action="store_true",
        help="write the id to .imagen/parent_run (stages run by hand nest under it)",
    )
    p.add_argument("--end", metavar="RUN_ID", help="mark this parent run terminated and exit")
    p = sub.add_parser("runs", help="print the latest parent run and its stage runs")
    p.add_argument("--parent", metavar="RUN_ID", help="this parent run instead of the latest")
    p = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)


def _print_runs(params: Params, parent_id: str | None) -> int:
    client, exp_id = _client(params)
    parent = client.get_run(parent_id) if parent_id else latest_parent_run(params)
    if parent is None:
        print("no pipeline runs yet: run `make demo` or `dvc repro`")
        return 1
    info = parent.info
    print(f"parent  {info.run_id}  {info.status:<8}  {parent.data.tags.get('mlflow.runName', '')}")
    for run in stage_runs(params, info.run_id):
        secs = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        stage = run.data.tags.get("imagen.stage", run.info.run_name)
        print(f"  stage {run.info.run_id}  {run.info.status:<8}  {secs:7.1f}s  {stage}")
    return 0


def main(args: argparse.Namespace, params: Params) -> int:
    if args.action == "repro":
        dvc_args = [a for a in args.dvc_args if a != "--"]
        start = time.monotonic()
        rc, timings, parent = repro(params, dvc_args, trigger=args.trigger)
        total = time.monotonic() - start
        print(
            "\nPipeline summary (dvc repro" + (" " + " ".join(dvc_args) if dvc_args else "") + ")"
        )
        print(ReproTimer(stages=timings).summary(total))
        if parent:
            print(f"MLflow parent run: {parent}  (browse with `make ui`)")
        return rc
    if args.action == "parent-run":
        if args.end:
            print(end_parent_run(params, args.end))
            return 0
        from imagen.tracking import PARENT_RUN_FILE, resolve_parent_run_id

        run_id = None if args.new else resolve_parent_run_id(None)
        if run_id is None and not args.new:
            run_id = execution_parent_run(params)
        if run_id is None:
            run_id = create_parent_run(params, args.trigger)
        if args.save:
            PARENT_RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
            PARENT_RUN_FILE.write_text(run_id + "\n")
        print(run_id)
        return 0
    if args.action == "runs":
        return _print_runs(params, args.parent)
    if args.action == "ui":
        from imagen.tracking import tracking_uri

        uri = tracking_uri(params)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
        print(f"MLflow UI on http://{args.host}:{args.port} (tracking store {uri})", flush=True)
        return subprocess.call(cmd, env=env)
    raise AssertionError(args.action)
