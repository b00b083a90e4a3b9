"""Writing an imported NeMo config as a params profile, and the summary printed beside it.

The profile is a YAML mapping of dotted params keys (what ``--profile`` reads), each with the
NeMo key it came from as a comment; the header lists every NeMo key that was not mapped with
the reason, the keys that need no params key (the project already does what they say), and
the commands that use the profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagen.nemo.config_rules import Imported


def yaml_value(value: Any) -> str:
    """One value in YAML flow style that PyYAML reads back as the same value (floats keep a
    dot, so ``1e-08`` is not read as a string)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            text = text.replace("e", ".0e")
        return text if text not in ("inf", "-inf", "nan") else f".{text.lstrip('-')}"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def _commands(imp: Imported, out: Path) -> list[str]:
    if imp.kind == "training":
        return [
            f"imagen ingest   --profile {out}   # -S data.source_path=... for other shards",
            f"imagen precache --profile {out}   # NeMo's precached pickles are kept, not encoded",
            f"imagen train    --profile {out} --stage {imp.stage}",
        ]
    if imp.kind == "fid":
        return [f"imagen evaluate --profile {out}"]
    return [f"imagen sample --profile {out} --models models"]


def _section(title: str, notes: list[tuple[str, str, str]], kind: str) -> list[str]:
    rows = [f"#   {nemo}: {why}" for k, nemo, why in notes if k == kind]
    return [f"# {title}:", *rows, "#"] if rows else []


def render_profile(imp: Imported, out: Path) -> str:
    """The profile's text: header comments, then one ``key: value  # NeMo key`` per line."""
    where = f", stage {imp.stage}" if imp.stage else ""
    lines = [
        f"# Profile imported from NeMo's {imp.source.name} ({imp.kind} config{where}) by",
        f"#   imagen import-nemo --config {imp.source}",
        "#",
        "# Use it:",
        *(f"#   {c}" for c in _commands(imp, out)),
        "#",
        *_section("Not mapped (NeMo key: why)", imp.notes, "unmapped"),
        *_section("No params key needed: the project already does this", imp.notes, "same"),
        *_section("Notes on mapped keys", imp.notes, "note"),
    ]
    texts = {k: f"{k}: {yaml_value(v)}" for k, v in imp.values.items()}
    width = min(72, max((len(t) for t in texts.values()), default=0)) + 2
    for key, text in texts.items():
        lines.append(f"{text.ljust(width)}# {imp.origin[key]}")
    return "\n".join(lines) + "\n"


def summary(imp: Imported, out: Path) -> str:
    """What ``imagen import-nemo --config`` prints: counts, every unmapped key, what to run."""
    unmapped = [(n, w) for k, n, w in imp.notes if k == "unmapped"]
    same = sum(1 for k, _, _ in imp.notes if k == "same")
    where = f", stage {imp.stage}" if imp.stage else ""
    lines = [
        f"imported {imp.source} ({imp.kind} config{where}) -> {out}: "
        f"{len(imp.values)} params keys; {same} NeMo keys need none (the project already "
        f"does what they say); {len(unmapped)} not mapped:",
        *(f"  - {n}: {w}" for n, w in unmapped),
        "next:",
        *(f"  {c}" for c in _commands(imp, out)),
    ]
    return "\n".join(lines)
