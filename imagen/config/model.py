"""One stage's ``model`` block, in NeMo's layout: conditioning, UNet, preconditioning.

The keys mirror NeMo's per-stage config files (``model.unet_type``, ``model.unet.*``,
``model.conditioning.*``, ``model.preconditioning*``, ``model.channels_last``,
``model.inductor``); :func:`validate_unet` holds the cross-field checks of one UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from imagen.config.base import Strict as _Strict

DEFAULT_ENCODER_PATH = "data/encoder"  # where the embedded default builds its small T5
AUTO_ENCODER_PATH = "auto"  # params.yaml's: chosen from data.source (imagen.config.load)
AttentionType = Literal["self", "cross", "stacked", "fused"]
UNetType = Literal["base", "sr-unet", "sr"]


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
    tokenizer: Literal["auto", "byt5", "word"] = Field(
        "auto",
        description="byt5: bytes, any caption; word: one token per word of the embedded "
        "grammar (imagen.text.vocab), far easier for a random encoder, unknown words -> <unk>; "
        "auto: word for data.source embedded, byt5 otherwise",
    )


class ConditioningConfig(_Strict):
    """NeMo's ``model.conditioning`` block."""

    embed_dim: int | None = Field(
        None,
        gt=0,
        description="text feature width after encoding (t5-v1_1-xxl: 4096, minilm: 384); unset: "
        "encoder.d_model for the embedded default, else read from the encoder_path folder",
    )
    token_length: int | None = Field(
        None,
        gt=0,
        description="precached features are padded/trimmed to this; unset: 24 for the word "
        "tokenizer, 128 (NeMo's value) for bytes or a real encoder, or fewer where the "
        "encoder takes fewer (CLIP: 77)",
    )
    drop_rate: float = Field(0.1, ge=0.0, le=1.0, description="classifier-free guidance text drop")
    precached_key: str = "embeddings_t5_xxl"
    out_key: str = "t5_text"
    online_encoding: bool = False
    encoder_path: str = Field(
        DEFAULT_ENCODER_PATH,
        description="a text-encoder folder or cached hub id (T5, CLIP text, BERT-like; "
        "imagen.config.encoders), 'minilm' for the packaged all-MiniLM-L6-v2, data/encoder for "
        "the small T5 built here, or 'auto' (params.yaml's): the built T5 for the embedded "
        "captions, minilm (token_length 32) for your own unless encoder.tokenizer is set",
    )
    # how encoder_path 'auto' was resolved, for precache to print (set by imagen.config.load)
    _chosen: str | None = PrivateAttr(default=None)
    encoder: EncoderConfig = EncoderConfig()
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    encoder_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="the text encoder's weights and compute (precache, online_encoding): "
        "auto is bfloat16 on an accelerator and float32 on the CPU (CPUs without bf16 "
        "instructions run bf16 matmuls slower, and float32 keeps the stored features as before)",
    )
    encode_batch_size: int = Field(
        64,
        gt=0,
        description="captions per encoder forward in precache (sorted by length, each batch "
        "padded to its longest caption)",
    )

    @field_validator("encoder_path")
    @classmethod
    def _no_placeholder(cls, v: str) -> str:
        if v.strip() in {"", "???"}:
            raise ValueError("must name a T5 folder or hub id (NeMo's '???' placeholder is unset)")
        return v

    @model_validator(mode="after")
    def _own_width(self) -> ConditioningConfig:
        # the embedded default's width is its d_model; another folder's is read from it when
        # the params are resolved (imagen.config.encoders.fill_from_folder)
        if self.embed_dim is None and self.encoder_path == DEFAULT_ENCODER_PATH:
            object.__setattr__(self, "embed_dim", self.encoder.d_model)
        return self


# --------------------------------------------------------------------------------------------
# model.unet (seed: "Regular UNet" / "Efficient UNet" / "Attention Blocks")
# --------------------------------------------------------------------------------------------
class UNetConfig(_Strict):
    """Union of the Regular UNet and Efficient UNet keys; ``unet_type`` picks which apply.

    Regular (base, sr-unet): num_res_blocks (an int, or NeMo's list with one count per level;
    num_resblocks, one per level, wins),
    attention_resolutions, resblock_updown, resample_with_conv (a learned strided conv down,
    else average pooling; up-sampling is always NeMo's learned transposed conv), dropout.
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
        # NeMo's Regular UNet also takes num_res_blocks as a list, one count per level
        if isinstance(data, Mapping) and isinstance(data.get("num_res_blocks"), list | tuple):
            data = dict(data)
            per_level = [int(n) for n in data["num_res_blocks"]]
            data.setdefault("num_resblocks", per_level)
            data["num_res_blocks"] = max(per_level, default=1)
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


class ModelConfig(_Strict):
    """One stage's ``model`` block (NeMo's keys)."""

    preset: str | None = None
    unet_type: UNetType = "base"
    unet: UNetConfig = UNetConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    preconditioning_type: Literal["EDM", "DDPM"] = "EDM"
    preconditioning: EDMConfig | DDPMConfig = EDMConfig()
    noise_cond_aug: NoiseAugConfig = NoiseAugConfig()
    lowres_residual: bool = Field(
        False,
        description="SR stages: diffuse x0 minus the bicubic-upsampled low-res image instead "
        "of x0 (a departure from NeMo, README 'Differences from NeMo')",
    )
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

    @model_validator(mode="after")
    def _residual_needs_lowres(self) -> ModelConfig:
        if self.lowres_residual and not self.is_sr:
            raise ValueError(
                "lowres_residual: only a super-resolution UNet (unet_type sr or sr-unet) has a "
                f"low-res image; this one is {self.unet_type!r}"
            )
        return self

    @property
    def is_sr(self) -> bool:
        return self.unet_type in ("sr-unet", "sr")
