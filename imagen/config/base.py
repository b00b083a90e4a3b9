"""Shared pieces of the typed configuration: the error type, the strict base model, stage names."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

StageName = Literal["base64", "sr256", "sr1024"]
STAGES: tuple[str, ...] = get_args(StageName)
"""The cascade's stages, in sampling order; each is one ``stages.<name>`` block of params.yaml."""

# (output resolution, low-res input resolution) of each stage unless params.yaml says otherwise
STAGE_RESOLUTIONS: dict[str, tuple[int, int | None]] = {
    "base64": (64, None),
    "sr256": (256, 64),
    "sr1024": (1024, 256),
}


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names each offending key and what is allowed."""


class Strict(BaseModel):
    """Rejects unknown keys, so a misspelt key stops the program with its full path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
