"""Shared pieces of the typed configuration: the error type, the strict base model, stage names."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

STAGES: tuple[str, ...] = ("base64", "sr256", "sr1024")
"""The cascade's stages, in sampling order; each is one ``stages.<name>`` block of params.yaml."""

# (output resolution, low-res input resolution) of each stage unless params.yaml says otherwise
STAGE_RESOLUTIONS: dict[str, tuple[int, int | None]] = {
    "base64": (64, None),
    "sr256": (256, 64),
    "sr1024": (1024, 256),
}

# Each stage's sampling unless params.yaml says otherwise: NeMo's inference defaults
# (conf/inference_pipeline.yaml). A stage trained with DDPM preconditioning samples with the
# DDPM ancestral sampler, as NeMo's DDPMSampler does; EDM stages with Heun (NeMo's EDMSampler).
STAGE_SAMPLING: dict[str, dict[str, Any]] = {
    "base64": {"steps": 30, "guidance_scale": 7.5},
    "sr256": {"steps": 20, "guidance_scale": 8.0},
    "sr1024": {"steps": 20, "guidance_scale": 7.5},
}


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names each offending key and what is allowed."""


class Strict(BaseModel):
    """Rejects unknown keys, so a misspelt key stops the program with its full path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
