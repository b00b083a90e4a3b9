"""Autoguidance's guide model: a weaker version of a stage, read from wherever it is kept.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself")
extrapolates from a guide model's prediction towards the main model's, both on the same text.
The guide is the same stage less trained (an earlier checkpoint) or smaller; it must denoise
the same images from the same text: same stage, resolution, channels, text embedding size and
preconditioning. A guide source is any of

- a stage model file (``models/<stage>/model.pt``) or its folder: its EMA weights;
- a training checkpoint (``models/<stage>/checkpoints/*.ckpt``, what ``imagen train`` keeps):
  its EMA weights, else its weights;
- a registered model (``models:/imagen-base64@champion``, ``models:/imagen-cascade/3``, or a
  ``runs:/`` URI): downloaded from the tracking server first.

Every failure names the config key (or option) that gave the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagen.checkpoint import MODEL_FILE, read_stage
from imagen.config import ConfigError, StageConfig

_NET, _EMA = "denoiser.net.", "ema.module."


def _local_file(source: str, stage: str, key: str, tracking_uri: str | None) -> Path:
    """The file behind ``source`` (a registry URI downloaded; a folder's model.pt)."""
    if source.startswith(("models:/", "runs:/")):
        from imagen.mlops.client import download

        try:
            local = Path(download(source, tracking_uri))
        except Exception as e:  # MlflowException, OSError: the server or the name is wrong
            raise ConfigError(f"{key}={source}: cannot be downloaded ({e})") from e
        for candidate in (local / MODEL_FILE, local / "artifacts" / stage / MODEL_FILE, local):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"{key}={source}: holds no {stage} {MODEL_FILE}")
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{key}={source}: no such file (a stage model.pt or its folder, a training "
            "checkpoint .ckpt under models/<stage>/checkpoints/, or a models:/ URI)"
        )
    return path


def _read_checkpoint(path: Path, key: str, source: str) -> tuple[StageConfig, dict]:
    """A training checkpoint -> (its stage config, the EMA UNet's weights, else the UNet's)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, pickled code
        raise ConfigError(f"{key}={source}: not a readable training checkpoint ({e})") from e
    meta = ckpt.get("imagen") if isinstance(ckpt, dict) else None
    if not meta or "stage" not in meta or "state_dict" not in ckpt:
        raise ConfigError(f"{key}={source}: not an imagen training checkpoint (no stage in it)")
    state = ckpt["state_dict"]
    ema = {k[len(_EMA) :]: v for k, v in state.items() if k.startswith(_EMA)}
    net = {k[len(_NET) :]: v for k, v in state.items() if k.startswith(_NET)}
    return StageConfig.model_validate(meta["stage"]), ema or net


def read_guide(
    source: str | Path,
    stage: str | None = None,
    *,
    key: str = "sampling.guide",
    tracking_uri: str | None = None,
) -> tuple[nn.Module, StageConfig]:
    """Build the guide UNet from ``source``; returns ``(net.eval(), its config)`` (the stage a
    registry URI's cascade model is read at: ``stage``, else :func:`uri_stage`)."""
    from imagen.nn import build_unet

    source = str(source)
    path = _local_file(source, stage or uri_stage(source), key, tracking_uri)
    if path.suffix == ".ckpt":
        config, state = _read_checkpoint(path, key, source)
    else:
        try:
            config, state, _ = read_stage(path)
        except (ValueError, RuntimeError, OSError) as e:
            raise ConfigError(f"{key}={source}: {e}") from e
    net = build_unet(config.model)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{key}={source}: its weights do not fit its own config ({e})") from e
    return net.eval().requires_grad_(False), config


def check_guide_fits(guide: StageConfig, main: StageConfig, source: str, key: str) -> None:
    """The guide must denoise what the main model denoises: a clear error naming ``key``."""
    checks: list[tuple[str, Any, Any]] = [
        ("stage", guide.name, main.name),
        ("resolution", guide.resolution, main.resolution),
        ("low-res size", guide.lowres, main.lowres),
        ("image channels", guide.model.unet.channels, main.model.unet.channels),
        (
            "text embedding size",
            guide.model.conditioning.embed_dim,
            main.model.conditioning.embed_dim,
        ),
        ("preconditioning", guide.model.preconditioning_type, main.model.preconditioning_type),
        (
            "preconditioning settings",
            guide.model.preconditioning.model_dump(),
            main.model.preconditioning.model_dump(),
        ),
        ("lowres_residual", guide.model.lowres_residual, main.model.lowres_residual),
    ]
    for what, got, want in checks:
        if got != want:
            raise ConfigError(
                f"{key}={source}: the guide's {what} is {got!r}, the {main.name} model's "
                f"{want!r}; a guide must be a version of the same stage"
            )


def uri_stage(source: str) -> str:
    """The stage a registry URI's guide is taken from: the one a stage model names
    (``models:/imagen-sr256@champion``), else base64 (a cascade model's first stage)."""
    name = source.split(":/", 1)[-1].lstrip("/").split("@")[0].split("/")[0]
    return name.removeprefix("imagen-") if name in ("imagen-sr256", "imagen-sr1024") else "base64"
