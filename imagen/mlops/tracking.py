"""MLflow tracking for every pipeline stage: one child run per stage under a pipeline parent run.

- the tracking server comes from :func:`imagen.mlops.client.tracking_uri`, the parent run from
  :func:`imagen.mlops.parent.resolve_parent_run_id`;
- :func:`stage_run` starts a stage run (or resumes an unfinished one named in a run file, so a
  training restarted after a crash keeps logging to the same run) and yields a
  :class:`StageRun` with ``log_metrics``, ``log_image``, ``log_artifact`` and ``log_dict``.

If the tracking server cannot be reached, a single clear warning is printed and the yielded
object does nothing: the stage still writes all of its outputs locally. If it goes away
mid-run, what the stage logs is queued and sent when it answers again; what never reached it
is reported at the end and listed in ``mlflow_unlogged.json`` beside the run file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imagen.config import Params, flatten
from imagen.mlops.client import (
    client_and_experiment,
    reachable,
    retry_locked,
    run_tags,
    tracking_uri,
)
from imagen.mlops.parent import resolve_parent_run_id

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 500  # MLflow caps param values (6000 chars in 3.x); keep the UI readable
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(f"imagen: WARNING: {message}", file=sys.stderr, flush=True)


# MLflow error codes that a retry cannot fix: such a call is dropped (and reported), not queued.
_PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
}


def _permanent(e: Exception) -> bool:
    return getattr(e, "error_code", None) in _PERMANENT


def _describe_call(method: str, a: tuple, kw: dict) -> dict[str, Any]:
    """A JSON-able record of a call that did not reach MLflow (for mlflow_unlogged.json)."""
    if method == "log_batch":
        metrics = [{"key": m.key, "value": m.value, "step": m.step} for m in kw.get("metrics", [])]
        params = {p.key: p.value for p in kw.get("params", [])}
        return {"call": method, **({"metrics": metrics} if metrics else {}),
                **({"params": params} if params else {})}  # fmt: skip
    args = [x if isinstance(x, str | int | float) else type(x).__name__ for x in a[1:]]
    return {"call": method, "args": args, **{k: str(v) for k, v in kw.items()}}


class StageRun:
    """The logging handle a stage gets from :func:`stage_run`.

    Every method is safe to call when tracking is off (``run_id`` None): it does nothing. When
    the server stops answering mid-run, calls are queued in order (at most ``max_pending``)
    and sent when it answers again (tried at most every ``retry_seconds``), so training never
    waits on tracking; :meth:`close` reports exactly what never reached MLflow and writes it to
    ``unlogged_file``.
    """

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        uri: str = "",
        *,
        unlogged_file: Path | None = None,
        retry_seconds: float = 10.0,
        max_pending: int = 100_000,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.unlogged_file = unlogged_file
        self.retry_seconds, self.max_pending = retry_seconds, max_pending
        self.pending: deque[tuple[str, tuple, dict]] = deque()
        self.lost: list[dict[str, Any]] = []  # dropped calls (permanent errors, overflow)
        self._retry_at: float | None = None  # set while the server does not answer
        self.final_status: str | None = None  # the body may say how the run ended (KILLED)

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _call(self, method: str, *a: Any, **kw: Any) -> None:
        """``self.client.<method>(*a, **kw)``, after any queued calls; queued if MLflow is away."""
        if not self.active:
            return
        self.pending.append((method, a, kw))
        if len(self.pending) > self.max_pending:
            self.lost.append(_describe_call(*self.pending.popleft()))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send the queued calls in order; False while the server does not answer."""
        if self._retry_at is not None and not force and time.monotonic() < self._retry_at:
            return False
        while self.pending:
            method, a, kw = self.pending[0]
            try:
                getattr(self.client, method)(*a, **kw)
            except Exception as e:  # noqa: BLE001 - tracking must never stop the stage
                if _permanent(e):
                    _warn(f"MLflow {method} refused ({type(e).__name__}: {e}); not retried")
                    self.lost.append(_describe_call(*self.pending.popleft()))
                    continue
                if self._retry_at is None:
                    _warn(
                        f"MLflow {method} failed ({type(e).__name__}: {e}); training goes on, "
                        f"what it logs is kept and sent when {self.uri} answers again"
                    )
                self._retry_at = time.monotonic() + self.retry_seconds
                return False
            self.pending.popleft()
        if self._retry_at is not None:
            self._retry_at = None
            print(f"imagen: MLflow {self.uri} answers again; the queued logs were sent",
                  file=sys.stderr, flush=True)  # fmt: skip
        return True

    def close(self, status: str) -> None:
        """End the run (``set_terminated``); report and record whatever MLflow never got."""
        if not self.active:
            return
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        self._call("set_terminated", self.run_id, status)
        self.flush(force=True)
        unlogged = self.lost + [_describe_call(*c) for c in self.pending]
        if not unlogged:
            return
        values = sum(len(u.get("metrics", [])) for u in unlogged)
        where = ""
        if self.unlogged_file is not None:
            self.unlogged_file.write_text(json.dumps({"run_id": self.run_id, "uri": self.uri,
                                                      "unlogged": unlogged}, indent=1))  # fmt: skip
            where = f"; listed in {self.unlogged_file}"
        _warn(
            f"MLflow {self.uri} did not get {len(unlogged)} calls of run {self.run_id} "
            f"({values} metric values, {', '.join(sorted({u['call'] for u in unlogged}))})" + where
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics at one step in one request."""
        if not self.active:
            return
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

    def log_dataset(self, manifest: str | Path, name: str, context: str = "training") -> None:
        """Log the data set an ingest ``manifest.json`` describes as the run's input
        (``mlflow.log_input``): its name, the manifest's sha256 as digest, its counts as the
        profile, the shard folder as source. A missing or unreadable manifest logs nothing."""
        if not self.active:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        manifest = Path(manifest)
        try:
            raw = manifest.read_bytes()
            counts = json.loads(raw).get("counts", {})
        except (OSError, ValueError, AttributeError) as e:
            _warn(f"no data set logged: {manifest} unreadable ({e})")
            return
        digest = hashlib.sha256(raw).hexdigest()[:16]
        source = json.dumps({"uri": str(manifest.parent.resolve())})
        dataset = Dataset(name=name, digest=digest, source_type="local", source=source,
                          profile=json.dumps(counts))  # fmt: skip
        tags = [InputTag("mlflow.data.context", context)]
        self._call("log_inputs", self.run_id, datasets=[DatasetInput(dataset, tags)])

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """MLflow's system metrics monitor (CPU, memory, disk, network; GPU when present) on this
        run, sampled every ``interval`` seconds until :meth:`close`."""
        if not self.active or getattr(self, "_monitor", None) is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                           tracking_uri=self.uri)  # fmt: skip
            monitor.start()
        except Exception as e:  # noqa: BLE001 - tracking must never stop the stage
            _warn(f"MLflow system metrics not started ({type(e).__name__}: {e})")
            return
        self._monitor = monitor


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
    unlogged = resume_file.with_name("mlflow_unlogged.json") if resume_file else None
    run = StageRun(client, run_id, uri, unlogged_file=unlogged)
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
            run, resumed = retry_locked(
                lambda: _open_run(params, stage_name, uri, parent, resume_file, tags)
            )
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
        run.close(run.final_status or status)
