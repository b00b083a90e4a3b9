"""The Imagen UNets: Regular UNet (base, sr-unet) and Efficient UNet (sr), built from config.

Every UNet has the same forward signature::

    forward(x, noise_cond, text_embed=None, text_mask=None, lowres=None, aug_level=None,
            drop_text=None) -> Tensor

x (B, C, H, W) is the preconditioned noisy image; noise_cond (B,) the noise level as NeMo
feeds it (EDM: ln(sigma)/4; continuous DDPM: the log-SNR); text_embed (B, L, D) token features
with text_mask (B, L) bool (True = real token); lowres (B, C, h, w) the low-res image of the SR
nets (bicubically resized to H, W and concatenated); aug_level (B,) its noise-augmentation
level as the net embeds it (only with noise_cond_aug; see imagen.diffusion.noise_aug);
drop_text (B,) bool, True = classifier-free-guidance null text (zero text embedding).
Modules expose ``is_sr`` and ``image_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from imagen.config import ConditioningConfig, ModelConfig
from imagen.nn.efficient_unet import EfficientUNet
from imagen.nn.unet import UNet, UNetBase
from imagen.presets import PRESETS

__all__ = [
    "EfficientUNet",
    "UNet",
    "UNetBase",
    "build_unet",
    "count_parameters",
    "preset_model_config",
    "preset_parameter_count",
]


def build_unet(model: ModelConfig) -> nn.Module:
    """Build the UNet ``model.unet_type`` names; channels_last converts its memory format."""
    text_dim = model.conditioning.embed_dim
    aug = model.noise_cond_aug.enabled and model.is_sr
    if model.unet_type == "sr":
        net: nn.Module = EfficientUNet(model.unet, text_dim, noise_cond_aug=aug)
    elif model.unet_type in ("base", "sr-unet"):
        net = UNet(model.unet, text_dim, is_sr=model.unet_type == "sr-unet", noise_cond_aug=aug)
    else:
        raise ValueError(
            f"model.unet_type: unknown {model.unet_type!r}; allowed: base, sr-unet, sr"
        )
    if model.channels_last:
        net = net.to(memory_format=torch.channels_last)
        net.channels_last = True
    return net


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def preset_model_config(name: str, text_embed_dim: int = 1024) -> ModelConfig:
    """The ModelConfig of a preset from :data:`imagen.presets.PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig.model_validate(
        {
            "preset": name,
            "unet_type": p["unet_type"],
            "unet": p["unet"],
            "conditioning": ConditioningConfig(embed_dim=text_embed_dim),
            "noise_cond_aug": p.get("noise_cond_aug", False),
        }
    )


def preset_parameter_count(name: str, text_embed_dim: int = 1024) -> int:
    """Parameter count of a preset, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        net = build_unet(preset_model_config(name, text_embed_dim))
    return count_parameters(net)
