"""Reading a NeMo YAML config as NeMo's OmegaConf would: floats like ``1e-8``, interpolations.

NeMo loads its configs with OmegaConf, which reads ``1e-8`` as a float (YAML 1.1, and so
PyYAML, reads it as a string) and resolves ``${a.b}`` (absolute) and ``${..x}`` (relative)
interpolations. :func:`read_nemo_yaml` does both with PyYAML and a small resolver, so no
OmegaConf is needed; resolver calls such as ``${oc.env:X}`` are reported, not evaluated.
:func:`leaves` lists every key path of the result with its value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from imagen.config import ConfigError

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_INTERP = re.compile(r"\$\{([^${}]*)\}")


def _floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    if isinstance(node, str) and _FLOAT.match(node.strip()):
        return float(node)
    return node


def _lookup(root: dict[str, Any], where: list[str], ref: str, path: str) -> tuple[Any, list[str]]:
    """The node ``ref`` names, seen from the mapping at key path ``where``, and its path."""
    if ":" in ref:
        raise ConfigError(f"{path}: the resolver ${{{ref}}} is not supported; give the value")
    dots = len(ref) - len(ref.lstrip("."))
    parts = [p for p in ref.lstrip(".").split(".") if p]
    base = where[: len(where) - (dots - 1)] if dots else []
    node: Any = root
    for p in [*base, *parts]:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            raise ConfigError(f"{path}: the interpolation ${{{ref}}} names no key of the config")
    return node, [*base, *parts]


def _resolve(root: dict[str, Any], node: Any, where: list[str], depth: int = 0) -> Any:
    if depth > 20:
        raise ConfigError(f"{'.'.join(where)}: interpolations refer to each other in a cycle")
    if isinstance(node, dict):
        return {k: _resolve(root, v, [*where, str(k)], depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(root, v, [*where, str(i)], depth) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    path, parent = ".".join(where), where[:-1]
    whole = _INTERP.fullmatch(node.strip())
    if whole:  # the value itself: keeps its type
        target, at = _lookup(root, parent, whole.group(1), path)
        return _resolve(root, target, at, depth + 1)

    def text(m: re.Match[str]) -> str:
        target, at = _lookup(root, parent, m.group(1), path)
        return str(_resolve(root, target, at, depth + 1))

    return _INTERP.sub(text, node)


def read_nemo_yaml(path: str | Path) -> dict[str, Any]:
    """A NeMo config file as a plain dict, floats read and interpolations resolved."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a NeMo config is a mapping at the top level")
    raw = _floats(raw)
    return _resolve(raw, raw, [])


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; lists of mappings are walked with their index."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, node
