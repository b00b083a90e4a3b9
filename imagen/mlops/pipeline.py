"""``imagen pipeline``: `dvc repro` under one MLflow parent run, timed stage by stage.

How the parent run is found or created for each kind of execution is
:mod:`imagen.mlops.parent`'s business; this module runs DVC and reports.

Sub-commands (``imagen pipeline <action>``):

- ``repro [DVC ARGS]``  run ``dvc repro`` under a new parent run, time each stage, print a summary
- ``parent-run``        print (and with ``--new`` create) the parent run id for this context
- ``runs``              print the latest parent run and its stage runs
- ``ui``                serve the MLflow UI on 127.0.0.1
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.config import STAGES, Params
from imagen.mlops.client import client_and_experiment, tracking_uri
from imagen.mlops.parent import (
    PARENT_ENV,
    PARENT_RUN_FILE,
    create_parent_run,
    end_parent_run,
    execution_parent_run,
    latest_parent_run,
    resolve_parent_run_id,
    stage_runs,
)

# The stages of dvc.yaml, in pipeline order (train is a foreach over the cascade stages).
DVC_STAGES: tuple[str, ...] = (
    "source",
    "ingest",
    "precache",
    *(f"train@{s}" for s in STAGES),
    "evaluator",
    "evaluate",
)

# Stages DVC runs at every repro (always_changed): `source` lists the data source's files so
# that ingest re-runs when they change. Such a run is "checked": it is not work that ran.
CHECK_STAGES: tuple[str, ...] = ("source",)
WORK = ("ran", "failed")  # the statuses of a stage that did (or tried to do) work

# What `dvc repro` prints around each stage (DVC 3).
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_LOCK = re.compile(r"^Updating lock file")


# --------------------------------------------------------------------------------------------
# `dvc repro` with a parent run and a timing summary
# --------------------------------------------------------------------------------------------
@dataclass
class StageTiming:
    """How one stage went in a `dvc repro`."""

    stage: str
    status: str  # ran | skipped | failed | checked (a CHECK_STAGES stage that ran)
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
            self._close("ran", now)  # a stage whose lock did not change prints no update
            self.stages.append(StageTiming(m.group(1), "skipped"))
        elif _LOCK.match(text):
            self._close("ran", now)

    def finish(self, ok: bool, now: float | None = None) -> list[StageTiming]:
        self._close("ran" if ok else "failed", time.monotonic() if now is None else now)
        return self.stages

    def _close(self, status: str, now: float) -> None:
        if self._current is not None:
            checked = status == "ran" and self._current.stage in CHECK_STAGES
            self._current.status = "checked" if checked else status
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


def stream_tail(
    cmd: Sequence[str],
    log: Callable[[str], Any],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    keep: int = 40,
) -> tuple[int, list[str]]:
    """:func:`stream` with every line handed to ``log``; returns the exit code and the last
    ``keep`` lines (for the error message of a failed command)."""
    tail: list[str] = []

    def on_line(line: str) -> None:
        log(line)
        tail.append(line)
        del tail[:-keep]

    return stream(cmd, cwd=cwd, env=env, on_line=on_line), tail


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
        if not any(t.status in WORK for t in timings):
            parent = None
    return rc, timings, parent


def _close_repro_parent(
    params: Params, parent: str, rc: int, timings: list[StageTiming], total: float
) -> None:
    try:
        client, _ = client_and_experiment(params)
        if not any(t.status in WORK for t in timings):
            client.delete_run(parent)
            return
        for t in timings:
            if t.status in WORK:
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
    client, exp_id = client_and_experiment(params)
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
