"""Option values of the cascade's sampling: one for every stage or per stage, negative prompts,
and the noise generators a seed gives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from imagen.config import STAGES, ConfigError

T = TypeVar("T")
PerStage = T | Mapping[str, T] | None  # one value for every stage, or stage -> value


# --------------------------------------------------------------------------------------------
def parse_stage_values(text: str | None, cast: type, option: str) -> PerStage:
    """``"30"`` -> 30 (all stages); ``"base64=30,sr256=20"`` -> {"base64": 30, "sr256": 20}."""
    if text is None:
        return None
    text = text.strip()
    if "=" not in text:
        try:
            return cast(text)
        except ValueError as e:
            raise ConfigError(f"{option}: {text!r} is not a {cast.__name__}") from e
    out: dict[str, Any] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"{option}: {part!r} should be stage=value (e.g. base64=30)")
        stage, value = (s.strip() for s in part.split("=", 1))
        if stage not in STAGES:
            raise ConfigError(f"{option}: unknown stage {stage!r}; allowed: {list(STAGES)}")
        try:
            out[stage] = cast(value)
        except ValueError as e:
            raise ConfigError(f"{option}: {stage}={value!r} is not a {cast.__name__}") from e
    return out


def for_stage(value: PerStage, stage: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(stage)
    return value


def negative_prompts(negative: Sequence[str] | str | None, n: int) -> list[str] | None:
    """One negative prompt per prompt: ``negative`` as given (n of them) or one for all; None
    when there is none to use (no list, or every entry empty)."""
    if negative is None:
        return None
    given = [negative] if isinstance(negative, str) else [str(t) for t in negative]
    if len(given) == 1:
        given = given * n
    if len(given) != n:
        raise ConfigError(
            f"{len(given)} negative prompts for {n} prompts: give one for all, or one per prompt"
        )
    return given if any(given) else None


def image_generators(seeds: Sequence[int], stage_index: int, device: torch.device) -> Any:
    """One generator per image on ``device``, seeded by (its seed, the stage)."""
    from imagen.diffusion import SampleGenerators

    return SampleGenerators(
        torch.Generator(device).manual_seed((int(s) * 1_000_003 + stage_index * 10_007) % (2**63))
        for s in seeds
    )


def batch_generator(
    seed: int, stage_index: int, batch_index: int, device: torch.device
) -> torch.Generator:
    # One generator per (seed, stage, batch) on the sampling device: the noise is drawn where
    # the networks run (no host randn and copy per step); a seed gives the same images on the
    # same kind of device.
    return torch.Generator(device).manual_seed(
        (int(seed) * 1_000_003 + stage_index * 10_007 + batch_index) % (2**63)
    )
