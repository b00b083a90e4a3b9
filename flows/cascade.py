"""The Prefect flow "imagen" (deployment "cascade-train"): the cascade's DVC stages as tasks.

One task per stage (ingest, precache, train@base64, train@sr256, train@sr1024, evaluator,
evaluate), each running ``dvc repro --single-item <stage>``, so DVC decides what is stale and
cached work is skipped exactly as with ``dvc repro``. Each task streams the stage's output
lines into the Prefect run log and retries after a transient failure (a configuration error is
not retried). The flow creates the MLflow parent run in the checkout's tracking store and hands
it to every stage in ``$IMAGEN_PARENT_RUN_ID``, and ends with two table artifacts: the stages
(ran or cached, time, MLflow run link, report files) and the metrics.

A flow run never edits the checkout's params.yaml. Without ``overrides`` it reproduces the
checkout's pipeline in the checkout, one flow run at a time (flows/isolate.py's lock). With
``overrides`` (dotted params.yaml keys -> values, validated before any work) it runs in an
isolated copy of the checkout and its results come back as a DVC experiment
(``experiment``, default ``prefect-<flow run name>``): ``dvc exp show`` lists it with its
params and metrics, ``dvc exp apply <name>`` brings it into the checkout; its stage runs log to
the checkout's MLflow store, tagged with the experiment. Such runs can run concurrently.

Serve it with ``make prefect`` (flows/serve.py), or deploy it to a process work pool with
prefect.yaml (``prefect deploy``, ``prefect worker start --pool imagen``); run it with
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
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import isolate
from flows.parts import PARTED, map_parts, stale
from imagen.config import STAGES, ConfigError, Params, flatten, load_params
from imagen.mlops.client import client_and_experiment, tracking_uri
from imagen.mlops.parent import PARENT_ENV, create_parent_run, end_parent_run, stage_runs
from imagen.mlops.pipeline import DVC_STAGES, ReproTimer, run_url, stream_tail

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
    """Validate ``overrides`` against ``root``'s params.yaml, then write them into it (comments
    kept), as ``dvc exp run -S`` does; the flow does so in its isolated copy only.

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
def run_stage(
    stage: str, root: str, parent_run_id: str | None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``root`` with its output streamed into the task's
    log; ``env`` is added to the stage's environment."""
    logger = get_run_logger()
    timer = ReproTimer()

    def on_line(line: str) -> None:
        logger.info(line)
        timer.feed(line)

    env = dict(env or {})
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    start = time.monotonic()
    cmd = ["dvc", "repro", "--single-item", stage]
    rc, tail = stream_tail(cmd, on_line, cwd=root, env=env, keep=60)
    seconds = time.monotonic() - start
    if rc != 0:
        raise StageFailed(stage, rc, tail)
    statuses = {t.status for t in timer.finish(True)}
    status = next((s for s in ("ran", "checked") if s in statuses), "cached")
    return {"stage": stage, "status": status, "seconds": round(seconds, 1)}


def _metrics(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for prefix, path in _metric_files(root):
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


def _metric_files(root: Path) -> list[tuple[str, Path]]:
    files = [("evaluate", root / "reports" / "metrics.json")]
    files += [("evaluator", root / "models" / "evaluator" / "metrics.json")]
    files += [(f"train@{s}", root / "models" / s / "metrics.json") for s in STAGES]
    return files


def _report_files(root: Path, stage: str) -> list[Path]:
    """The files a stage leaves for a person to look at, where they exist."""
    if stage == "evaluate":
        names = ["metrics.json", "fid_clip.png", "cascade.png", "fid_clip.csv"]
        files = [root / "reports" / n for n in names]
    elif stage.startswith("train@"):
        files = [root / "models" / stage.split("@")[1] / n for n in ("metrics.json", "loss.csv")]
    elif stage == "evaluator":
        files = [root / "models" / "evaluator" / "metrics.json"]
    else:
        files = []
    return [f for f in files if f.is_file()]


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


def stage_table(
    results: list[dict[str, Any]],
    links: Mapping[str, str],
    files: Mapping[str, list[str]],
) -> list[dict[str, Any]]:
    """The rows of the artifact ``imagen-cascade``: one per stage, with its MLflow run link and
    its report files' links."""
    return [
        {
            "stage": r["stage"],
            "dvc": r["status"],
            "seconds": r["seconds"],
            "mlflow_run": links.get(r["stage"], ""),
            "files": " ".join(files.get(r["stage"], [])),
        }
        for r in results
    ]


def _describe(
    parent_link: str | None, overrides: Mapping[str, Any], experiment: str | None, root: Path
) -> str:
    lines = ["Imagen cascade: the stages, their MLflow runs and report files."]
    if parent_link:
        lines.append(f"MLflow parent run: [{parent_link}]({parent_link})")
    if overrides:
        lines.append("Overrides: " + ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()))
    if experiment:
        lines.append(
            f"DVC experiment `{experiment}` of {root}: `dvc exp show`, `dvc exp apply {experiment}`"
        )
    else:
        lines.append(f"Workspace: {root}")
    return "\n\n".join(lines)


def _run_stages(
    logger: Any,
    params: Params,
    root: Path,
    workdir: Path,
    stage_env: dict[str, str],
    trigger_tags: dict[str, str],
    experiment: str | None,
    mlflow_ui: str,
    overrides: Mapping[str, Any],
    parts: int = 1,
    dask: str | None = None,
) -> dict[str, Any]:
    """Every stage in ``workdir`` under one MLflow parent run (in ``root``'s store), ingest and
    precache in ``parts`` when stale; the artifacts; the flow's result."""
    with _inside(root):
        try:
            parent = create_parent_run(params, "prefect", tags=trigger_tags)
            logger.info("MLflow parent run %s", parent)
        except Exception as e:  # noqa: BLE001 - stages still run and log their own runs
            logger.warning("no MLflow parent run (%s); stages log unparented runs", e)
            parent = None
    results: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for stage in DVC_STAGES:
            if parts > 1 and stage in PARTED and stale(stage, str(workdir)):
                map_parts(stage, str(workdir), parts, dask)
            results.append(run_stage(stage, str(workdir), parent, stage_env))
        status = "FINISHED"
    finally:
        with _inside(root):
            if parent:
                try:
                    end_parent_run(params, parent, status)
                except Exception as e:  # noqa: BLE001 - reporting only
                    logger.warning("could not end the MLflow parent run: %s", e)
            links, parent_link = _stage_links(params, parent, mlflow_ui)
        metrics = _metrics(workdir)
        if experiment:  # the copy goes away: its reports live on in the MLflow runs
            files = {s: [f"{u}/artifacts"] for s, u in links.items()}
        else:
            files = {s: [f.as_uri() for f in _report_files(root, s)] for s in DVC_STAGES}
        description = _describe(parent_link, overrides, experiment, root)
        create_table_artifact(stage_table(results, links, files), "imagen-cascade", description)
        rows = [{"metric": k, "value": round(v, 6)} for k, v in sorted(metrics.items())]
        create_table_artifact(rows, "imagen-cascade-metrics", description)
    return {"parent_run_id": parent, "stages": results, "metrics": metrics}


@flow(name="imagen", log_prints=True)
def imagen_flow(
    overrides: dict[str, Any] | None = None,
    project_dir: str | None = None,
    mlflow_ui: str = DEFAULT_UI,
    experiment: str | None = None,
    parts: int = 1,
    dask: str | None = None,
) -> dict[str, Any]:
    """Run the Imagen cascade (ingest -> precache -> base64 -> sr256 -> sr1024 -> evaluator ->
    evaluate) through DVC, under one MLflow parent run.

    Args:
        overrides: params.yaml values for this run, e.g. {"stages.base64.trainer.max_steps":
            50}: the run is a DVC experiment in an isolated copy; the checkout is not edited.
        project_dir: the project (a DVC repository); default: the one this flow belongs to.
        mlflow_ui: base URL of the MLflow UI used in the links of the artifacts.
        experiment: the DVC experiment's name (default ``prefect-<flow run name>``); given
            without overrides, the checkout's params run as an experiment too.
        parts: run ingest and precache (when stale) as this many parts first (flows/parts.py).
        dask: where the parts run: None (Prefect's default runner), "local" (a Dask
            LocalCluster) or a Dask scheduler address.
    """
    logger = get_run_logger()
    root = Path(project_dir or PROJECT_DIR).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"project_dir: {root} has no dvc.yaml")
    overrides = dict(overrides or {})
    # validated before any work: a bad key fails here, naming it
    params = load_params(root / "params.yaml", overrides)
    tags = {
        "prefect.flow_run_id": flow_run.get_id() or "",
        "prefect.flow_run_name": flow_run.get_name() or "",
    }
    if not overrides and not experiment:
        with isolate.workspace_lock(root, logger.info):
            return _run_stages(
                logger, params, root, root, {}, tags, None, mlflow_ui, {}, parts, dask
            )

    name = isolate.experiment_name(experiment, flow_run.get_name())
    baseline = isolate.baseline_rev(root)
    isolate.check_new_experiment(root, name)
    with _inside(root):  # the checkout's store, wherever the stages run
        uri = isolate.anchored(tracking_uri(params), root)
    with isolate.workspace_lock(root, logger.info):  # a consistent snapshot of the checkout
        copy = isolate.isolated_copy(root, name)
    logger.info("DVC experiment %s runs in %s (baseline %s)", name, copy, baseline[:7])
    ok = False
    try:
        store = dict(overrides)
        env = {isolate.EXP_NAME_ENV: name, isolate.EXP_BASELINE_ENV: baseline}
        if params.mlflow.tracking_uri and params.mlflow.tracking_uri != uri:
            store["mlflow.tracking_uri"] = uri  # a relative path, anchored at the checkout
        elif not params.mlflow.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = uri
        apply_overrides(copy, store)
        tags |= {"imagen.dvc.exp_name": name, "imagen.dvc.baseline_rev": baseline}
        result = _run_stages(
            logger, params, root, copy, env, tags, name, mlflow_ui, overrides, parts, dask
        )
        message = isolate.save_experiment(copy, name, isolate.uncached_reports(copy))
        logger.info("%s (dvc exp show; dvc exp apply %s)", message, name)
        ok = True
    finally:
        if ok:
            isolate.remove_copy(root, copy)
        else:
            logger.warning(
                "the isolated copy is kept for inspection: %s "
                "(remove it with: git worktree remove --force %s)",
                copy,
                copy,
            )
    return {**result, "experiment": name, "baseline_rev": baseline}


if __name__ == "__main__":
    imagen_flow()
