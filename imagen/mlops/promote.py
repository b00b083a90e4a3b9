"""The registry promotes on evidence: ``challenger`` for every new cascade, ``champion`` earned.

``imagen evaluate`` registers each new cascade (the three stage models and ``imagen-cascade``)
under the alias ``challenger``. The ``champion`` alias (``mlflow.model_alias``) then moves to
the new versions only when (:func:`decide`):

- no cascade is champion yet, or
- the champion was evaluated under the same evaluation settings (the same ``evaluate`` and
  ``evaluator`` blocks, data, and metric names: :func:`evaluation_settings`) and the new cascade
  is at least as good on the selection metric (``mlflow.selection``: the sweep's best-point
  ``alignment``, higher is better, or its ``fidelity`` distance, lower is better).

Otherwise the champion stays and the new versions stay ``challenger``. Either way the rule
and both numbers are written into every new version's description. ``imagen registry promote``
moves ``champion`` by hand (default: to the current challenger), ``imagen registry show`` lists
the cascade's versions with their evidence.

Each version carries as tags its metrics (``imagen.metric.<name>``), the git revision, the DVC
experiment (name and baseline), the params hash and the evaluation settings hash
(:func:`version_tags`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagen.config import Params
from imagen.mlops.client import run_tags, tracking_uri

CHALLENGER = "challenger"
SELECTION_TAG = "imagen.selection.metric"
SELECTION_VALUE_TAG = "imagen.selection.value"
SELECTION_ORDER_TAG = "imagen.selection.higher_is_better"
SETTINGS_TAG = "imagen.eval_settings"


@dataclass(frozen=True)
class Evidence:
    """What one cascade scored on the selection metric, and under which settings."""

    metric: str
    value: float
    higher_is_better: bool
    settings: str

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Evidence | None:
        try:
            return cls(
                tags[SELECTION_TAG],
                float(tags[SELECTION_VALUE_TAG]),
                tags[SELECTION_ORDER_TAG] == "true",
                tags[SETTINGS_TAG],
            )
        except (KeyError, ValueError):
            return None

    def tags(self) -> dict[str, str]:
        return {
            SELECTION_TAG: self.metric,
            SELECTION_VALUE_TAG: repr(float(self.value)),
            SELECTION_ORDER_TAG: "true" if self.higher_is_better else "false",
            SETTINGS_TAG: self.settings,
        }


def evaluation_settings(params: Params, metrics: Mapping[str, Any]) -> str:
    """A hash of everything that decides what the evaluation measures: the ``evaluate`` block
    (less where reports go), the ``evaluator`` block, the data and the metric names."""
    evaluate = params.evaluate.model_dump(mode="json")
    evaluate.pop("reports_dir", None)
    what = {
        "evaluate": evaluate,
        "evaluator": params.evaluator.model_dump(mode="json"),
        "data": params.data.model_dump(mode="json"),
        "fidelity": metrics.get("fidelity_metric"),
        "alignment": metrics.get("alignment_metric"),
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evidence(params: Params, metrics: Mapping[str, Any]) -> Evidence:
    """The selection metric of an evaluation's ``metrics.json`` (its best trade-off point)."""
    best = metrics["best"]
    if params.mlflow.selection == "alignment":
        name, higher = metrics["alignment_metric"], True
    else:
        name, higher = metrics["fidelity_metric"], False
    return Evidence(name, float(best[name]), higher, evaluation_settings(params, metrics))


def decide(
    new: Evidence, champion: Evidence | None, champion_version: str | None
) -> tuple[bool, str]:
    """(promote?, the rule with both numbers, for the version's description)."""
    order = ">=" if new.higher_is_better else "<="
    rule = f"rule: champion moves when the new {new.metric} {order} the champion's"
    if champion_version is None:
        return True, f"champion: no champion before; {new.metric} {new.value:.4f} ({rule})"
    if champion is None:
        return False, (
            f"challenger: champion v{champion_version} carries no selection evidence; "
            f"{new.metric} {new.value:.4f} ({rule}); `imagen registry promote` moves it by hand"
        )
    if champion.settings != new.settings or champion.metric != new.metric:
        return False, (
            f"challenger: not compared, champion v{champion_version} was evaluated under other "
            f"settings ({champion.metric}, settings {champion.settings} against "
            f"{new.metric}, settings {new.settings}); `imagen registry promote` moves it by hand"
        )
    better = new.value >= champion.value if new.higher_is_better else new.value <= champion.value
    verdict = "champion" if better else "challenger"
    return better, (
        f"{verdict}: {new.metric} {new.value:.4f} against champion v{champion_version}'s "
        f"{champion.value:.4f} under the same evaluation settings ({new.settings}); {rule}"
    )


def version_tags(params: Params, metrics: Mapping[str, Any], ev: Evidence) -> dict[str, str]:
    """The tags of every version an evaluation registers: metrics at the best point, git
    revision, DVC experiment, params hash, selection evidence."""
    tags = {k: v for k, v in run_tags(params, "").items() if k != "mlflow.runName"}
    if "mlflow.source.git.commit" in tags:
        tags["imagen.git_commit"] = tags.pop("mlflow.source.git.commit")
    best = metrics.get("best", {})
    for key, value in best.items():
        if isinstance(value, int | float):
            tags[f"imagen.metric.{key}"] = f"{float(value):.6g}"
    return {**tags, **ev.tags()}


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _siblings(client: Any, cascade_version: Any) -> dict[str, str]:
    """model name -> version of every model registered by the cascade version's run."""
    from imagen.mlops.registry import CASCADE_MODEL, STAGE_MODELS

    out = {CASCADE_MODEL: str(cascade_version.version)}
    for name in STAGE_MODELS.values():
        found = client.search_model_versions(
            f"name = '{name}' and run_id = '{cascade_version.run_id}'"
        )
        if found:
            out[name] = str(max(int(v.version) for v in found))
    return out


def set_alias(client: Any, versions: Mapping[str, str], alias: str) -> None:
    for name, version in versions.items():
        client.set_registered_model_alias(name, alias, version)


def promote_on_evidence(
    params: Params, versions: Mapping[str, str], ev: Evidence, *, uri: str | None = None
) -> tuple[bool, str]:
    """After registering ``versions`` (name -> version, with the cascade's): mark them
    ``challenger``, move ``champion`` when :func:`decide` says so, write the rule and both
    numbers into each version's description. Returns (promoted, description)."""
    from imagen.mlops.registry import CASCADE_MODEL

    client = _client(uri or tracking_uri(params))
    champion_alias = params.mlflow.model_alias
    current = _alias_version(client, CASCADE_MODEL, champion_alias)
    champ_ev = Evidence.from_tags(current.tags) if current is not None else None
    if params.mlflow.promote == "always":
        promote, text = (
            True,
            f"champion: promoted unconditionally (mlflow.promote: always); "
            f"{ev.metric} {ev.value:.4f}",
        )
    else:
        promote, text = decide(ev, champ_ev, None if current is None else str(current.version))
        if params.mlflow.promote == "never" and promote:
            promote, text = (
                False,
                text.replace("champion:", "challenger (mlflow.promote: never):", 1),
            )
    set_alias(client, versions, CHALLENGER)
    if promote:
        set_alias(client, versions, champion_alias)
    for name, version in versions.items():
        client.update_model_version(name, version, description=text)
    return promote, text


def promote(
    params: Params, version: str | None = None, *, uri: str | None = None
) -> dict[str, str]:
    """Move ``champion`` to cascade ``version`` (default: the challenger) and the stage models
    registered with it, by hand; returns name -> version."""
    from imagen.config import ConfigError
    from imagen.mlops.registry import CASCADE_MODEL

    client = _client(uri or tracking_uri(params))
    if version is None:
        mv = _alias_version(client, CASCADE_MODEL, CHALLENGER)
        if mv is None:
            raise ConfigError(f"{CASCADE_MODEL} has no {CHALLENGER!r} version to promote")
    else:
        from mlflow.exceptions import MlflowException

        try:
            mv = client.get_model_version(CASCADE_MODEL, str(version))
        except MlflowException as e:
            raise ConfigError(f"--version {version}: no such {CASCADE_MODEL} version") from e
    versions = _siblings(client, mv)
    set_alias(client, versions, params.mlflow.model_alias)
    note = f"promoted by hand (imagen registry promote) {time.strftime('%Y-%m-%d %H:%M:%S')}"
    for name, v in versions.items():
        old = client.get_model_version(name, v).description or ""
        client.update_model_version(name, v, description=(old + "\n" + note).strip())
    return versions


def show(params: Params, *, uri: str | None = None) -> list[dict[str, str]]:
    """The cascade's versions, newest first: version, aliases, selection evidence, description."""
    from imagen.mlops.registry import CASCADE_MODEL

    client = _client(uri or tracking_uri(params))
    # search_model_versions leaves a version's aliases empty: read them from the model
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(CASCADE_MODEL)
    except MlflowException:
        return []  # nothing registered yet
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{CASCADE_MODEL}'"),
                     key=lambda v: -int(v.version)):  # fmt: skip
        ev = Evidence.from_tags(mv.tags)
        rows.append(
            {
                "version": str(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "selection": f"{ev.metric} {ev.value:.4f}" if ev else "",
                "experiment": mv.tags.get("imagen.dvc.exp_name", ""),
                "description": (mv.description or "").splitlines()[0] if mv.description else "",
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# CLI: imagen registry <action>
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    p = sub.add_parser("promote", help="move the champion alias to a cascade version by hand")
    p.add_argument("--version", default=None, help="imagen-cascade version (default: challenger)")
    sub.add_parser("show", help="the imagen-cascade versions, aliases and evidence")


def main(args: argparse.Namespace, params: Params) -> int:
    if args.action == "promote":
        versions = promote(params, args.version)
        print(
            f"{params.mlflow.model_alias}: " + ", ".join(f"{k} v{v}" for k, v in versions.items())
        )
        return 0
    for row in show(params):
        print(f"v{row['version']:<4} {row['aliases']:<22} {row['selection']:<36} "
              f"{row['experiment']:<16} {row['description']}")  # fmt: skip
    return 0
