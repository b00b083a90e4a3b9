"""Samplers: flat functions ``sample_<name>(denoise_fn, x_T, sigmas, ...) -> x0``.

``denoise_fn(x, sigma) -> x0_hat`` is any denoiser in the variance-exploding view
(``x = x0 + sigma * eps``): a :class:`~imagen.diffusion.denoiser.Denoiser` (EDM or DDPM
preconditioning), a :class:`~imagen.diffusion.guidance.GuidedDenoiser`, or an exact analytic
denoiser. ``sigmas`` is a decreasing (N + 1,) tensor ending in 0, i.e. N steps. All randomness
comes from ``generator``. ``callback`` gets a dict (i, sigma, sigma_next, x, denoised) per step;
a tensor it returns replaces x (how inpainting keeps the known region).

:func:`sample` is the entry point that training and evaluation use: it reads a
:class:`~imagen.config.SamplingConfig` and is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from imagen.config import SamplingConfig
from imagen.diffusion.denoiser import DDPMDenoiser, Denoiser, randn
from imagen.diffusion.guidance import GuidedDenoiser
from imagen.diffusion.inpaint import Inpaint, sample_inpaint

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def _steps(sigmas: torch.Tensor, progress: bool, desc: str):
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError("sigmas must hold at least two noise levels (one step)")
    return tqdm(range(n), desc=desc, disable=not progress, leave=False)


def _report(callback: Callback | None, i: int, s, s_next, x, denoised) -> torch.Tensor:
    """Call ``callback`` with the step; x, or the tensor the callback returned in its place."""
    if callback is not None:
        out = callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": denoised})
        if isinstance(out, torch.Tensor):
            return out
    return x


@torch.no_grad()
def sample_euler(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """First-order Euler on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma."""
    sigmas = sigmas.to(x)
    for i in _steps(sigmas, progress, "euler"):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, s)
        # Karras et al. 2022, eq. 3 with sigma(t) = t, s(t) = 1: x + (s_next - s)(x - D) / s,
        # written as D + (s_next / s)(x - D) so that a huge first level (a DDPM stage's t = 1
        # is sigma ~ 1e7) does not cancel D away in float32
        x = denoised + (s_next / s) * (x - denoised)
        x = _report(callback, i, s, s_next, x, denoised)
    return x


_HEUN_MAX_SIGMA = 1e3  # EDM's sigma_max is 80; DDPM's cosine t = 1 is ~1e7


@torch.no_grad()
def sample_heun(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2), 2N - 1 evaluations.

    With ``s_churn > 0`` noise is added back at levels in [s_tmin, s_tmax] before each step
    (the stochastic sampler); ``s_churn = 0`` is the deterministic Algorithm 1.
    """
    sigmas = sigmas.to(x)
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress, "heun"):
        s, s_next = sigmas[i], sigmas[i + 1]
        # Algorithm 2, lines 4-6: temporarily raise the noise level to sigma_hat
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= float(s) <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = randn(x.shape, x, generator) * s_noise
            x = x + (s_hat**2 - s**2).sqrt() * eps
        # lines 7-8: Euler step from sigma_hat to sigma_next (written as in sample_euler)
        denoised = denoise_fn(x, s_hat)
        d = (x - denoised) / s_hat
        x_next = denoised + (s_next / s_hat) * (x - denoised)
        # lines 9-11: 2nd-order correction, skipped on the last step to sigma = 0 and from a
        # level where x is all noise (a DDPM stage's first level): there the trapezoid
        # multiplies the change in predicted noise by sigma_hat ~ 1e7 and the sample explodes
        if s_next > 0 and s_hat <= _HEUN_MAX_SIGMA:
            d_next = (x_next - denoise_fn(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
        x = _report(callback, i, s, s_next, x, denoised)
    return x


def _ancestral_sigmas(s: torch.Tensor, s_next: torch.Tensor, eta: float):
    """Split a step s -> s_next into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_up^2 = eta^2 s_next^2 (s^2 - s_next^2) / s^2 is the DDPM posterior variance for
    eta = 1 (VE form), and sigma_down^2 = s_next^2 - sigma_up^2.
    """
    sigma_up = eta * (s_next**2 * (s**2 - s_next**2) / s**2).clamp_min(0).sqrt()
    sigma_up = torch.minimum(sigma_up, s_next)
    sigma_down = (s_next**2 - sigma_up**2).clamp_min(0).sqrt()
    return sigma_down, sigma_up


def _ancestral(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float,
    generator: torch.Generator | None,
    callback: Callback | None,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """x_next = x0_hat + sigma_down eps_hat + sigma_up z: the loop DDIM and DDPM share."""
    sigmas = sigmas.to(x)
    for i in _steps(sigmas, progress, desc):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, s)
        eps_hat = (x - denoised) / s
        sigma_down, sigma_up = _ancestral_sigmas(s, s_next, eta)
        x = denoised + sigma_down * eps_hat
        if eta > 0 and s_next > 0:
            x = x + sigma_up * randn(x.shape, x, generator)
        x = _report(callback, i, s, s_next, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in VE form; eta = 0 deterministic, eta = 1 the DDPM posterior.

    x_next = x0_hat + sqrt(s_next^2 - sigma_up^2) eps_hat + sigma_up z, eps_hat = (x - x0_hat)/s.
    (Dividing DDIM's eq. 12 by alpha_next gives this form; for eta = 0 it is the Euler step.)
    """
    return _ancestral(denoise_fn, x, sigmas, eta, generator, callback, progress, "ddim")


@torch.no_grad()
def sample_ddpm(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_next | x, x0 = x0_hat) (Ho et al. 2020).

    In VE form x = x0 + s eps, x_next = x0 + s_next eps': the posterior is Gaussian with
    mean x0 + (s_next^2 / s^2)(x - x0) and variance s_next^2 (s^2 - s_next^2) / s^2. That is
    the ancestral step at eta = 1: sigma_up^2 is this variance and sigma_down = s_next^2 / s
    puts the mean at x0 + (s_next^2 / s^2)(x - x0).
    """
    return _ancestral(denoise_fn, x, sigmas, 1.0, generator, callback, progress, "ddpm")


@torch.no_grad()
def sample_dpmpp_2m(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep 2nd order, one evaluation a step.

    In VE form alpha = 1 and lambda = -ln(sigma); the same update holds for a VP model because
    the two processes differ by the scaling x_vp = alpha x, which leaves lambda unchanged.
    """
    sigmas = sigmas.to(x)
    old_denoised = None
    h_last = None
    for i in _steps(sigmas, progress, "dpmpp_2m"):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, s)
        if s_next == 0:
            x = denoised  # the exponential integrator's limit at sigma = 0
        else:
            h = torch.log(s) - torch.log(s_next)  # lambda_next - lambda
            if old_denoised is None:
                d = denoised  # first step: DPM-Solver++(1), i.e. DDIM
            else:
                r = h_last / h
                # Lu et al. 2022, Alg. 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_next / s) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = _report(callback, i, s, s_next, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "heun": sample_heun,
    "euler": sample_euler,
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


# Step counts at which each sampler's discretisation error is small: on the analytic Gaussian
# of tests/test_samplers.py (data scale 0.2-0.55, EDM or DDPM preconditioning) the variance of
# the samples is within ~3-5% of the data's. EDM's 18 Heun steps (35 evaluations), the image
# setting of Karras et al., still overshoot that variance by 10-15%; NeMo's inference defaults
# (20-30 steps) trade the same accuracy for speed.
RECOMMENDED_STEPS: dict[str, int] = {
    "heun": 32,
    "euler": 200,
    "dpmpp_2m": 40,
    "ddim": 200,
    "ddpm": 500,
}


def evaluations(sampler: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps (Heun: 2 per step but the last)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def sampler_options(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampler-specific keyword options SamplingConfig carries."""
    if sampling.sampler == "heun":
        return dict(
            s_churn=sampling.s_churn,
            s_tmin=sampling.s_tmin,
            s_tmax=sampling.s_tmax,
            s_noise=sampling.s_noise,
        )
    if sampling.sampler == "ddim":
        return dict(eta=sampling.eta)
    return {}


def _module_device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...] | torch.Size,
    cond: Mapping[str, Any] | None = None,
    sampling: SamplingConfig | None = None,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    guide: Denoiser | None = None,
    negative: Mapping[str, Any] | None = None,
    inpaint: Inpaint | None = None,
) -> torch.Tensor:
    """Draw samples of ``shape`` from ``denoiser`` as ``sampling`` configures.

    ``sampling.guidance == "auto"`` (autoguidance) needs ``guide``, the loaded guide denoiser
    (``sampling.guide`` names its file; loading it is the caller's job). ``negative`` (CFG
    only) conditions the unconditional branch on negative prompts: ``text_embed``,
    ``text_mask`` and ``null`` (B,), see :class:`~imagen.diffusion.guidance.GuidedDenoiser`.

    The sampler, step count, schedule (``sampling.schedule``; auto: Karras for EDM, uniform t
    for DDPM), guidance and thresholding all come from ``sampling``; ``guidance_scale``
    overrides its guidance (evaluation sweeps). All noise is drawn from ``generator`` or, when
    none is given, a generator on ``device`` seeded with ``seed``: the same seed gives the same
    samples on the same device. With ``inpaint`` only its regenerated region is sampled; the
    rest is its known image (:mod:`imagen.diffusion.inpaint`).
    """
    sampling = sampling or SamplingConfig()
    if sampling.sampler == "auto":  # NeMo's: Heun for EDM, ancestral DDPM for DDPM
        kind = "ddpm" if isinstance(denoiser, DDPMDenoiser) else "heun"
        sampling = sampling.model_copy(update={"sampler": kind})
    if sampling.sampler not in SAMPLERS:
        raise ValueError(f"sampler: got {sampling.sampler!r}; allowed: {sorted(SAMPLERS)}")
    if inpaint is not None:
        inpaint.check(tuple(shape), sampling.sampler)
    mod_device, mod_dtype = _module_device_dtype(denoiser)
    device = torch.device(device) if device is not None else mod_device
    dtype = dtype or mod_dtype
    if generator is None:  # drawn where the network runs: no host randn and copy per step
        generator = torch.Generator(device).manual_seed(seed)
    sigmas = denoiser.sigmas(
        sampling.steps,
        sampling.schedule,
        sigma_min=sampling.sigma_min,
        sigma_max=sampling.sigma_max,
        rho=sampling.rho,
        dtype=torch.float64,
    ).to(device=device, dtype=dtype)
    scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
    percentile = sampling.dynamic_threshold if sampling.dynamic_threshold is not None else 0.995
    thresholding = sampling.thresholding
    if thresholding == "dynamic" and sampling.dynamic_threshold is None:
        thresholding = "none"  # dynamic_threshold: null switches it off
    interval = tuple(sampling.guidance_interval) if sampling.guidance_interval else None
    if sampling.guidance == "auto" and guide is None:
        raise ValueError(
            f"sampling.guide: guidance 'auto' needs the guide model ({sampling.guide}) loaded"
        )
    denoise_fn = GuidedDenoiser(
        denoiser,
        cond,
        scale,
        thresholding,
        percentile,
        interval,
        guide=guide if sampling.guidance == "auto" else None,
        negative=negative,
    )
    like = torch.empty(0, device=device, dtype=dtype)
    x_T = randn(tuple(shape), like, generator) * sigmas[0]
    fn = SAMPLERS[sampling.sampler]
    if inpaint is not None:
        return sample_inpaint(
            fn,
            denoise_fn,
            x_T,
            sigmas,
            inpaint,
            generator=generator,
            callback=callback,
            progress=progress,
            **sampler_options(sampling),
        )
    return fn(
        denoise_fn,
        x_T,
        sigmas,
        generator=generator,
        callback=callback,
        progress=progress,
        **sampler_options(sampling),
    )
