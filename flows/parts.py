"""Ingest and precache in parts, mapped over a Prefect task runner (Dask through prefect-dask).

:func:`map_parts` runs ``imagen <stage> --part K/N`` for K = 0 .. N-1 as one Prefect task
each, in a sub-flow whose task runner is Prefect's default (a thread pool on this machine) or
prefect-dask's ``DaskTaskRunner``: ``dask="local"`` starts a ``distributed.LocalCluster``;
a scheduler address (``tcp://host:8786``) uses a running cluster (dask-jobqueue on SLURM/PBS,
dask-kubernetes, ``dask scheduler`` + ``dask worker``). Each part is a subprocess in the
project folder, so a worker needs the project's code, its params.yaml and the data (shared
file system or ``s3://`` / ``gs://`` shards). A part that fails is retried alone, and a
finished part is skipped when the flow runs again. The stage's own ``dvc repro`` then puts the
parts together (ingest) or finds every shard finished (precache).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from imagen.config import ConfigError
from imagen.mlops.pipeline import stream_tail

PARTED: tuple[str, ...] = ("ingest", "precache")


class PartFailed(RuntimeError):
    """``imagen <stage> --part K/N`` exited with an error."""


@task(
    retries=2,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="{stage} part {index}/{count}",
)
def run_part(stage: str, root: str, index: int, count: int) -> dict[str, Any]:
    """``imagen <stage> --part index/count`` in ``root``, its output in the task's log."""
    cmd = [sys.executable, "-m", "imagen.cli", stage, "--part", f"{index}/{count}"]
    rc, tail = stream_tail([*cmd, "--no-progress"], get_run_logger().info, cwd=root, keep=20)
    if rc != 0:
        raise PartFailed(f"{' '.join(cmd)} exited with {rc}:\n" + "\n".join(tail))
    return {"stage": stage, "part": index, "count": count}


@flow(name="imagen-parts", log_prints=True)
def parts_flow(stage: str, root: str, count: int) -> list[dict[str, Any]]:
    """Every part of ``stage``, mapped over the flow's task runner."""
    futures = run_part.map(unmapped(stage), unmapped(root), range(count), unmapped(count))
    return [f.result() for f in futures]


def task_runner(dask: str | None) -> Any:
    """Prefect's default task runner (None), a Dask LocalCluster ("local") or the Dask
    cluster at a scheduler address."""
    if dask is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ConfigError("dask: needs prefect-dask: pip install 'imagen-cascade[cloud]'") from e
    if dask == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1})
    return DaskTaskRunner(address=dask)


def map_parts(stage: str, root: str, count: int, dask: str | None = None) -> list[dict]:
    """Run ``count`` parts of ``stage`` (ingest or precache) on the chosen task runner."""
    if stage not in PARTED:
        raise ConfigError(f"parts: {stage} does not run in parts; only {list(PARTED)}")
    if count < 1:
        raise ConfigError(f"parts: {count}; at least 1")
    return parts_flow.with_options(task_runner=task_runner(dask))(stage, root, count)


def stale(stage: str, root: str) -> bool:
    """Whether ``dvc status`` says ``stage`` itself would run (so its parts are worth running;
    the ``source`` stage upstream is listed at every status, as DVC always runs it)."""
    out = subprocess.run(
        ["dvc", "status", "--json", stage], cwd=root, capture_output=True, text=True, check=False
    )
    try:
        return stage in json.loads(out.stdout or "{}")
    except ValueError:
        return True
