"""Training checkpoints on disk: atomic writes, safe loads, names, and what a file holds.

Files in ``<out>/checkpoints/``:

    last.ckpt                               the resume point of the current settings
    step=0000200-settings=ab12cd34.ckpt     kept by the keeping rule (trainer.keep)
    step=0000200-settings=ab12cd34-last.ckpt  a last.ckpt set aside (written with other settings)
    last.ckpt.corrupt-<time>                an unreadable file set aside at start

``settings`` is :func:`imagen.train.settings.settings_hash` of the stage config the state was
trained with, so files of different settings never share a name.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from imagen.checkpoint import atomic_torch_save

LAST_CKPT = "last.ckpt"
_NAME = re.compile(r"step=(\d+)-settings=([0-9a-f]+)")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file too large, I/O error)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through a temporary file + ``os.replace``; reads with ``weights_only=True``.

    A write that fails part-way leaves the previous file of that name untouched and raises
    :class:`CheckpointWriteError` naming the path and the cause.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        try:
            atomic_torch_save(checkpoint, path)
        except Exception as e:  # disk full surfaces as OSError or torch's RuntimeError
            old = "the earlier file there is intact" if Path(path).is_file() else "none replaced"
            raise CheckpointWriteError(
                f"writing checkpoint {path} failed ({type(e).__name__}: {e}{_limits(path)}); {old}"
            ) from e

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def _limits(path: Any) -> str:
    """What may have stopped a write: free disk space, a file-size limit (torch's zip writer
    reports a failed write as 'unexpected pos')."""
    import resource
    import shutil

    free = shutil.disk_usage(Path(path).parent).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = f"; file size limit {soft} bytes (ulimit -f)" if soft != resource.RLIM_INFINITY else ""
    return f"; {free / 2**20:.0f} MB free on its disk{limit}"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file holds, read without loading its tensors (``mmap``)."""

    path: Path
    step: int
    stage: dict[str, Any]  # the stage config it was trained with (model_dump, json mode)
    settings: str  # settings_hash of that config
    written: float  # file mtime (seconds since the epoch)
    size: int  # bytes

    @property
    def is_last(self) -> bool:
        return self.path.name == LAST_CKPT or self.path.stem.endswith("-last")


def read_info(path: Path) -> CheckpointInfo:
    """Read a checkpoint's step and settings; raises on a truncated or foreign file."""
    from imagen.train.settings import settings_hash

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError("not a Lightning training checkpoint (no global_step)")
    meta = ckpt.get("imagen") or {}
    stage = meta.get("stage") or {}
    settings = meta.get("settings") or settings_hash(stage)
    st = path.stat()
    return CheckpointInfo(path, int(ckpt["global_step"]), stage, settings, st.st_mtime, st.st_size)


def kept_name(step: int, settings: str, suffix: str = "") -> str:
    """``step=0000200-settings=ab12cd34<suffix>.ckpt`` (the kept and set-aside names)."""
    return f"step={step:07d}-settings={settings}{suffix}.ckpt"


def unique_path(path: Path) -> Path:
    """``path``, or ``<stem>-1<suffix>``, ``-2`` ... : a name no existing file has."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def set_aside_last(info: CheckpointInfo) -> Path:
    """Rename a ``last.ckpt`` of other settings to its kept name (never over another file)."""
    target = unique_path(info.path.with_name(kept_name(info.step, info.settings, "-last")))
    info.path.replace(target)
    return target


def set_aside_corrupt(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``<name>.corrupt-<time>`` so it is never loaded."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = unique_path(path.with_name(f"{path.name}.corrupt-{stamp}"))
    path.replace(target)
    return target


def name_step_settings(path: Path) -> tuple[int, str] | None:
    """(step, settings) from a kept or set-aside file name, else None."""
    m = _NAME.match(path.name)
    return (int(m.group(1)), m.group(2)) if m else None


def checkpoint_files(folder: Path) -> list[Path]:
    """Every loadable-looking checkpoint in ``folder``: last.ckpt and the kept ones."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


def unfinished_writes(folder: Path) -> list[Path]:
    """Temporary files of writes that never reached their rename (a killed run)."""
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
