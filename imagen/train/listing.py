"""``imagen checkpoints --stage NAME``: every checkpoint of a stage, and how it differs.

One row per file in ``<out>/checkpoints``: step, when it was written, its size, whether it
resumes under the current params (``resumes``) and, if not, the state-relevant settings that
differ from the current params.yaml; unreadable files are listed as such.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imagen.config import STAGES, Params, StageConfig
from imagen.train.checkpoints import checkpoint_files, read_info
from imagen.train.settings import changed_settings, describe, settings_hash


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def checkpoint_rows(folder: Path, stage: StageConfig) -> list[dict[str, str]]:
    """The rows of the listing (newest first); ``differs`` is empty when a file resumes."""
    now = stage.model_dump(mode="json")
    current = settings_hash(now)
    rows = []
    for path in checkpoint_files(folder) + sorted(folder.glob("*.corrupt-*")):
        try:
            info = read_info(path)
        except Exception as e:  # noqa: BLE001 - listed, never loaded
            why = f"unreadable ({type(e).__name__})"
            rows.append({"file": path.name, "step": "?", "written": "", "size": "",
                         "settings": "", "differs": why})  # fmt: skip
            continue
        rows.append(
            {
                "file": path.name,
                "step": str(info.step),
                "written": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.written)),
                "size": _size(info.size),
                "settings": info.settings,
                "differs": "" if info.settings == current
                else describe(changed_settings(info.stage, now), limit=4),
            }
        )  # fmt: skip
    return sorted(rows, key=lambda r: (r["written"], r["file"]), reverse=True)


def format_rows(rows: list[dict[str, str]]) -> str:
    """A plain-text table (``resumes`` where no state-relevant setting differs)."""
    cols = ("file", "step", "written", "size", "settings")
    table = [[*cols, "vs current params"]]
    table += [[r[c] for c in cols] + [r["differs"] or "resumes"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in table
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--out", default=None, help="stage folder (default: <models_dir>/<stage>)")


def main(args: argparse.Namespace, params: Params) -> int:
    stage = params.stage(args.stage)
    folder = (Path(args.out) if args.out else Path(params.models_dir) / args.stage) / "checkpoints"
    rows = checkpoint_rows(folder, stage)
    if not rows:
        print(f"{folder}: no checkpoints")
        return 0
    print(f"{folder} (current settings {settings_hash(stage.model_dump(mode='json'))})")
    print(format_rows(rows))
    fine_tune = f"-S stages.{args.stage}.trainer.init_from={folder}/<file>"
    print(f"\nfine-tune from any of them: imagen train --stage {args.stage} {fine_tune}")
    return 0
