"""Noise schedules: the EDM sigma discretisation and continuous-time DDPM log-SNR schedules.

Everything here speaks the variance-exploding language of :mod:`imagen.diffusion.denoiser`:
a noise level is ``sigma`` with ``x = x0 + sigma * eps``. A variance-preserving sample
``x_vp = alpha * x0 + s * eps`` (``alpha^2 + s^2 = 1``) has ``sigma = s / alpha`` and
``log_snr = log(alpha^2 / s^2) = -2 ln(sigma)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LogSNR = Callable[[torch.Tensor], torch.Tensor]


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` decreasing noise levels from ``sigma_max`` to ``sigma_min``, then a final 0.

    Returns a tensor of shape (n + 1,), i.e. ``n`` sampler steps.
    """
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64)
    frac = i / (n - 1) if n > 1 else i
    # Karras et al. 2022, eq. 5:
    #   sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype=dtype, device=device)


def log_snr_cosine(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule as a log-SNR, t in [0, 1] (t = 1 is pure noise), as NeMo computes it:
    -log(max(cos^-2(pi/2 (t+s)/(1+s)) - 1, 1e-5)), in t's dtype (8.77 at t = 0)."""
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar = cos^2(pi/2 (t+s)/(1+s));
    # SNR = alpha_bar / (1 - alpha_bar) = 1 / (cos^-2 - 1)
    inv = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1
    return -torch.log(inv.clamp(min=1e-5))


def log_snr_linear(t: torch.Tensor) -> torch.Tensor:
    """NeMo's "linear" schedule: log-SNR = -log(expm1(1e-4 + 10 t^2)), in t's dtype.

    That is alpha_bar = exp(-(1e-4 + 10 t^2)): the continuous form of a linear beta schedule
    (Kingma et al. 2021, as imagen-pytorch and NeMo write it); 9.21 at t = 0, -10.0 at t = 1.
    """
    return -torch.log(torch.expm1(1e-4 + 10 * t**2))


LOG_SNR_SCHEDULES: dict[str, LogSNR] = {"cosine": log_snr_cosine, "linear": log_snr_linear}


def sigma_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """sigma = s / alpha = exp(-log_snr / 2)."""
    return torch.exp(-0.5 * log_snr)


def log_snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """log_snr = -2 ln(sigma)."""
    return -2.0 * torch.log(sigma)


def uniform_t_sigmas(
    log_snr: LogSNR,
    steps: int,
    timesteps: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DDPM-style discretisation: noise levels at ``steps`` uniformly spaced t in (0, 1], then 0.

    With ``timesteps`` the t values are snapped to the grid k / timesteps (k = 1..timesteps),
    so ``steps == timesteps`` visits every training step and fewer steps re-space that grid
    (as DDIM does). Returns (steps + 1,) decreasing sigmas ending in 0. NeMo's DDPM sampler
    visits the same t grid (linspace(1, 0, steps + 1)) but ends at t = 0's log-SNR rather than
    sigma = 0 (its last image is the posterior mean there, alpha ~ 0.9999 times x0_hat).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if timesteps is not None and steps > timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the DDPM timesteps ({timesteps})")
    j = torch.arange(steps, 0, -1, dtype=torch.int64)  # steps, ..., 1
    if timesteps is None:
        frac = j.double() / steps  # 1, ..., 1/steps
    else:
        # integer rounding of timesteps * j / steps: exact, strictly decreasing, never 0
        frac = ((timesteps * j + steps // 2) // steps).double() / timesteps
    # the log-SNR in float32, as NeMo evaluates it (its cosine schedule reaches -33.9 at t = 1)
    sigmas = sigma_from_log_snr(log_snr(frac.float()).double())
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype=dtype, device=device)
