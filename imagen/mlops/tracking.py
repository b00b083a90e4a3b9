"""MLflow tracking for every pipeline stage: one child run per stage under a pipeline parent run.

- the tracking server comes from :func:`imagen.mlops.client.tracking_uri`, the parent run from
  :func:`imagen.mlops.parent.resolve_parent_run_id`;
- :func:`stage_run` starts a stage run (or resumes an unfinished one named in a run file, so a
  training restarted after a crash keeps logging to the same run) and yields a
  :class:`StageRun` with ``log_metrics``, ``log_image``, ``log_artifact`` and ``log_dict``.

If the tracking server cannot be reached, a single clear warning is printed and the yielded
object does nothing: the stage still writes all of its outputs locally.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imagen.config import Params, flatten
from imagen.mlops.client import client_and_experiment, reachable, run_tags, tracking_uri
from imagen.mlops.parent import resolve_parent_run_id

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 500  # MLflow caps param values (6000 chars in 3.x); keep the UI readable
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


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


def _open_run(
    params: Params,
    stage_name: str,
    uri: str,
    parent_run_id: str | None,
    resume_file: Path | None,
    tags: Mapping[str, Any] | None,
) -> tuple[StageRun, bool]:
    client, exp_id = client_and_experiment(params, uri)
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
    reason = reachable(uri)
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
