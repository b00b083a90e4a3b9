"""Where MLflow is and how every run of the project is tagged: the pieces all MLflow code shares.

:func:`tracking_uri` picks the tracking server: ``mlflow.tracking_uri`` in params.yaml, else
``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` at the project root (MLflow's file
store is deprecated); with a SQLite store the artifacts go to ``mlartifacts/`` beside the
database file. The project root (:func:`project_root`) is the DVC repository a stage runs for
(``$DVC_ROOT``, which DVC sets for every stage command, and to the *parent* repository inside
``dvc exp run --temp`` / ``--queue`` executors), else the working directory; a relative SQLite
path is anchored there, so an experiment run in a temporary copy logs to the project's store,
never to a copy DVC deletes afterwards. A SQLite store is switched to write-ahead logging
(WAL) on first use, so parallel experiments write one database without "database is locked".
The experiment is created on first use and marked as model training, so the MLflow UI opens
on runs, metrics and artifacts.

:func:`dvc_experiment` reads which DVC experiment a stage runs for (``$DVC_EXP_NAME``,
``$DVC_EXP_BASELINE_REV``); :func:`run_tags` puts it on every run.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagen.config import Params, params_hash

# The MLflow UI shows a model-training experiment (runs, metrics, artifacts), not its GenAI pages.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Fail fast instead of retrying for minutes when an HTTP tracking server goes away mid-run.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# What DVC puts in a stage command's environment (DVC 3: dvc/env.py, dvc/stage/run.py).
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
DVC_EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"
EXP_NAME_TAG = "imagen.dvc.exp_name"
EXP_BASELINE_TAG = "imagen.dvc.baseline_rev"


def project_root() -> Path:
    """The project the stage runs for: ``$DVC_ROOT`` (the repository DVC runs the stage for, the
    parent repository inside an experiment's temporary executor), else the working directory."""
    env = os.environ.get(DVC_ROOT_ENV)
    if env and Path(env).is_dir():
        return Path(env).resolve()
    return Path.cwd().resolve()


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs a stage for, as run tags (empty outside one)."""
    out = {}
    name, base = os.environ.get(DVC_EXP_NAME_ENV), os.environ.get(DVC_EXP_BASELINE_ENV)
    if name:
        out[EXP_NAME_TAG] = name
    if base:
        out[EXP_BASELINE_TAG] = base
    return out


def _anchor(uri: str) -> str:
    """A relative ``sqlite:///file.db`` made absolute under :func:`project_root`."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel, sep, query = uri[len("sqlite:///") :].partition("?")
        if rel and rel != ":memory:" and not Path(rel).is_absolute():
            return f"sqlite:///{project_root() / rel}" + sep + query
    return uri


def tracking_uri(params: Params | None = None) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else
    sqlite:///<project root>/mlflow.db; a relative SQLite path is anchored at the project root."""
    if params is not None and params.mlflow.tracking_uri:
        return _anchor(params.mlflow.tracking_uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _anchor(env)
    return f"sqlite:///{project_root() / 'mlflow.db'}"


_wal_done: set[str] = set()


def enable_wal(uri: str, attempts: int = 20) -> None:
    """Switch an existing SQLite tracking database to write-ahead logging (once per process;
    the mode is stored in the file): readers no longer block the writer, so the stages of
    parallel experiments log to one database. A busy database is retried, never fatal."""
    if not uri.startswith("sqlite:///") or uri in _wal_done:
        return
    db = Path(uri[len("sqlite:///") :].partition("?")[0])
    if not db.is_file():
        return
    for i in range(attempts):
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
                con.execute("PRAGMA journal_mode=WAL")
            _wal_done.add(uri)
            return
        except sqlite3.OperationalError:
            time.sleep(0.2 * (i + 1))


def retry_locked(fn: Any, attempts: int = 5) -> Any:
    """``fn()``, tried again (with a growing pause) while a SQLite store says it is locked:
    parallel experiments write one database, and MLflow's own busy timeout can run out."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(1.0 + 2.0 * i)
    raise AssertionError("unreachable")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlartifacts/`` beside a SQLite database; the
    server's own default otherwise (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str | None:
    """The git revision the code runs at: inside a DVC experiment its baseline revision
    (``$DVC_EXP_BASELINE_REV``: an executor's own HEAD is a stash commit that DVC drops), else
    ``git rev-parse HEAD`` of the working directory, or None outside a git checkout."""
    baseline = os.environ.get(DVC_EXP_BASELINE_ENV)
    if baseline:
        return baseline
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def reachable(uri: str) -> str | None:
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


def run_tags(
    params: Params, run_name: str, extra: Mapping[str, Any] | None = None, **tags: str | None
) -> dict[str, str]:
    """The tags every run of this project carries: name, params hash, git commit, plus ``tags``
    (``None`` values dropped) and ``extra`` (stringified, last so a caller can override)."""
    all_tags = {"imagen.params_hash": params_hash(params), "mlflow.runName": run_name}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(dvc_experiment())
    all_tags.update({k: v for k, v in tags.items() if v is not None})
    all_tags.update({k: str(v) for k, v in (extra or {}).items()})
    return all_tags


def client_and_experiment(params: Params, uri: str | None = None) -> tuple[Any, str]:
    """An MlflowClient for the tracking URI and the id of ``params.mlflow.experiment``, created
    (tagged as model training) when it does not exist yet."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    uri = uri or tracking_uri(params)
    client = MlflowClient(tracking_uri=uri)
    name = params.mlflow.experiment
    exp = client.get_experiment_by_name(name)  # creates the tables of a new SQLite store
    enable_wal(uri)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                name,
                artifact_location=artifact_location(uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            return client, exp_id
        except Exception:  # noqa: BLE001 - created by another process a moment ago
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, exp.experiment_id


def download(uri: str, tracking_uri: str | None) -> str:
    """Download ``models:/name@alias``, ``models:/name/version`` or ``runs:/...`` from the
    server at ``tracking_uri`` (its model registry too); returns the local path.

    A registered model's version is resolved with a client bound to that server, so no
    process-wide MLflow setting is read or changed.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient

    uri = str(uri)
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name, sep, alias = uri[len("models:/") :].partition("@")
        if sep:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, _, version = name.partition("/")
        uri = client.get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
