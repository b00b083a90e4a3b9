"""MLflow tracking for every pipeline stage: one child run per stage under a pipeline parent run.

- :func:`tracking_uri` picks the tracking server: ``mlflow.tracking_uri`` in params.yaml, else
  ``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the working directory (MLflow's
  file store is deprecated). With a SQLite store the artifacts go to ``mlartifacts/`` beside
  the database file.
- :func:`resolve_parent_run_id` finds the pipeline's parent run (explicit id, then
  ``$IMAGEN_PARENT_RUN_ID``, then the file ``.imagen/parent_run``).
- :func:`stage_run` starts a stage run (or resumes an unfinished one named in a run file, so a
  training restarted after a crash keeps logging to the same run) and yields a
  :class:`StageRun` with ``log_metrics``, ``log_image``, ``log_artifact`` and ``log_dict``.

If the tracking server cannot be reached, a single clear warning is printed and the yielded
object does nothing: the stage still writes all of its outputs locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imagen.config import Params, flatten, params_hash

PARENT_RUN_FILE = Path(".imagen/parent_run")
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 500  # MLflow caps param values (6000 chars in 3.x); keep the UI readable
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call

# Fail fast instead of retrying for minutes when an HTTP tracking server goes away mid-run.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def tracking_uri(params: Params | None = None) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if params is not None and params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlartifacts/`` beside a SQLite database; the
    server's own default otherwise (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def resolve_parent_run_id(explicit: str | None = None, params: Params | None = None) -> str | None:
    """The pipeline's parent run: explicit, else $IMAGEN_PARENT_RUN_ID, else (given ``params``)
    the parent run of the ``dvc repro`` / ``dvc exp run`` this process runs under
    (:func:`imagen.pipeline.execution_parent_run`), else .imagen/parent_run."""
    if explicit:
        return explicit
    env = os.environ.get("IMAGEN_PARENT_RUN_ID")
    if env:
        return env
    if params is not None:
        from imagen.pipeline import execution_parent_run

        found = execution_parent_run(params)
        if found:
            return found
    if PARENT_RUN_FILE.is_file():
        text = PARENT_RUN_FILE.read_text().strip()
        return text or None
    return None


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the working directory, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _reachable(uri: str) -> str | None:
    """None when the tracking server answers, else the reason it does not."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (a server without /health still answers)
    except (OSError, urllib.error.URLError) as e:
        return str(getattr(e, "reason", e))


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(f"imagen: WARNING: {message}", file=sys.stderr, flush=True)


class StageRun:
    """The logging handle a stage gets from :func:`stage_run`.

    Every method is safe to call when tracking is off (``run_id`` None): it does nothing. The
    first MLflow error (say, the server went away mid-run) is reported once and turns tracking
    off for the rest of the stage, so training never stops because of tracking.
    """

    def __init__(self, client: Any = None, run_id: str | None = None, uri: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _call(self, method: str, *a: Any, **kw: Any) -> None:
        """``self.client.<method>(*a, **kw)``, turning tracking off on the first failure."""
        if not self.active:
            return
        what = method
        try:
            getattr(self.client, method)(*a, **kw)
        except Exception as e:  # noqa: BLE001 - tracking must never stop the stage
            _warn(
                f"MLflow {what} failed ({type(e).__name__}: {e}); tracking is off from here, "
                "all outputs are still written locally"
            )
            self.client = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics at one step in one request."""
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        self._call("log_batch", self.run_id, metrics=batch)

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit), 100 per request."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in values.items()]
        for i in range(0, len(items), _BATCH):
            self._call("log_batch", self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call("set_tag", self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's files) to the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", self.run_id, str(path), artifact_path)
        elif path.exists():
            self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image or an (H, W, 3) uint8 array as ``artifact_file`` (e.g. samples/x.png)."""
        self._call("log_image", self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log a dict as a JSON (or YAML, by the file's suffix) artifact."""
        self._call("log_dict", self.run_id, dict(data), artifact_file)


def _resumable(client: Any, resume_file: Path | None) -> str | None:
    """The run id in ``resume_file`` if that run exists and has not finished."""
    if resume_file is None or not resume_file.is_file():
        return None
    try:
        run_id = json.loads(resume_file.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - an unknown id (another database) starts a new run
        return None
    return run_id if run.info.status in ("RUNNING", "SCHEDULED", "FAILED", "KILLED") else None


def run_tags(
    params: Params, run_name: str, extra: Mapping[str, Any] | None = None, **tags: str | None
) -> dict[str, str]:
    """The tags every run of this project carries: name, params hash, git commit, plus ``tags``
    (``None`` values dropped) and ``extra`` (stringified, last so a caller can override)."""
    all_tags = {"imagen.params_hash": params_hash(params), "mlflow.runName": run_name}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update({k: v for k, v in tags.items() if v is not None})
    all_tags.update({k: str(v) for k, v in (extra or {}).items()})
    return all_tags


def _open_run(
    params: Params,
    stage_name: str,
    uri: str,
    parent_run_id: str | None,
    resume_file: Path | None,
    tags: Mapping[str, Any] | None,
) -> tuple[StageRun, bool]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = params.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location(uri))
        except Exception:  # noqa: BLE001 - another stage created it at the same moment
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    run_id = _resumable(client, resume_file)
    resumed = run_id is not None
    if resumed:
        client.update_run(run_id, status="RUNNING")
    else:
        all_tags = run_tags(params, stage_name, tags, **{"imagen.stage": stage_name})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run_id = client.create_run(exp_id, tags=all_tags, run_name=stage_name).info.run_id
    run = StageRun(client, run_id, uri)
    if not resumed:
        run.log_params(flatten(params.model_dump(mode="json")))
    if resume_file is not None:
        resume_file.parent.mkdir(parents=True, exist_ok=True)
        resume_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=2))
    return run, resumed


@contextmanager
def stage_run(
    params: Params,
    stage_name: str,
    *,
    parent_run_id: str | None = None,
    resume_file: Path | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """Start (or resume) the MLflow run of one stage; yield its :class:`StageRun`.

    The run lives in experiment ``params.mlflow.experiment``, nested under the parent run
    (:func:`resolve_parent_run_id` of ``parent_run_id``), tagged with the git commit, the params
    hash and the stage name, with the whole resolved config as params. When ``resume_file``
    names a run that has not finished, that run continues instead (its id is written to the
    file either way). The run ends FINISHED, or FAILED if the body raised.
    """
    uri = tracking_uri(params)
    parent = resolve_parent_run_id(parent_run_id, params)
    run = StageRun(uri=uri)
    reason = _reachable(uri)
    if reason is not None:
        _warn(
            f"MLflow tracking server {uri} cannot be reached ({reason}); stage {stage_name!r} "
            "continues without tracking, all outputs are written locally"
        )
    else:
        try:
            run, resumed = _open_run(params, stage_name, uri, parent, resume_file, tags)
            verb = "resumed" if resumed else "started"
            print(f"imagen: MLflow run {run.run_id} {verb} ({uri})", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - tracking must never stop the stage
            _warn(
                f"MLflow tracking at {uri} failed to start a run ({type(e).__name__}: {e}); "
                f"stage {stage_name!r} continues without tracking"
            )
            run = StageRun(uri=uri)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if run.active:
            run._call("set_terminated", run.run_id, status)
