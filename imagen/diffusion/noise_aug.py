"""Noise conditioning augmentation of the low-res input of the super-resolution stages.

Training corrupts the low-res image at a random level in [0, max_level] per sample; sampling
uses one fixed level (Ho et al. 2022, cascaded diffusion; Saharia et al. 2022, Imagen). The
level (B,) is also given to the network (``aug_level``) so it knows how much to trust the input.
"""

from __future__ import annotations

import math

import torch

from imagen.config import NoiseAugConfig
from imagen.diffusion.denoiser import expand_like, rand, randn


def aug_alpha_sigma(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule of the level: alpha = cos(pi/2 level), sigma = sin(pi/2 level).

    alpha is computed as sin(pi/2 (1 - level)) so that level 0 and level 1 are exact.
    """
    return torch.sin(math.pi / 2 * (1 - level)), torch.sin(math.pi / 2 * level)


def augment_lowres(
    lowres: torch.Tensor,
    level: torch.Tensor | float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x = alpha(level) lowres + sigma(level) eps; level is a float or (B,) in [0, 1]."""
    level = torch.as_tensor(level, dtype=lowres.dtype, device=lowres.device)
    if level.ndim == 0:
        level = level.expand(lowres.shape[0])
    if level.shape != (lowres.shape[0],):
        raise ValueError(
            f"level must be a float or of shape ({lowres.shape[0]},), got {level.shape}"
        )
    if bool(((level < 0) | (level > 1)).any()):
        raise ValueError("noise augmentation level must lie in [0, 1]")
    alpha, sigma = aug_alpha_sigma(level)
    eps = randn(lowres.shape, lowres, generator)
    return expand_like(alpha, lowres) * lowres + expand_like(sigma, lowres) * eps


def sample_aug_level(
    batch: int,
    max_level: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training levels: (B,) ~ U(0, max_level)."""
    if not 0.0 <= max_level <= 1.0:
        raise ValueError(f"max_level must be in [0, 1], got {max_level}")
    like = torch.empty(0, dtype=dtype, device=device)
    return rand((batch,), like, generator) * max_level


def lowres_condition(
    lowres: torch.Tensor,
    config: NoiseAugConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy lowres, aug_level (B,)) for the net: random levels in training, the fixed
    ``sample_level`` at sampling, level 0 (input unchanged) when augmentation is disabled."""
    b = lowres.shape[0]
    if not config.enabled:
        return lowres, lowres.new_zeros(b)
    if training:
        level = sample_aug_level(
            b, config.max_level, generator, device=lowres.device, dtype=lowres.dtype
        )
    else:
        level = lowres.new_full((b,), config.sample_level)
    return augment_lowres(lowres, level, generator), level
