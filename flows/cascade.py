"""The Prefect flow "imagen" (deployment "cascade-train"): the cascade's DVC stages as tasks.

One task per stage (ingest, precache, train@base64, train@sr256, train@sr1024, evaluator,
evaluate), each
running ``dvc repro --single-item <stage>`` in the project, so DVC decides what is stale and
cached work is skipped exactly as with ``dvc repro``. Each task streams the stage's output
lines into the Prefect run log and retries after a transient failure (a configuration error is
not retried). The flow creates the MLflow parent run and hands it to every stage in
``$IMAGEN_PARENT_RUN_ID``, and ends with a Prefect artifact: a table of the stages (ran or
cached, time, MLflow run link) and the metrics.

``overrides`` (dotted params.yaml keys -> values) are validated, then written into params.yaml
before any stage runs, as ``dvc exp run -S`` does: params.yaml, dvc.lock and the outputs agree
afterwards, and DVC re-runs exactly the stages whose keys changed. ``git diff params.yaml``
shows them; ``git checkout params.yaml`` undoes them.

Serve it with ``make prefect`` (flows/serve.py); run it with
``prefect deployment run imagen/cascade-train [--param overrides='{"key": value}']``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.parts import PARTED, map_parts, stale
from imagen.config import STAGES, ConfigError, Params, flatten, load_params
from imagen.mlops.client import client_and_experiment
from imagen.mlops.parent import PARENT_ENV, create_parent_run, end_parent_run, stage_runs
from imagen.mlops.pipeline import DVC_STAGES, ReproTimer, run_url, stream

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_UI = "http://127.0.0.1:5000"
_EXIT = re.compile(r"exited with (\d+)")
RETRIES = 2
RETRY_DELAY_S = 10


class StageFailed(RuntimeError):
    """A stage's ``dvc repro`` failed; ``transient`` says whether retrying can help."""

    def __init__(self, stage: str, rc: int, tail: list[str]) -> None:
        codes = [int(c) for c in _EXIT.findall("\n".join(tail))]
        # exit code 2 is the imagen CLI's configuration error: the same input fails again
        self.transient = not codes or codes[-1] != 2
        self.stage = stage
        kind = "transient failure" if self.transient else "configuration error"
        super().__init__(
            f"dvc repro {stage} failed with exit code {rc} ({kind}):\n" + "\n".join(tail[-20:])
        )


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception:  # noqa: BLE001 - anything else (lost process, OS error) may pass
        return True
    return False


@contextmanager
def _inside(root: Path) -> Iterator[None]:
    """Run the block with ``root`` as working directory (MLflow's default store lives there)."""
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def apply_overrides(root: Path, overrides: Mapping[str, Any]) -> Params:
    """Validate ``overrides`` against params.yaml, then write them into it (comments kept).

    Raises ConfigError naming the bad key before anything is written.
    """
    from dvc.utils.serialize import modify_yaml

    path = root / "params.yaml"
    params = load_params(path, dict(overrides))
    if overrides:
        with modify_yaml(str(path)) as data:
            for dotted, value in overrides.items():
                node = data
                *parents, leaf = dotted.split(".")
                for key in parents:
                    node = node.setdefault(key, {})
                node[leaf] = value
    return params


@task(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=_retry_if_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="{stage}",
)
def run_stage(stage: str, root: str, parent_run_id: str | None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` with its output streamed into the task's log."""
    logger = get_run_logger()
    timer = ReproTimer()
    tail: list[str] = []

    def on_line(line: str) -> None:
        logger.info(line)
        timer.feed(line)
        tail.append(line)
        del tail[:-60]

    env = {PARENT_ENV: parent_run_id} if parent_run_id else {}
    start = time.monotonic()
    rc = stream(["dvc", "repro", "--single-item", stage], cwd=root, env=env, on_line=on_line)
    seconds = time.monotonic() - start
    if rc != 0:
        raise StageFailed(stage, rc, tail)
    ran = any(t.status == "ran" for t in timer.finish(True))
    return {"stage": stage, "status": "ran" if ran else "cached", "seconds": round(seconds, 1)}


def _metrics(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    files = [("evaluate", root / "reports" / "metrics.json")]
    files += [("evaluator", root / "models" / "evaluator" / "metrics.json")]
    files += [(f"train@{s}", root / "models" / s / "metrics.json") for s in STAGES]
    for prefix, path in files:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        for k, v in flatten(data).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}/{k}"] = v
    return out


def _stage_links(params: Params, parent: str | None, ui: str) -> tuple[dict[str, str], str | None]:
    """Stage -> MLflow UI link of its run under ``parent``; and the parent's link."""
    if parent is None:
        return {}, None
    try:
        client, exp_id = client_and_experiment(params)
        links: dict[str, str] = {}
        for run in stage_runs(params, parent):
            tag = run.data.tags.get("imagen.stage", run.info.run_name or "")
            for stage in DVC_STAGES:
                if tag in (stage, stage.split("@")[-1]):
                    links[stage] = run_url(ui, exp_id, run.info.run_id)
        return links, run_url(ui, exp_id, parent)
    except Exception:  # noqa: BLE001 - the summary still shows what ran
        return {}, None


def _summary(
    results: list[dict[str, Any]],
    metrics: Mapping[str, float],
    links: Mapping[str, str],
    parent_link: str | None,
    overrides: Mapping[str, Any],
) -> str:
    lines = ["# Imagen cascade", ""]
    if parent_link:
        lines += [f"MLflow parent run: [{parent_link}]({parent_link})", ""]
    if overrides:
        lines += ["Overrides: " + ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()), ""]
    lines += ["| stage | DVC | time (s) | MLflow run |", "|---|---|---|---|"]
    for r in results:
        link = links.get(r["stage"])
        cell = f"[run]({link})" if link else "-"
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {cell} |")
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


@flow(name="imagen", log_prints=True)
def imagen_flow(
    overrides: dict[str, Any] | None = None,
    project_dir: str | None = None,
    mlflow_ui: str = DEFAULT_UI,
    parts: int = 1,
    dask: str | None = None,
) -> dict[str, Any]:
    """Run the Imagen cascade (ingest -> precache -> base64 -> sr256 -> sr1024 -> evaluator ->
    evaluate) through DVC, under one MLflow parent run.

    Args:
        overrides: params.yaml values to set first, e.g. {"stages.base64.trainer.max_steps": 50}.
        project_dir: the project (a DVC repository); default: the one this flow belongs to.
        mlflow_ui: base URL of the MLflow UI used in the links of the summary artifact.
        parts: run ingest and precache (when stale) as this many parts first (flows/parts.py).
        dask: where the parts run: None (Prefect's default runner), "local" (a Dask
            LocalCluster) or a Dask scheduler address.
    """
    logger = get_run_logger()
    root = Path(project_dir or PROJECT_DIR).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"project_dir: {root} has no dvc.yaml")
    overrides = dict(overrides or {})
    params = apply_overrides(root, overrides)
    if overrides:
        logger.info("params.yaml overrides written: %s", overrides)
    with _inside(root):
        try:
            parent = create_parent_run(
                params,
                "prefect",
                tags={
                    "prefect.flow_run_id": flow_run.get_id() or "",
                    "prefect.flow_run_name": flow_run.get_name() or "",
                },
            )
            logger.info("MLflow parent run %s", parent)
        except Exception as e:  # noqa: BLE001 - stages still run and log their own runs
            logger.warning("no MLflow parent run (%s); stages log unparented runs", e)
            parent = None
    results: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for stage in DVC_STAGES:
            if parts > 1 and stage in PARTED and stale(stage, str(root)):
                map_parts(stage, str(root), parts, dask)
            results.append(run_stage(stage, str(root), parent))
        status = "FINISHED"
    finally:
        with _inside(root):
            if parent:
                try:
                    end_parent_run(params, parent, status)
                except Exception as e:  # noqa: BLE001 - reporting only
                    logger.warning("could not end the MLflow parent run: %s", e)
            links, parent_link = _stage_links(params, parent, mlflow_ui)
        metrics = _metrics(root)
        create_markdown_artifact(
            _summary(results, metrics, links, parent_link, overrides),
            key="imagen-cascade",
            description="Imagen cascade: stages, MLflow runs, metrics",
        )
    return {"parent_run_id": parent, "stages": results, "metrics": metrics}


if __name__ == "__main__":
    imagen_flow()
