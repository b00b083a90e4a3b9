"""Preconditioned denoisers: a network wrapped so that every sampler sees one interface.

Both preconditionings expose the variance-exploding view of Karras et al. 2022 (EDM):
``x = x0 + sigma * eps`` and ``denoiser(x, sigma, **cond) -> x0_hat``. Training calls
``denoiser.loss(x0, cond)``. The network itself is any callable

    net(x, noise_cond, text_embed=None, text_mask=None, lowres=None, aug_level=None,
        drop_text=None) -> Tensor

where ``noise_cond`` is what NeMo feeds its UNet: EDM's c_noise = ln(sigma) / 4, the
continuous DDPM's log-SNR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import DDPMConfig, EDMConfig, ModelConfig
from imagen.diffusion.schedules import (
    LOG_SNR_SCHEDULES,
    karras_sigmas,
    log_snr_from_sigma,
    sigma_from_log_snr,
    uniform_t_sigmas,
)

LossType = Literal["l1", "l2", "huber"]
ScheduleKind = Literal["auto", "karras", "uniform_t"]


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """Unreduced l2 (squared error), l1 (absolute error) or huber (delta 1) loss."""
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=1.0)
    raise ValueError(f"loss_type: got {loss_type!r}; allowed: 'l1', 'l2', 'huber'")


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) noise level as a (B,) tensor on ``x``'s device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), got {sigma.shape}")
    return sigma


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class SampleGenerators(tuple):
    """One ``torch.Generator`` per batch item, given where a generator is taken: item i's noise
    comes from generator i alone, so an image depends on its own seed, not on its batch."""

    @property
    def device(self) -> torch.device:
        return self[0].device


def _draw(fn: Any, shape: Any, like: torch.Tensor, generator: Any) -> torch.Tensor:
    if generator is None:
        return fn(shape, dtype=like.dtype, device=like.device)
    if isinstance(generator, SampleGenerators):
        if len(shape) == 0 or shape[0] != len(generator):
            raise ValueError(f"{len(generator)} generators for a batch of shape {tuple(shape)}")
        rows = [
            fn(tuple(shape[1:]), generator=g, dtype=like.dtype, device=g.device) for g in generator
        ]
        return torch.stack(rows).to(like.device)
    z = fn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return z.to(like.device)


def randn(
    shape: tuple[int, ...] | torch.Size,
    like: torch.Tensor,
    generator: torch.Generator | SampleGenerators | None = None,
) -> torch.Tensor:
    """Standard normal noise with ``like``'s dtype and device, drawn from ``generator``.

    The noise is drawn on the generator's device and moved, so one seeded CPU generator gives
    the same numbers whichever device the model runs on. With :class:`SampleGenerators` row i
    of the batch (dim 0) comes from generator i.
    """
    return _draw(torch.randn, shape, like, generator)


def rand(
    shape: tuple[int, ...] | torch.Size,
    like: torch.Tensor,
    generator: torch.Generator | SampleGenerators | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) noise, like :func:`randn`."""
    return _draw(torch.rand, shape, like, generator)


class Denoiser(nn.Module):
    """Common interface: ``forward(x, sigma, **cond) -> x0_hat`` with ``x = x0 + sigma * eps``.

    Subclasses set ``sigma_min`` / ``sigma_max`` (the noise range sampling should cover) and
    ``default_schedule``, and implement ``forward`` and ``per_sample_loss``.
    """

    sigma_min: float
    sigma_max: float
    default_schedule: Literal["karras", "uniform_t"] = "karras"

    def __init__(self, net: nn.Module | Any) -> None:
        super().__init__()
        self.net = net

    def per_sample_loss(
        self, x0: torch.Tensor, cond: Mapping[str, Any] | None = None, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss (B,), sigma (B,)) for a batch of clean data."""
        raise NotImplementedError

    def loss(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar training loss: the batch mean of :meth:`per_sample_loss`."""
        return self.per_sample_loss(x0, cond, generator)[0].mean()

    def sigmas(
        self,
        steps: int,
        kind: ScheduleKind | None = None,
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float = 7.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Recommended sampling discretisation: (steps + 1,) decreasing sigmas ending in 0.

        ``kind`` None/"auto" picks this preconditioning's default ("karras" for EDM,
        "uniform_t" for DDPM). A Karras schedule is kept inside [sigma_min, sigma_max].
        """
        kind = self.default_schedule if kind in (None, "auto") else kind
        if kind == "karras":
            lo = self.sigma_min if sigma_min is None else max(sigma_min, self.sigma_min)
            hi = self.sigma_max if sigma_max is None else min(sigma_max, self.sigma_max)
            return karras_sigmas(steps, lo, hi, rho, dtype=dtype, device=device)
        if kind == "uniform_t":
            return self._uniform_t_sigmas(steps, dtype=dtype, device=device)
        raise ValueError(f"schedule: got {kind!r}; allowed: 'auto', 'karras', 'uniform_t'")

    def _uniform_t_sigmas(self, steps: int, **kw: Any) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no uniform-t schedule; use 'karras'")


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1): the network predicts a scaled x0."""

    default_schedule = "karras"

    def __init__(
        self,
        net: nn.Module | Any,
        config: EDMConfig | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(net)
        self.config = config or EDMConfig()
        self.sigma_data = self.config.sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma) / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        # Karras et al. 2022, Table 1: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)  # (B,)
        s = expand_like(sigma, x)
        # Karras et al. 2022, eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        F_x = self.net(self.c_in(s) * x, self.c_noise(sigma), **cond)
        return self.c_skip(s) * x + self.c_out(s) * F_x.to(x.dtype)

    def sample_sigma(
        self, batch: int, like: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
        z = randn((batch,), like, generator)
        return torch.exp(self.config.p_mean + self.config.p_std * z)

    def per_sample_loss(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        *,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mean(loss(sqrt(lambda) D(x0 + sigma eps; sigma), sqrt(lambda) x0)) per sample.

        ``sigma`` (B,) and ``noise`` (like x0) may be given explicitly; by default they are
        drawn from ``generator``. The weight goes inside the loss, as NeMo applies it: for l2
        this is lambda(sigma) * squared error (Karras et al. 2022, eq. 8), for l1 and huber the
        error of the scaled prediction.
        """
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], x0, generator)
        sigma = batch_sigma(sigma, x0)
        if noise is None:
            noise = randn(x0.shape, x0, generator)
        x = x0 + expand_like(sigma, x0) * noise
        D = self(x, sigma, **dict(cond or {}))
        w = expand_like(self.loss_weight(sigma).sqrt(), x0)  # (B, 1, 1, 1)
        per = per_sample_mean(elementwise_loss(w * D, w * x0, self.config.loss_type))
        return per, sigma


class DDPMDenoiser(Denoiser):
    """Continuous-time DDPM: t ~ U(0, 1), a log-SNR schedule, a variance-preserving network input.

    The network sees ``x_vp = alpha x0 + s eps`` (``alpha^2 = sigmoid(log_snr)``,
    ``s^2 = sigmoid(-log_snr)``) and ``noise_cond = log_snr`` (NeMo's condition) and predicts
    ``pred_objective``: the noise eps, the clean x0 ("x_start") or v = alpha eps - s x0.
    In VE terms ``sigma = s / alpha`` and ``x = x_vp / alpha``.
    """

    default_schedule = "uniform_t"

    def __init__(self, net: nn.Module | Any, config: DDPMConfig | None = None) -> None:
        super().__init__(net)
        self.config = config or DDPMConfig()
        if self.config.noise_schedule not in LOG_SNR_SCHEDULES:
            raise ValueError(
                f"noise_schedule: got {self.config.noise_schedule!r}; "
                f"allowed: {sorted(LOG_SNR_SCHEDULES)}"
            )
        self.log_snr = LOG_SNR_SCHEDULES[self.config.noise_schedule]
        self.timesteps = self.config.timesteps
        ends = sigma_from_log_snr(self.log_snr(torch.tensor([0.0, 1.0])).double())
        self.sigma_min, self.sigma_max = float(ends[0]), float(ends[1])

    def _uniform_t_sigmas(self, steps: int, **kw: Any) -> torch.Tensor:
        return uniform_t_sigmas(self.log_snr, steps, self.timesteps, **kw)

    def _predict(self, x_vp: torch.Tensor, log_snr: torch.Tensor, cond: Mapping[str, Any]):
        """Network output on the VP input, plus (alpha, s) broadcast against x_vp."""
        out = self.net(x_vp, log_snr, **cond).to(x_vp.dtype)
        alpha = expand_like(torch.sigmoid(log_snr).sqrt(), x_vp)
        s = expand_like(torch.sigmoid(-log_snr).sqrt(), x_vp)
        return out, alpha, s

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        log_snr = log_snr_from_sigma(sigma)
        alpha_b = expand_like(torch.sigmoid(log_snr).sqrt(), x)
        x_vp = alpha_b * x  # alpha = 1 / sqrt(1 + sigma^2)
        out, alpha, s = self._predict(x_vp, log_snr, cond)
        objective = self.config.pred_objective
        if objective == "noise":
            return (x_vp - s * out) / alpha.clamp(min=1e-8)  # x0 = (x_vp - s eps) / alpha
        if objective == "x_start":
            return out
        if objective == "v":
            # Salimans & Ho 2022: v = alpha eps - s x0  =>  x0 = alpha x_vp - s v
            return alpha * x_vp - s * out
        raise ValueError(f"pred_objective: got {objective!r}; allowed: 'noise', 'x_start', 'v'")

    def per_sample_loss(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mean(loss(net(alpha x0 + s eps, log_snr), target)) per sample, target by objective.

        ``t`` (B,) and ``noise`` may be given explicitly; by default t ~ U(0, 1) and eps ~ N(0, I)
        are drawn from ``generator``. ``sigma`` (B,) instead of ``t`` gives the noise level
        directly (log-SNR = -2 ln sigma). Returns (loss (B,), sigma (B,)).
        """
        if sigma is not None:
            log_snr = log_snr_from_sigma(batch_sigma(sigma, x0))
        else:
            if t is None:
                t = rand((x0.shape[0],), x0, generator)
            log_snr = self.log_snr(batch_sigma(t, x0))
        if noise is None:
            noise = randn(x0.shape, x0, generator)
        alpha = expand_like(torch.sigmoid(log_snr).sqrt(), x0)
        s = expand_like(torch.sigmoid(-log_snr).sqrt(), x0)
        x_vp = alpha * x0 + s * noise
        out, _, _ = self._predict(x_vp, log_snr, dict(cond or {}))
        objective = self.config.pred_objective
        if objective == "noise":
            target = noise
        elif objective == "x_start":
            target = x0
        elif objective == "v":
            target = alpha * noise - s * x0
        else:
            raise ValueError(f"pred_objective: got {objective!r}; allowed: 'noise', 'x_start', 'v'")
        per = per_sample_mean(elementwise_loss(out, target, self.config.loss_type))
        return per, sigma_from_log_snr(log_snr)


LOWRES_IMAGE = "lowres_image"  # the cond key of the clean low-res image (lowres_residual)


def upsample_to(lowres: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``lowres`` (B, C, h, w) bicubic-upsampled to ``like``'s (B, C, H, W) size."""
    if lowres.shape[:2] != like.shape[:2]:
        raise ValueError(f"low-res images {tuple(lowres.shape)} do not match {tuple(like.shape)}")
    if lowres.shape[-2:] == like.shape[-2:]:
        return lowres.to(like)
    return F.interpolate(lowres.to(like), size=like.shape[-2:], mode="bicubic")


class LowresResidual(Denoiser):
    """An SR stage diffusing the residual x0 - up(lowres) (``model.lowres_residual``).

    ``up`` is the bicubic upsampling of the clean low-res image, passed in the conditioning as
    ``lowres_image``; the network still sees its usual (noise-augmented) ``lowres`` input. In
    the image's own terms ``D(x; sigma) = up + D_r(x - up; sigma)``, so samplers, guidance and
    thresholding work on whole images unchanged. An untrained residual is zero: the stage
    starts as bicubic upsampling and learns only what bicubic misses.
    """

    def __init__(self, inner: Denoiser) -> None:
        super().__init__(inner.net)  # the net alone is a submodule: state-dict keys as without
        object.__setattr__(self, "inner", inner)  # parameter-free, shares the net
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.default_schedule = inner.default_schedule
        self.config = inner.config

    def _base(self, x: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        image = cond.pop(LOWRES_IMAGE, None)
        if image is None:
            raise ValueError(
                f"model.lowres_residual: pass the clean low-res image as {LOWRES_IMAGE!r}"
            )
        return upsample_to(image, x)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        base = self._base(x, cond)
        return base + self.inner(x - base, sigma, **cond)

    def per_sample_loss(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        **kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cond = dict(cond or {})
        base = self._base(x0, cond)
        return self.inner.per_sample_loss(x0 - base, cond, generator, **kw)

    def sigmas(self, *args: Any, **kw: Any) -> torch.Tensor:
        return self.inner.sigmas(*args, **kw)


def build_denoiser(model: ModelConfig, net: nn.Module | Any) -> Denoiser:
    """The preconditioning ``model.preconditioning_type`` names, around ``net`` (diffusing the
    residual to the upsampled low-res image when ``model.lowres_residual``)."""
    kind, cfg = model.preconditioning_type, model.preconditioning
    den: Denoiser
    if kind == "EDM":
        if not isinstance(cfg, EDMConfig):
            raise ValueError("model.preconditioning: preconditioning_type EDM needs EDM keys")
        den = EDMDenoiser(net, cfg)
    elif kind == "DDPM":
        if not isinstance(cfg, DDPMConfig):
            raise ValueError("model.preconditioning: preconditioning_type DDPM needs DDPM keys")
        den = DDPMDenoiser(net, cfg)
    else:
        raise ValueError(f"model.preconditioning_type: got {kind!r}; allowed: 'EDM', 'DDPM'")
    return LowresResidual(den) if model.lowres_residual else den


__all__ = [
    "DDPMDenoiser",
    "Denoiser",
    "EDMDenoiser",
    "LOWRES_IMAGE",
    "LowresResidual",
    "build_denoiser",
    "elementwise_loss",
    "upsample_to",
]
