"""Noise conditioning augmentation of the low-res input of the super-resolution stages.

Training corrupts the low-res image at a random level per sample; sampling uses one fixed
level (Ho et al. 2022, cascaded diffusion; Saharia et al. 2022, Imagen). The level is also given
to the network (``aug_level``, through its own embedding) so it knows how much to trust the input.

Two kinds (``model.noise_cond_aug.kind``):

* ``edm`` (NeMo's, ``noise_cond_aug: true``): sigma_aug is drawn like EDM's training noise,
  ln(sigma_aug) ~ N(p_mean, p_std^2) (0.002 at sampling), the input becomes
  c_in(sigma_aug) (lowres + sigma_aug eps) with c_in = 1 / sqrt(sigma_aug^2 + sigma_data^2)
  (Karras et al. 2022, Table 1) and the net embeds c_noise = ln(sigma_aug) / 4;
* ``cosine_vp`` (a departure from NeMo): lowres cos(pi/2 l) + eps sin(pi/2 l) with
  l ~ U(0, max_level) in training, ``sample_level`` at sampling; the net embeds l.
"""

from __future__ import annotations

import math

import torch

from imagen.config import ModelConfig, NoiseAugConfig
from imagen.diffusion.denoiser import LOWRES_IMAGE, expand_like, rand, randn


def aug_alpha_sigma(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule of the level: alpha = cos(pi/2 level), sigma = sin(pi/2 level).

    alpha is computed as sin(pi/2 (1 - level)) so that level 0 and level 1 are exact.
    """
    return torch.sin(math.pi / 2 * (1 - level)), torch.sin(math.pi / 2 * level)


def _batch_level(level: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
    if level.ndim == 0:
        level = level.expand(x.shape[0])
    if level.shape != (x.shape[0],):
        raise ValueError(f"level must be a float or of shape ({x.shape[0]},), got {level.shape}")
    return level


def augment_lowres(
    lowres: torch.Tensor,
    level: torch.Tensor | float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """cosine_vp: x = alpha(level) lowres + sigma(level) eps; level a float or (B,) in [0, 1].

    A float level is checked here; a tensor's values are not (that would read the device).
    """
    if isinstance(level, (int, float)) and not 0.0 <= level <= 1.0:
        raise ValueError("noise augmentation level must lie in [0, 1]")
    level = _batch_level(level, lowres)
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
    """cosine_vp training levels: (B,) ~ U(0, max_level)."""
    if not 0.0 <= max_level <= 1.0:
        raise ValueError(f"max_level must be in [0, 1], got {max_level}")
    like = torch.empty(0, dtype=dtype, device=device)
    return rand((batch,), like, generator) * max_level


def edm_augment(
    lowres: torch.Tensor,
    config: NoiseAugConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    sigma: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's augmentation: (c_in(s) (lowres + s eps), ln(s) / 4) with s = sigma_aug (B,).

    Draws eps first, then (training) ln s ~ N(p_mean, p_std^2), in NeMo's order, so one seeded
    generator gives NeMo's numbers. ``sigma`` overrides the level (a float is checked to be
    > 0; a tensor's values are not, as that would read the device).
    """
    if isinstance(sigma, (int, float)) and sigma <= 0:
        raise ValueError("noise_cond_aug (kind edm): sigma_aug must be > 0 (NeMo samples at 0.002)")
    p_mean = -1.2 if config.p_mean is None else config.p_mean
    p_std = 1.2 if config.p_std is None else config.p_std
    sigma_data = 0.5 if config.sigma_data is None else config.sigma_data
    eps = randn(lowres.shape, lowres, generator)  # (B, C, h, w)
    if sigma is None:
        if training:
            sigma = torch.exp(randn((lowres.shape[0],), lowres, generator) * p_std + p_mean)
        else:
            sigma = config.sample_sigma
    s = _batch_level(sigma, lowres)  # (B,)
    noisy = lowres + expand_like(s, lowres) * eps
    c_in = 1 / (sigma_data**2 + s**2).sqrt()  # Karras et al. 2022, Table 1: c_in
    return expand_like(c_in, lowres) * noisy, s.log() / 4


def lowres_condition(
    lowres: torch.Tensor,
    config: NoiseAugConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    level: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(low-res input for the net, aug_level (B,) for its embedding, or None when disabled).

    ``level`` overrides the sampling level (edm: sigma_aug; cosine_vp: l in [0, 1]).
    """
    if not config.enabled:
        return lowres, None
    if config.kind == "edm":
        return edm_augment(lowres, config, training=training, generator=generator, sigma=level)
    b = lowres.shape[0]
    if level is not None:
        lv = lowres.new_full((b,), float(level))
    elif training:
        lv = sample_aug_level(
            b, config.max_level, generator, device=lowres.device, dtype=lowres.dtype
        )
    else:
        lv = lowres.new_full((b,), config.sample_level)
    return augment_lowres(lowres, lv, generator), lv


def sr_condition(
    lowres: torch.Tensor,
    model: ModelConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    level: float | None = None,
) -> dict[str, torch.Tensor]:
    """An SR stage's low-res conditioning: the (augmented) ``lowres`` the net sees, its
    ``aug_level`` when augmentation is on, and the clean image itself when the stage diffuses
    the residual to it (``model.lowres_residual``)."""
    net_lowres, aug_level = lowres_condition(
        lowres, model.noise_cond_aug, training=training, generator=generator, level=level
    )
    cond = {"lowres": net_lowres}
    if aug_level is not None:
        cond["aug_level"] = aug_level
    if model.lowres_residual:
        cond[LOWRES_IMAGE] = lowres
    return cond
