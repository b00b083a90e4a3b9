"""Which checkpoint a re-run continues from, and what it sets aside on the way.

The newest readable checkpoint written with the current state-relevant settings
(:mod:`imagen.train.settings`) is the resume point: ``last.ckpt``, else a kept or set-aside file
whose name carries the current settings hash. On the way:

- a ``last.ckpt`` of other settings is renamed to ``step=N-settings=H-last.ckpt`` (never over
  another file) and the message names the keys that differ and how to continue from it;
- an unreadable file (truncated, disk full before the atomic writer existed) is renamed to
  ``<name>.corrupt-<time>`` and reported; the next good one is used;
- temporary files of writes that never finished are removed.

Only rank zero renames; every rank computes the same choice from the same files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.config import StageConfig
from imagen.train.checkpoints import (
    LAST_CKPT,
    CheckpointInfo,
    checkpoint_files,
    name_step_settings,
    read_info,
    set_aside_corrupt,
    set_aside_last,
    unfinished_writes,
)
from imagen.train.settings import all_changes, changed_settings, describe, settings_hash


@dataclass
class ResumeChoice:
    """The resume point (None: start from scratch) and what was reported on the way."""

    path: Path | None = None
    step: int = 0
    saved: dict[str, Any] = field(default_factory=dict)  # the stage config it was trained with
    messages: list[str] = field(default_factory=list)


def _say(choice: ResumeChoice, text: str, report: bool) -> None:
    choice.messages.append(text)
    if report:
        print(f"imagen train: {text}", file=sys.stderr, flush=True)


def _named(folder: Path, settings: str) -> list[Path]:
    """Kept and set-aside files named with ``settings``, newest step first (set-aside last.ckpt
    before a kept file of the same step)."""
    named = []
    for p in checkpoint_files(folder):
        parsed = name_step_settings(p)
        if parsed and parsed[1] == settings:
            named.append((parsed[0], "-last" in p.stem, p))
    named.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [p for _, _, p in named]


def _read(path: Path, choice: ResumeChoice, apply: bool, report: bool) -> CheckpointInfo | None:
    try:
        return read_info(path)
    except FileNotFoundError:  # rank zero set it aside while this rank looked
        return None
    except Exception as e:  # noqa: BLE001 - any unreadable file is set aside, never loaded
        where = set_aside_corrupt(path) if apply else path
        _say(
            choice, f"{path} cannot be read ({type(e).__name__}: {e}); set aside as {where}", report
        )
        return None


def _stale(info: CheckpointInfo, now: dict[str, Any], apply: bool) -> str:
    """Set aside a last.ckpt of other settings; the message saying how to continue from it."""
    kept = set_aside_last(info) if apply else info.path
    stage = now.get("name", "<stage>")
    return (
        f"not resuming {info.path} (step {info.step}): written with other settings "
        f"({describe(changed_settings(info.stage, now))}); kept as {kept}. To fine-tune from it: "
        f"-S stages.{stage}.trainer.init_from={kept}; to resume it, run with its settings again. "
        f"`imagen checkpoints --stage {stage}` lists every checkpoint"
    )


def resume_note(saved: dict[str, Any], stage: StageConfig) -> str | None:
    """What changed since the checkpoint (none of it state-relevant) and, for another number of
    devices or nodes, how training goes on."""
    changes = all_changes(saved, stage.model_dump(mode="json")) if saved else {}
    if not changes:
        return None
    note = f"changed since the checkpoint (the state still applies): {describe(changes)}"
    if {"trainer.devices", "trainer.num_nodes"} & changes.keys():
        note += (
            "; Lightning builds the data-parallel group anew and the data stream starts a new "
            "pass, shard order seeded by the step, split over the new ranks (docs/training.md)"
        )
    return note


def choose_resume(
    folder: Path, stage: StageConfig, *, apply: bool = True, report: bool = True
) -> ResumeChoice:
    """The checkpoint in ``folder`` to resume ``stage`` from (see the module docstring).

    ``apply`` renames (rank zero); ``report`` prints each message to stderr.
    """
    now = stage.model_dump(mode="json")
    settings = settings_hash(now)
    choice = ResumeChoice()
    if apply:
        for tmp in unfinished_writes(folder):
            tmp.unlink(missing_ok=True)
            _say(choice, f"removed {tmp} (a checkpoint write that never finished)", report)
    best: CheckpointInfo | None = None
    last = folder / LAST_CKPT
    info = _read(last, choice, apply, report) if last.is_file() else None
    if info is not None and info.settings != settings:
        _say(choice, _stale(info, now, apply), report)
    elif info is not None:
        best = info
    for path in _named(folder, settings):  # a kept file newer than last.ckpt, or its stand-in
        parsed = name_step_settings(path)
        if best is not None and parsed is not None and parsed[0] <= best.step:
            break
        info = _read(path, choice, apply, report)
        if info is not None and info.settings == settings:
            best = info
            break
    if best is not None:
        choice.path, choice.step, choice.saved = best.path, best.step, best.stage
    return choice
