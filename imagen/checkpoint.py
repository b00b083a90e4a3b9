"""Stage model files: atomic writes and safe (weights_only) loads.

A trained stage lives in ``models/<stage>/model.pt``: the EMA weights of its UNet plus the
resolved stage config they were trained with, so a model file is self-describing and can be
sampled from without params.yaml. Everything in it is tensors and plain Python types, so it
loads with ``torch.load(weights_only=True)``: no code runs from a model file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imagen.config import StageConfig

FORMAT = "imagen-stage/1"
MODEL_FILE = "model.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A reader (or a resumed run) never sees a half-written file: either the old file or the new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_stage(
    path: str | Path,
    stage: StageConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a stage model file (a folder gets ``model.pt`` inside it)."""
    path = Path(path)
    if path.suffix != ".pt":
        path = path / MODEL_FILE
    payload = {
        "format": FORMAT,
        "stage": stage.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "step": int(step),
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(payload, path)


def read_stage(path: str | Path) -> tuple[StageConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a stage model file: (stage config, state dict, {"step", "extra"})."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no trained stage model here; run `imagen train --stage <name>` "
            "(or `dvc repro`) first"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an imagen stage model file (expected format {FORMAT})")
    stage = StageConfig.model_validate(payload["stage"])
    return stage, payload["state_dict"], {"step": payload["step"], "extra": payload["extra"]}


def load_stage(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, StageConfig]:
    """Build the stage's UNet, load its EMA weights, return ``(net.eval(), stage)``."""
    from imagen.nn import build_unet

    stage, state_dict, _ = read_stage(path)
    net = build_unet(stage.model)
    net.load_state_dict(state_dict)
    return net.to(device).eval(), stage
