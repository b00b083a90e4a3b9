"""DVC experiments as ``dvc exp show --json`` lists them: by name, with their params and
metrics files (the JSON nests experiments under their baseline at a depth that differs between
DVC versions, so it is searched whole)."""

from __future__ import annotations

from typing import Any


def by_name(shown: Any) -> dict[str, dict[str, Any]]:
    """Experiment name -> its ``data`` entry (``params``, ``metrics``, ...), at any nesting, with
    ``rev``, the experiment's commit (DVC lists only scalars of a metrics file; the whole file
    is ``dvc.api.read(path, rev=rev)``)."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                found[node["name"]] = {**node["data"], "rev": node.get("rev")}
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def flat(data: dict[str, Any]) -> dict[str, Any]:
    """One experiment's ``data``: params.yaml's values and each metrics file's values."""
    return {
        "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
        "metrics": {k: (v or {}).get("data", {}) for k, v in data.get("metrics", {}).items()},
    }
