"""Option values of the cascade's sampling: one for every stage or per stage, negative prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

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
