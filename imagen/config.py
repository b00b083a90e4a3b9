"""Typed, validated configuration: params.yaml -> pydantic objects, plus the UNet presets.

params.yaml is the one file a user edits. Its layout mirrors NeMo's per-stage config files
(``model.unet_type``, ``model.unet.*``, ``model.conditioning.*``, ``model.preconditioning*``,
``model.channels_last``, ``model.inductor``, ``trainer.precision``), with one difference: the
cascade has three stages, so ``stages.<name>.model`` and ``stages.<name>.trainer`` hold the
per-stage values and the top-level ``model`` / ``trainer`` blocks hold defaults shared by all
stages (a stage's keys win).

Every model rejects unknown keys (``extra="forbid"``), so a misspelt key stops the program with
its full path before any work is done. :func:`load_params` is the single entry point.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

STAGES: tuple[str, ...] = ("base64", "sr256", "sr1024")
AttentionType = Literal["self", "cross", "stacked", "fused"]
UNetType = Literal["base", "sr-unet", "sr"]


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names each offending key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------
# model.conditioning (seed: "Text Encoder")
# --------------------------------------------------------------------------------------------
class EncoderConfig(_Strict):
    """The small T5 the embedded default builds from a config (used when encoder_path is the
    project's own encoder folder and that folder does not exist yet)."""

    d_model: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    d_ff: int = Field(512, gt=0)
    seed: int = 0
    tokenizer: Literal["byt5", "word"] = Field(
        "byt5",
        description="byt5: bytes, any caption; word: one token per word of the embedded "
        "grammar (imagen.text_vocab), far easier for a random encoder, unknown words -> <unk>",
    )


class ConditioningConfig(_Strict):
    """NeMo's ``model.conditioning`` block."""

    embed_dim: int = Field(256, gt=0, description="text feature dim after encoding (T5: 1024/4096)")
    token_length: int = Field(64, gt=0, description="precached features are padded/trimmed to this")
    drop_rate: float = Field(0.1, ge=0.0, le=1.0, description="classifier-free guidance text drop")
    precached_key: str = "embeddings_t5_xxl"
    out_key: str = "t5_text"
    online_encoding: bool = False
    encoder_path: str = Field("data/encoder", description="T5 folder; the default is built here")
    encoder: EncoderConfig = EncoderConfig()
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    @field_validator("encoder_path")
    @classmethod
    def _no_placeholder(cls, v: str) -> str:
        if v.strip() in {"", "???"}:
            raise ValueError("must name a T5 folder or hub id (NeMo's '???' placeholder is unset)")
        return v


# --------------------------------------------------------------------------------------------
# model.unet (seed: "Regular UNet" / "Efficient UNet" / "Attention Blocks")
# --------------------------------------------------------------------------------------------
class UNetConfig(_Strict):
    """Union of the Regular UNet and Efficient UNet keys; ``unet_type`` picks which apply.

    Regular (base, sr-unet): num_res_blocks (or num_resblocks, one per level, which wins),
    attention_resolutions, resblock_updown, resample_with_conv (learned strided conv down /
    transposed conv up; else average pooling / nearest), dropout.
    Efficient (sr): num_resblocks (per level), atnn_enabled_at
    (per level, the seed's spelling; attn_enabled_at is accepted too), stride,
    skip_connection_scaling.
    """

    embed_dim: int = Field(64, gt=0, description="base channel count of each ResBlock")
    image_size: int = Field(64, gt=0)
    channels: int = Field(3, gt=0)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1)
    num_attn_heads: int = Field(4, gt=0)
    per_head_channels: int = Field(64, gt=0)
    cond_dim: int = Field(512, gt=0, description="size of the text conditioning projection")
    attention_type: AttentionType = "fused"
    feature_pooling_type: Literal["attention", "mean"] = "attention"
    learned_sinu_pos_emb_dim: int = Field(0, ge=0)
    use_null_token: bool = False
    masked_pooling: bool = Field(
        False,
        description="pool the text over its valid tokens only (NeMo pools over every position, "
        "padding included)",
    )
    context_norm: Literal["group", "layer"] = Field(
        "group",
        description="text-context norm of the attention blocks: group (NeMo's GroupNorm over "
        "every token position, padding included) or layer (each token on its own)",
    )
    noise_cond_scale: float = Field(
        1.0,
        gt=0,
        description="multiplies the noise level before its sinusoidal features (NeMo: 1; 1000 "
        "spreads an order-1 input over every feature band)",
    )
    init_conv_kernel_size: int = Field(3, gt=0)
    gradient_checkpointing: bool = False
    scale_shift_norm: bool = True
    stable_attention: bool = True
    flash_attention: bool = False
    # Regular UNet
    num_res_blocks: int = Field(3, gt=0)
    attention_resolutions: list[int] = Field(default_factory=lambda: [8, 16, 32])
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="model dropout; False means 0")
    resblock_updown: bool = False
    resample_with_conv: bool = True
    # Efficient UNet
    num_resblocks: list[int] | None = None
    atnn_enabled_at: list[int] | None = Field(
        None, validation_alias=AliasChoices("atnn_enabled_at", "attn_enabled_at")
    )
    stride: int = Field(2, ge=2)
    skip_connection_scaling: bool = True

    @model_validator(mode="before")
    @classmethod
    def _alt_spelling(cls, data: Any) -> Any:
        # Presets use the seed's spelling; `attn_enabled_at` can only come from the user,
        # so it wins over a preset's `atnn_enabled_at`.
        if isinstance(data, Mapping) and "attn_enabled_at" in data:
            data = dict(data)
            data["atnn_enabled_at"] = data.pop("attn_enabled_at")
        return data

    @field_validator("dropout", mode="before")
    @classmethod
    def _bool_dropout(cls, v: Any) -> Any:
        # The seed writes `dropout: False`; a bool means off (0.0) / a typical rate (0.1).
        if isinstance(v, bool):
            return 0.1 if v else 0.0
        return v

    @field_validator("channel_mult", "attention_resolutions")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x <= 0 for x in v):
            raise ValueError(f"every entry must be a positive integer, got {v}")
        return v

    @field_validator("init_conv_kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd so the convolution keeps the image size, got {v}")
        return v

    @property
    def resolutions(self) -> list[int]:
        """Pixel resolution at each level (Regular: level 0 at image_size)."""
        return [self.image_size // (2**i) for i in range(len(self.channel_mult))]


def validate_unet(unet_type: str, u: UNetConfig) -> list[tuple[str, str]]:
    """Cross-field checks for one UNet; returns (key, message) pairs, empty when valid."""
    errors: list[tuple[str, str]] = []
    levels = len(u.channel_mult)
    if unet_type == "sr":
        if u.num_resblocks is None:
            errors.append(("num_resblocks", "the Efficient UNet (unet_type sr) needs a list"))
        elif len(u.num_resblocks) != levels:
            errors.append(
                (
                    "num_resblocks",
                    f"has {len(u.num_resblocks)} entries but channel_mult has {levels}; "
                    "give one ResBlock count per level",
                )
            )
        elif any(n < 1 for n in u.num_resblocks):
            errors.append(("num_resblocks", "every level needs at least one ResBlock"))
        if u.atnn_enabled_at is not None:
            if len(u.atnn_enabled_at) != levels:
                errors.append(
                    (
                        "atnn_enabled_at",
                        f"has {len(u.atnn_enabled_at)} entries but channel_mult has {levels}",
                    )
                )
            elif any(a not in (0, 1) for a in u.atnn_enabled_at):
                errors.append(("atnn_enabled_at", "entries must be 0 or 1"))
        # Efficient UNet down-samples by `stride` before every level but the deepest.
        factor = u.stride ** (levels - 1)
    else:
        if u.num_resblocks is not None and len(u.num_resblocks) != levels:
            errors.append(
                (
                    "num_resblocks",
                    f"has {len(u.num_resblocks)} entries but channel_mult has {levels}",
                )
            )
        factor = 2 ** (levels - 1)
        valid = set(u.resolutions)
        bad = [r for r in u.attention_resolutions if r not in valid]
        if bad:
            errors.append(
                (
                    "attention_resolutions",
                    f"{bad} are not level resolutions of this UNet; allowed: {sorted(valid)}",
                )
            )
    if u.image_size % factor:
        errors.append(
            (
                "image_size",
                f"{u.image_size} is not divisible by the total down-sampling factor {factor} "
                f"({levels} levels in channel_mult)",
            )
        )
    if u.num_attn_heads * u.per_head_channels <= 0:
        errors.append(("num_attn_heads", "must be positive"))
    return errors


# --------------------------------------------------------------------------------------------
# model.preconditioning (seed: "Scheduling")
# --------------------------------------------------------------------------------------------
class EDMConfig(_Strict):
    """Karras et al. 2022 preconditioning; the UNet predicts the denoised image."""

    loss_type: Literal["l1", "l2", "huber"] = "l2"
    sigma_data: float = Field(0.5, gt=0)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)


class DDPMConfig(_Strict):
    """Continuous-time DDPM (t ~ U(0, 1) over a log-SNR schedule)."""

    loss_type: Literal["l1", "l2", "huber"] = "l2"
    pred_objective: Literal["noise", "x_start", "v"] = "noise"
    noise_schedule: Literal["cosine", "linear"] = "cosine"
    timesteps: int = Field(1000, gt=0, description="steps of the discretised samplers")


class NoiseAugConfig(_Strict):
    """Noise conditioning augmentation of the low-res input (SR stages only).

    ``model.noise_cond_aug: true`` (NeMo's spelling) switches on NeMo's kind, ``edm``: the
    low-res image gets noise at a level drawn like the training noise (ln sigma_aug ~
    N(p_mean, p_std^2), from the stage's EDM preconditioning), is scaled by
    1 / sqrt(sigma_aug^2 + sigma_data^2) and the net embeds ln(sigma_aug) / 4; sampling uses
    sigma_aug = ``sample_sigma`` (NeMo: 0.002). EDM stages only, as in NeMo. ``cosine_vp`` (a
    departure, any preconditioning): x = cos(pi/2 l) lowres + sin(pi/2 l) eps with
    l ~ U(0, max_level) in training and ``sample_level`` at sampling; the net embeds l.
    """

    enabled: bool = False
    kind: Literal["edm", "cosine_vp"] = "edm"
    sample_sigma: float = Field(0.002, gt=0, description="edm: sigma_aug at sampling")
    max_level: float = Field(
        0.5, ge=0.0, le=1.0, description="cosine_vp: train level ~ U(0, max_level)"
    )
    sample_level: float = Field(
        0.1, ge=0.0, le=1.0, description="cosine_vp: fixed level at sampling"
    )
    # edm: the training distribution and sigma_data; filled from model.preconditioning
    p_mean: float | None = None
    p_std: float | None = Field(None, gt=0)
    sigma_data: float | None = Field(None, gt=0)


# --------------------------------------------------------------------------------------------
# Presets (seed tables). Parameter counts with text embed dim 1024, built by
# imagen.nn.preset_parameter_count (`imagen presets` prints them):
#   500m_res_64    524.9M  (published 524M, +0.2%)
#   2b_res_64     2171.1M  (published 2100M, +3.4%: the documented exception, see below)
#   400m_res_256   423.8M  (published 429M, -1.2%)
#   600m_res_256   641.0M  (published 646M, -0.8%)
#   400m_res_1024  424.4M  (published 427M, -0.6%)
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # --- paper presets (NeMo's published sizes) ---
    "500m_res_64": {
        "unet_type": "base",
        "unet": dict(
            embed_dim=256,
            image_size=64,
            channel_mult=[1, 2, 3, 4],
            num_res_blocks=3,
            num_attn_heads=4,
            per_head_channels=64,
            cond_dim=512,
            attention_type="fused",
            attention_resolutions=[8, 16, 32],
            stable_attention=True,
        ),
    },
    # Exception to the 2% rule: the seed's 2b configuration (Regular UNet, 3 blocks per level,
    # fused attention at 32/16/8 px, cond_dim 2048) counts 2171.1M, 3.4% over the published
    # 2100M; NeMo's own code counts the same 2171.2M. Kept faithful rather than trimmed
    # (attention at 16/8 px only would give 2112.3M).
    "2b_res_64": {
        "unet_type": "base",
        "unet": dict(
            embed_dim=512,
            image_size=64,
            channel_mult=[1, 2, 3, 4],
            num_res_blocks=3,
            num_attn_heads=8,
            per_head_channels=64,
            cond_dim=2048,
            attention_type="fused",
            attention_resolutions=[8, 16, 32],
            stable_attention=True,
        ),
    },
    # Regular UNet SR with per-level ResBlocks 2,2,3,4,3 and fused attention at 32/16 px.
    # ResBlock up/down-sampling (resblock_updown) brings it to 423.8M (published 429M);
    # with plain resampling it counts 408.3M (-4.8%, as NeMo's code does).
    "400m_res_256": {
        "unet_type": "sr-unet",
        "unet": dict(
            embed_dim=128,
            image_size=256,
            channel_mult=[1, 2, 4, 6, 6],
            num_res_blocks=2,
            num_resblocks=[2, 2, 3, 4, 3],
            num_attn_heads=8,
            per_head_channels=64,
            cond_dim=512,
            attention_type="fused",
            attention_resolutions=[32, 16],
            resblock_updown=True,
            stable_attention=True,
        ),
    },
    # 641.0M with the seed's cond_dim 512 (NeMo's code projects text to its own dim, 1024,
    # which gives its 646.0M).
    "600m_res_256": {
        "unet_type": "sr",
        "unet": dict(
            embed_dim=128,
            image_size=256,
            channel_mult=[1, 2, 4, 8, 8],
            num_resblocks=[2, 4, 8, 8, 8],
            atnn_enabled_at=[0, 0, 0, 1, 1],
            stride=2,
            num_attn_heads=8,
            per_head_channels=64,
            cond_dim=512,
            attention_type="fused",
            stable_attention=False,
            skip_connection_scaling=True,
        ),
    },
    # The published 1024 configuration is not public (NeMo's 5-level config counts 639M, a
    # 4-level 1,2,4,8 / 2,4,8,8 variant 285M). Chosen: the 600m Efficient UNet layout with
    # cross attention only, at the two deepest levels, and 3 ResBlocks (not 8) at the deepest
    # level: channel_mult 1,2,4,8,8, num_resblocks 2,4,8,8,3 -> 424.4M (published 427M).
    # Trained on 256x256 crops, sampled at 1024 (fully convolutional).
    "400m_res_1024": {
        "unet_type": "sr",
        "unet": dict(
            embed_dim=128,
            image_size=256,
            channel_mult=[1, 2, 4, 8, 8],
            num_resblocks=[2, 4, 8, 8, 3],
            atnn_enabled_at=[0, 0, 0, 1, 1],
            stride=2,
            num_attn_heads=8,
            per_head_channels=64,
            cond_dim=512,
            attention_type="cross",
            stable_attention=False,
            skip_connection_scaling=True,
        ),
    },
    # --- small presets: train on a 2-core CPU in minutes (the embedded default) ---
    # Sized so a training step (forward + backward + AdamW) at batch 8 stays under 0.3 s on 2
    # CPU cores (bench/bench_unet.py): few channels at the full-resolution levels, where the
    # time goes on a CPU, and the parameters at the low resolutions.
    "small_res_64": {
        "unet_type": "base",
        "unet": dict(
            embed_dim=8,
            image_size=64,
            channel_mult=[1, 4, 6, 8],
            num_res_blocks=1,
            num_attn_heads=2,
            per_head_channels=32,
            cond_dim=128,
            attention_type="fused",
            attention_resolutions=[8],
            stable_attention=True,
        ),
    },
    # The small base stage at 32 px with attention at 16/8/4 px: the recipe searched for
    # learning to follow captions fastest on a 2-core CPU (bench/recipe_search.py, docs/recipe.md).
    "learn_res_32": {
        "unet_type": "base",
        "unet": dict(
            embed_dim=24,
            image_size=32,
            channel_mult=[1, 2, 3, 4],
            num_res_blocks=1,
            num_attn_heads=2,
            per_head_channels=32,
            cond_dim=128,
            attention_type="fused",
            attention_resolutions=[4, 8, 16],
            stable_attention=True,
        ),
    },
    "small_res_256": {
        "unet_type": "sr",
        "unet": dict(
            embed_dim=8,
            image_size=128,
            channel_mult=[1, 4, 8, 8],
            num_resblocks=[1, 1, 2, 2],
            atnn_enabled_at=[0, 0, 0, 1],
            stride=2,
            num_attn_heads=2,
            per_head_channels=32,
            cond_dim=64,
            attention_type="fused",
            skip_connection_scaling=True,
        ),
    },
    "small_res_1024": {
        "unet_type": "sr",
        "unet": dict(
            embed_dim=8,
            image_size=128,
            channel_mult=[1, 2, 4, 4],
            num_resblocks=[1, 1, 2, 2],
            atnn_enabled_at=[0, 0, 0, 1],
            stride=2,
            num_attn_heads=2,
            per_head_channels=16,
            cond_dim=64,
            attention_type="cross",
            skip_connection_scaling=True,
        ),
    },
}

PAPER_PRESETS: tuple[str, ...] = (
    "500m_res_64",
    "2b_res_64",
    "400m_res_256",
    "600m_res_256",
    "400m_res_1024",
)
# Presets whose count is knowingly outside 2% of the published size, with the reason.
PRESET_SIZE_EXCEPTIONS: dict[str, str] = {
    "2b_res_64": "the seed's configuration counts 2171M (NeMo's code too); published 2100M",
}
PUBLISHED_SIZES_M: dict[str, float] = {
    "500m_res_64": 524,
    "2b_res_64": 2100,
    "400m_res_256": 429,
    "600m_res_256": 646,
    "400m_res_1024": 427,
}


class ModelConfig(_Strict):
    """One stage's ``model`` block (NeMo's keys)."""

    preset: str | None = None
    unet_type: UNetType = "base"
    unet: UNetConfig = UNetConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    preconditioning_type: Literal["EDM", "DDPM"] = "EDM"
    preconditioning: EDMConfig | DDPMConfig = EDMConfig()
    noise_cond_aug: NoiseAugConfig = NoiseAugConfig()
    channels_last: bool = False
    inductor: bool = False

    @model_validator(mode="before")
    @classmethod
    def _typed_preconditioning(cls, data: Any) -> Any:
        # Parse the preconditioning block with the class its type names, so a DDPM key under
        # EDM (or the reverse) is reported as unknown rather than silently ignored.
        if isinstance(data, Mapping):
            data = dict(data)
            kind = data.get("preconditioning_type", "EDM")
            block = data.get("preconditioning")
            if isinstance(block, Mapping) and kind in ("EDM", "DDPM"):
                klass = EDMConfig if kind == "EDM" else DDPMConfig
                try:
                    data["preconditioning"] = klass.model_validate(dict(block))
                except ValidationError as e:  # keep "preconditioning" in the reported path
                    raise ValidationError.from_exception_data(
                        klass.__name__,
                        [
                            {
                                "type": x["type"],
                                "loc": ("preconditioning", *x["loc"]),
                                "input": x["input"],
                                **({"ctx": x["ctx"]} if "ctx" in x else {}),
                            }
                            for x in e.errors()
                        ],
                    ) from None
            elif block is None and kind == "DDPM":
                data["preconditioning"] = DDPMConfig()
        return data

    @field_validator("noise_cond_aug", mode="before")
    @classmethod
    def _bool_noise_cond_aug(cls, v: Any) -> Any:
        # NeMo's spelling: `noise_cond_aug: True` is its EDM augmentation
        if isinstance(v, bool):
            return {"enabled": v, "kind": "edm"}
        return v

    @model_validator(mode="after")
    def _edm_noise_aug(self) -> ModelConfig:
        aug = self.noise_cond_aug
        if aug.enabled and aug.kind == "edm":
            if self.preconditioning_type != "EDM" or not isinstance(
                self.preconditioning, EDMConfig
            ):
                raise ValueError(
                    "noise_cond_aug: NeMo's augmentation (kind edm) needs preconditioning_type "
                    "EDM; use kind: cosine_vp with DDPM"
                )
            pre = self.preconditioning
            for key in ("p_mean", "p_std", "sigma_data"):
                if getattr(aug, key) is None:
                    object.__setattr__(aug, key, getattr(pre, key))
        return self

    @property
    def is_sr(self) -> bool:
        return self.unet_type in ("sr-unet", "sr")


# --------------------------------------------------------------------------------------------
# trainer / optimiser / sampling
# --------------------------------------------------------------------------------------------
class OptimConfig(_Strict):
    """AdamW with linear warm-up (reference: lr 1e-4, betas 0.9/0.999, wd 0.01, 10k warm-up)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10000, ge=0)


class TrainerConfig(_Strict):
    """NeMo's ``trainer`` block plus what the stage runner needs."""

    precision: Literal["32", "bf16", "bf16-mixed", "16", "16-mixed", "32-true"] = "32"
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)
    accumulate_grad_batches: int = Field(1, gt=0)
    gradient_clip_val: float = Field(1.0, ge=0)
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, gt=0)
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    strategy: str = "auto"
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    checkpoint_every_n_steps: int = Field(200, gt=0)
    sample_every_n_steps: int = Field(500, gt=0)
    log_every_n_steps: int = Field(10, gt=0)
    nan_policy: Literal["stop", "skip"] = "stop"
    sample_grid_size: int = Field(8, gt=0, description="images in each training sample grid")
    sample_prompts: list[str] = Field(
        default_factory=list, description="grid prompts (default: held-out captions)"
    )
    seed: int = 0
    optim: OptimConfig = OptimConfig()

    @field_validator("precision", mode="before")
    @classmethod
    def _str_precision(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class SamplingConfig(_Strict):
    """How a stage samples (NeMo inference defaults: steps 30/20/20, guidance 7.5/8/7.5)."""

    sampler: Literal["heun", "euler", "ddpm", "ddim", "dpmpp_2m"] = "heun"
    steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
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


class StageConfig(_Strict):
    """One cascade stage, resolved: the shared defaults merged under the stage's own keys."""

    name: str
    resolution: int = Field(gt=0, description="output resolution of the stage (64/256/1024)")
    lowres: int | None = Field(None, description="resolution of the conditioning image (SR)")
    model: ModelConfig
    trainer: TrainerConfig = TrainerConfig()
    sampling: SamplingConfig = SamplingConfig()


# --------------------------------------------------------------------------------------------
# data / evaluation / tracking
# --------------------------------------------------------------------------------------------
class DataConfig(_Strict):
    """Where ingest reads from and how it writes shards."""

    source: Literal["embedded", "folder", "webdataset"] = "embedded"
    source_path: str | None = None
    num_train: int = Field(2048, gt=0, description="embedded: training samples")
    num_holdout: int = Field(256, ge=0, description="embedded: held-out captions/images")
    image_size: int = Field(256, gt=0, le=4096, description="stored image size")
    min_resolution: int = Field(32, gt=0)
    samples_per_shard: int = Field(256, gt=0)
    pyramid: list[int] = Field(
        default_factory=lambda: [64, 256],
        description="also store copies at these sizes (keys <size>.png / <size>.jpg) so a stage "
        "decodes only the resolution it trains on, not the full image",
    )
    max_caption_chars: int = Field(512, gt=0)
    seed: int = 0
    shards_dir: str = "data/shards"
    encoded_dir: str = "data/encoded"


class EvaluateConfig(_Strict):
    """FID-CLIP sweep (NeMo's guidance scales by default)."""

    guidance_scales: list[float] = Field(
        default_factory=lambda: [1, 1.5, 2, 3, 4, 5, 6, 7], min_length=1
    )
    num_images: int = Field(64, gt=0)
    batch_size: int = Field(32, gt=0)
    depth: Literal["base64", "sr256", "sr1024"] = "base64"
    inception_path: str | None = None
    clip_path: str | None = None
    reports_dir: str = "reports"
    seed: int = 1234
    steps: int | None = Field(None, gt=0, description="sweep sampling steps (None: the stage's)")
    tradeoff_tolerance: float = Field(
        0.1, ge=0.0, le=1.0, description="best point: alignment within this share of its range"
    )
    grid_images: int = Field(16, ge=0, description="images per guidance scale in its grid")
    cascade_prompts: int = Field(4, ge=0, description="prompts in the full-cascade grid (0: off)")
    cascade_steps: int | None = Field(None, gt=0, description="steps per stage for that grid")


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite")
    experiment: str = "imagen"
    register_models: bool = True
    model_alias: str = Field("champion", description="alias set on the registered versions")


class StageOverride(_Strict):
    """What params.yaml may say under ``stages.<name>`` before merging with the defaults."""

    resolution: int | None = None
    lowres: int | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    trainer: dict[str, Any] = Field(default_factory=dict)
    sampling: dict[str, Any] = Field(default_factory=dict)


_STAGE_RES: dict[str, tuple[int, int | None]] = {
    "base64": (64, None),
    "sr256": (256, 64),
    "sr1024": (1024, 256),
}


class Params(BaseModel):
    """The whole of params.yaml, resolved: ``params.stages["base64"]`` is a StageConfig."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig]
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    models_dir: str = "models"

    @property
    def conditioning(self) -> ConditioningConfig:
        """Text conditioning shared by all stages (precache writes one set of embeddings)."""
        return next(iter(self.stages.values())).model.conditioning

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ConfigError(f"stages.{name}: unknown stage; allowed: {sorted(self.stages)}")
        return self.stages[name]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins; neither input is modified."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_preset(model: dict[str, Any], where: str) -> dict[str, Any]:
    name = model.get("preset")
    if name is None:
        return model
    if name not in PRESETS:
        raise ConfigError(f"{where}.preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    preset = PRESETS[name]
    # preset first, explicit keys on top (an explicit unet_type or unet key overrides it)
    return deep_merge({"unet_type": preset["unet_type"], "unet": preset["unet"]}, model)


def _format(err: ValidationError, prefix: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        # pydantic puts union member names (EDMConfig...) into paths; keep the user's keys
        loc = ".".join(p for p in loc.split(".") if not p[:1].isupper())
        path = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; " + msg.replace("Input should be", "allowed:")
        lines.append(f"{path}: {msg}")
    return lines


def _builds_default_encoder(encoder_path: str) -> bool:
    """Whether ``encoder_path`` is (or will be built as) the project's own small random T5."""
    from imagen.text import BUILT_MARKER

    folder = Path(encoder_path)
    return not folder.exists() or (folder / BUILT_MARKER).exists()


def resolve_params(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml) into :class:`Params`.

    Raises :class:`ConfigError` listing every bad key with its full path.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: the top level must be a mapping")
    raw = dict(raw)
    errors: list[str] = []
    shared_model = raw.pop("model", {}) or {}
    shared_trainer = raw.pop("trainer", {}) or {}
    shared_sampling = raw.pop("sampling", {}) or {}
    stage_raw = raw.pop("stages", None) or {}
    if not isinstance(stage_raw, Mapping):
        raise ConfigError("stages: must be a mapping of stage name -> stage block")
    stages: dict[str, Any] = {}
    for name, block in stage_raw.items():
        where = f"stages.{name}"
        if name not in _STAGE_RES:
            errors.append(f"{where}: unknown stage; allowed: {list(_STAGE_RES)}")
            continue
        try:
            over = StageOverride.model_validate(block or {})
        except ValidationError as e:
            errors.extend(_format(e, where))
            continue
        res, lowres = _STAGE_RES[name]
        try:
            model = _apply_preset(deep_merge(shared_model, over.model), f"{where}.model")
        except ConfigError as e:
            errors.append(str(e))
            continue
        stage = {
            "name": name,
            "resolution": over.resolution or res,
            "lowres": over.lowres if over.lowres is not None else lowres,
            "model": model,
            "trainer": deep_merge(shared_trainer, over.trainer),
            "sampling": deep_merge(shared_sampling, over.sampling),
        }
        try:
            sc = StageConfig.model_validate(stage)
        except ValidationError as e:
            errors.extend(_format(e, where))
            continue
        if not sc.model.is_sr and over.resolution is None:
            # the base stage generates at its UNet's size (64 for the paper presets; a small
            # CPU recipe may train at 32): the SR stage after it up-samples whatever it gets
            sc.resolution = sc.model.unet.image_size
        for key, msg in validate_unet(sc.model.unet_type, sc.model.unet):
            errors.append(f"{where}.model.unet.{key}: {msg}")
        if sc.model.is_sr and sc.lowres is None:
            errors.append(f"{where}.lowres: an SR stage needs the low-res input size")
        if not sc.model.is_sr and name != "base64":
            errors.append(
                f"{where}.model.unet_type: {name} is a super-resolution stage; "
                "allowed: 'sr-unet' or 'sr'"
            )
        if name == "base64" and sc.model.is_sr:
            errors.append(f"{where}.model.unet_type: base64 generates from text; allowed: 'base'")
        stages[name] = sc
    if errors:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    # Precache writes one set of embeddings, so the text features must agree across stages.
    conds = {n: s.model.conditioning for n, s in stages.items()}
    first = next(iter(conds.values()), None)
    for n, c in conds.items():
        for key in ("embed_dim", "precached_key", "encoder_path", "online_encoding"):
            if first is not None and getattr(c, key) != getattr(first, key):
                errors.append(
                    f"stages.{n}.model.conditioning.{key}: must equal the other stages' value "
                    f"({getattr(first, key)!r}); one text encoder serves the whole cascade"
                )
    try:
        params = Params.model_validate({**raw, "stages": stages})
    except ValidationError as e:
        errors.extend(_format(e, "params"))
        params = None
    if errors or params is None:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    if not params.stages:
        raise ConfigError("stages: at least one stage (base64) must be configured")
    if (
        params.data.source != "embedded"
        and params.conditioning.encoder.tokenizer == "word"
        and _builds_default_encoder(params.conditioning.encoder_path)
    ):
        raise ConfigError(
            "model.conditioning.encoder.tokenizer: 'word' knows only the embedded captions' "
            f"vocabulary (every other word becomes <unk>), but data.source is "
            f"{params.data.source!r}; use 'byt5' (with model.conditioning.token_length: 128) "
            "for your own captions, or a real T5 through model.conditioning.encoder_path"
        )
    return params


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a mapping")
    node[parts[-1]] = value


def load_params(
    path: str | Path = "params.yaml", overrides: Mapping[str, Any] | list[str] | None = None
) -> Params:
    """Read params.yaml, apply ``key.path=value`` overrides, validate.

    ``overrides`` is a mapping of dotted keys or a list of ``key=value`` strings (values are
    parsed as YAML, so ``trainer.max_steps=10`` gives an int).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.path=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v)))
    for k, v in items:
        _set_dotted(raw, k, v)
    return resolve_params(raw)


def params_hash(params: Params) -> str:
    """A short stable hash of the resolved params (tagged on every MLflow run)."""
    import hashlib
    import json

    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def heads_for(u: UNetConfig, channels: int) -> int:
    """Attention heads for a block of ``channels``: per_head_channels wins when it divides."""
    if u.per_head_channels > 0 and channels % u.per_head_channels == 0:
        return max(1, channels // u.per_head_channels)
    return max(1, math.gcd(channels, u.num_attn_heads))
