"""``sampling``: how a stage samples (sampler, steps, guidance, thresholding, schedule)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from imagen.config.base import Strict as _Strict

SamplerName = Literal["heun", "euler", "ddpm", "ddim", "dpmpp_2m"]


class SamplingConfig(_Strict):
    """How a stage samples. A stage's unset steps / guidance_scale take NeMo's inference
    defaults (steps 30/20/20, guidance 7.5/8/7.5); ``sampler: auto`` is NeMo's choice: the EDM
    Heun sampler for EDM stages, ancestral DDPM for DDPM stages."""

    sampler: SamplerName | Literal["auto"] = "auto"
    steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    guidance_interval: tuple[float, float] | None = Field(
        None,
        description="[lo, hi]: guide only at noise levels lo < sigma <= hi, the conditional "
        "prediction alone elsewhere (Kynkaanniemi et al. 2024; NeMo: every level)",
    )
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    dynamic_threshold: float | None = Field(0.995, gt=0.5, le=1.0)
    s_churn: float = Field(0.0, ge=0)
    s_tmin: float = Field(0.0, ge=0)
    s_tmax: float = Field(float("inf"), ge=0)
    s_noise: float = Field(1.0, gt=0)
    thresholding: Literal["dynamic", "static", "none"] = Field(
        "dynamic", description="x0 clipping: dynamic (percentile dynamic_threshold), [-1, 1], off"
    )
    schedule: Literal["auto", "karras", "uniform_t"] = Field(
        "auto", description="sigma discretisation; auto: karras for EDM, uniform t for DDPM"
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="ddim: 0 deterministic, 1 ancestral")
    guidance: Literal["cfg", "auto"] = Field(
        "cfg",
        description="cfg: classifier-free guidance (NeMo); auto: autoguidance (Karras et al. "
        "2024), D_guide + guidance_scale (D - D_guide) with the guide model on the same text",
    )
    guide: str | None = Field(
        None,
        description="guidance auto: the guide, a weaker version of this stage (a model.pt or "
        "its folder, a training checkpoint .ckpt, or a models:/ URI)",
    )

    @model_validator(mode="after")
    def _guide_named(self) -> SamplingConfig:
        if self.guidance == "auto" and not self.guide:
            raise ValueError("guide: guidance 'auto' (autoguidance) needs a guide model path")
        return self

    @field_validator("guidance_interval")
    @classmethod
    def _ordered_interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"must be [lo, hi] with 0 <= lo < hi, got {list(v)}")
        return v
