"""Training checkpoints: atomic writes, safe loads, and which checkpoint a re-run resumes from."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from imagen.checkpoint import atomic_torch_save
from imagen.config import StageConfig

LAST_CKPT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through a temporary file + ``os.replace``; reads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


_RESUMABLE_CHANGES = {
    "trainer.max_steps",
    "trainer.checkpoint_every_n_steps",
    "trainer.sample_every_n_steps",
    "trainer.log_every_n_steps",
}


def resume_path(out: Path, stage: StageConfig | None = None) -> Path | None:
    """The checkpoint a re-run continues from (``checkpoints/last.ckpt``), if any.

    With ``stage``, a checkpoint written under another stage config (a DVC param change, say a
    new learning rate or UNet preset; only the keys in ``_RESUMABLE_CHANGES`` and ``sampling``
    may differ) is set aside as ``last.ckpt.stale`` and training starts from scratch.
    """
    last = out / "checkpoints" / LAST_CKPT
    if not last.is_file():
        return None
    if stage is None:
        return last
    from contextlib import suppress

    from imagen.config import flatten

    saved = torch.load(last, map_location="cpu", weights_only=True).get("imagen", {}).get("stage")
    now = flatten(stage.model_dump(mode="json"))
    then = flatten(saved or {})
    changed = {
        k
        for k in now.keys() | then.keys()
        if now.get(k) != then.get(k)
        and k not in _RESUMABLE_CHANGES
        and not k.startswith("sampling.")
    }
    if not changed:
        return last
    print(
        f"imagen train: not resuming {last}: written with other settings "
        f"({', '.join(sorted(changed)[:5])}); starting from scratch",
        file=sys.stderr,
        flush=True,
    )
    with suppress(FileNotFoundError):  # another rank moved it first
        last.replace(last.with_name(LAST_CKPT + ".stale"))
    return None
