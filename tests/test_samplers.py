"""Samplers against exact Gaussian (mixture) targets, through both preconditionings.

The exact denoiser E[x0 | x_sigma] of a Gaussian (mixture) is known in closed form
(imagen.diffusion.analytic). Wrapped as the network an EDM or DDPM preconditioning needs, it
makes every sampler reproduce the data distribution up to its discretisation error, which at
the recommended step counts must be small against the Monte-Carlo error of n samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from imagen.config import DDPMConfig, EDMConfig, SamplingConfig
from imagen.diffusion import (
    SAMPLERS,
    DDPMDenoiser,
    EDMDenoiser,
    karras_sigmas,
    log_snr_cosine,
    log_snr_linear,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
    uniform_t_sigmas,
)
from imagen.diffusion.analytic import GaussianMixture, exact_net
from imagen.diffusion.samplers import RECOMMENDED_STEPS, evaluations

F64 = torch.float64
N = 4000  # samples per distribution check


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny (n x 3): a second thread only adds synchronisation, which costs
    # 20x on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian() -> GaussianMixture:
    # anisotropic, correlated, image-like scale: eigenvalues about 0.29, 0.09, 0.04
    a = torch.tensor([[0.5, 0.15, 0.0], [0.0, 0.25, 0.1], [0.1, 0.0, 0.2]], dtype=F64)
    return GaussianMixture.gaussian(torch.tensor([0.3, -0.2, 0.1], dtype=F64), a @ a.T)


def _mixture() -> GaussianMixture:
    # two components 7 standard deviations apart: a sample's component is unambiguous
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64)
    covs = torch.stack([0.1 * torch.eye(2, dtype=F64), torch.tensor([[0.1, 0.03], [0.03, 0.05]])])
    return GaussianMixture([0.3, 0.7], means, covs.to(F64))


def _denoiser(kind: str, target: GaussianMixture):
    if kind == "EDM":
        return exact_net(target, EDMDenoiser, config=EDMConfig())
    return exact_net(target, DDPMDenoiser, config=DDPMConfig(pred_objective="v"))


def _config(sampler: str) -> SamplingConfig:
    # ODE samplers use EDM's discretisation with either preconditioning (clamped to the DDPM
    # schedule's range); DDIM and ancestral DDPM use the preconditioning's own schedule.
    schedule = "karras" if sampler in ("heun", "euler", "dpmpp_2m") else "auto"
    return SamplingConfig(
        sampler=sampler,
        steps=RECOMMENDED_STEPS[sampler],
        guidance_scale=1.0,
        thresholding="none",
        schedule=schedule,
    )


def _moment_tolerances(target: GaussianMixture, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 standard errors of the sample mean and of each sample-covariance entry at n samples.

    SE(mean_i) = sqrt(Sigma_ii / n); SE(cov_ij) = std((x_i - mu_i)(x_j - mu_j)) / sqrt(n),
    the latter estimated from 200k exact samples (exact for any distribution, not only Gaussians).
    A correct sampler misses a moment by more than 4 SE with probability ~6e-5 per entry; the
    seeds are fixed, so the test is deterministic.
    """
    big = target.sample(200_000, torch.Generator().manual_seed(123))
    c = big - target.mean
    prod = c[:, :, None] * c[:, None, :]
    return 4 * (target.cov.diag() / n).sqrt(), 4 * prod.std(0) / math.sqrt(n)


@pytest.mark.parametrize("kind", ["EDM", "DDPM"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampler_reproduces_gaussian_moments(sampler: str, kind: str) -> None:
    target = _gaussian()
    den = _denoiser(kind, target)
    x = sample(den, (N, 3), sampling=_config(sampler), seed=1, dtype=F64)
    tol_mean, tol_cov = _moment_tolerances(target, N)
    assert ((x.mean(0) - target.mean).abs() <= tol_mean).all(), (x.mean(0), target.mean)
    assert ((torch.cov(x.T) - target.cov).abs() <= tol_cov).all(), (torch.cov(x.T), target.cov)


@pytest.mark.parametrize("kind", ["EDM", "DDPM"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampler_reproduces_mixture(sampler: str, kind: str) -> None:
    target = _mixture()
    den = _denoiser(kind, target)
    x = sample(den, (N, 2), sampling=_config(sampler), seed=2, dtype=F64)
    # Mixture weight: the share of samples closest to each component. SE = sqrt(w(1-w)/n),
    # tolerance 4 SE (0.029 at n = 4000); misassignment is ~1e-6 at 7 standard deviations.
    share = target.responsibilities(x).argmax(1).bincount(minlength=2).to(F64) / N
    w = target.weights
    assert ((share - w).abs() <= 4 * (w * (1 - w) / N).sqrt()).all(), share
    tol_mean, tol_cov = _moment_tolerances(target, N)
    assert ((x.mean(0) - target.mean).abs() <= tol_mean).all(), x.mean(0)
    assert ((torch.cov(x.T) - target.cov).abs() <= tol_cov).all(), torch.cov(x.T)


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m", "ddim"])
def test_deterministic_samplers_follow_the_exact_ode(sampler: str) -> None:
    # For one Gaussian the probability-flow ODE has a closed-form endpoint; a deterministic
    # sampler at its recommended steps lands within 2% of the data's scale (0.54) of it.
    target = _gaussian()
    den = _denoiser("DDPM", target) if sampler == "ddim" else _denoiser("EDM", target)
    sigmas = den.sigmas(RECOMMENDED_STEPS[sampler], dtype=F64)
    x_T = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    out = SAMPLERS[sampler](den, x_T, sigmas)
    exact = target.ode_solution(x_T, float(sigmas[0]))
    assert (out - exact).norm(dim=1).mean() < 0.01


def _ode_error(fn, steps: int, x_T: torch.Tensor, target: GaussianMixture) -> float:
    sigmas = karras_sigmas(steps, dtype=F64)
    out = fn(target, x_T * sigmas[0], sigmas)
    return float((out - target.ode_solution(x_T * sigmas[0], 80.0)).norm(dim=1).mean())


def test_heun_beats_euler_at_equal_evaluations_and_is_second_order() -> None:
    # Error = mean distance of the ODE endpoint from the exact one, same x_T: deterministic.
    target = _gaussian()
    x_T = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    heun_18, heun_36 = (_ode_error(sample_heun, n, x_T, target) for n in (18, 36))
    euler_35, euler_70 = (_ode_error(sample_euler, n, x_T, target) for n in (35, 70))
    assert evaluations("heun", 18) == evaluations("euler", 35) == 35
    assert heun_18 < 0.8 * euler_35, (heun_18, euler_35)
    # Doubling the steps divides the error by ~2^order.
    assert math.log2(heun_18 / heun_36) > 1.7, (heun_18, heun_36)
    assert 0.7 < math.log2(euler_35 / euler_70) < 1.3, (euler_35, euler_70)


def test_ddpm_sampler_is_ddim_with_eta_one() -> None:
    # The DDPM posterior and DDIM with eta = 1 are the same update; same noise, same result.
    target = _gaussian()
    sigmas = karras_sigmas(20, dtype=F64)
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    a = sample_ddpm(target, x_T, sigmas, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(target, x_T, sigmas, generator=torch.Generator().manual_seed(5), eta=1.0)
    torch.testing.assert_close(a, b)
    c = sample_ddim(target, x_T, sigmas, eta=0.0)
    torch.testing.assert_close(c, sample_euler(target, x_T, sigmas))  # DDIM(eta=0) = Euler


def test_karras_sigmas_follow_edm_eq5() -> None:
    s = karras_sigmas(18, 0.002, 80.0, 7.0, dtype=F64)
    assert s.shape == (19,) and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=F64))
    torch.testing.assert_close(s[17], torch.tensor(0.002, dtype=F64))
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(s[i]) == pytest.approx(expected, rel=1e-12)
    assert (s[:-1].diff() < 0).all()
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


def test_log_snr_schedules() -> None:
    t = torch.tensor([0.25, 0.5], dtype=F64)
    cos_expected = -2 * torch.log(torch.tan((t + 0.008) / 1.008 * math.pi / 2))
    torch.testing.assert_close(log_snr_cosine(t), cos_expected)
    lin_expected = -torch.log(torch.expm1(1e-4 + 10 * t**2))  # NeMo's "linear"
    torch.testing.assert_close(log_snr_linear(t), lin_expected)
    for fn in (log_snr_cosine, log_snr_linear):
        grid = torch.linspace(0, 1, 101, dtype=F64)
        v = fn(grid)
        assert torch.isfinite(v).all() and (v.diff() <= 0).all()  # decreasing in t, finite ends


def test_uniform_t_sigmas_respace_the_training_grid() -> None:
    full = uniform_t_sigmas(log_snr_cosine, 1000, 1000, dtype=F64)
    assert full.shape == (1001,) and full[-1] == 0 and (full[:-1].diff() < 0).all()
    some = uniform_t_sigmas(log_snr_cosine, 250, 1000, dtype=F64)
    # every respaced level is one of the training levels
    assert torch.isin(some[:-1], full[:-1]).all()
    assert (some[:-1].diff() < 0).all()
    den = DDPMDenoiser(torch.nn.Identity(), DDPMConfig(timesteps=100))
    with pytest.raises(ValueError, match="timesteps"):
        den.sigmas(101)
    # a Karras schedule of a DDPM model stays inside its noise range
    k = den.sigmas(10, "karras", sigma_min=1e-4, sigma_max=1e9, dtype=F64)
    assert float(k[0]) == pytest.approx(den.sigma_max) and float(k[-2]) == pytest.approx(
        den.sigma_min
    )


class _TinyNet(torch.nn.Module):
    """A real conv net with the project's network signature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.text = torch.nn.Linear(8, 3)

    def forward(
        self,
        x,
        noise_cond,
        text_embed=None,
        text_mask=None,
        lowres=None,
        aug_level=None,
        drop_text=None,
    ):
        h = self.conv(x) * torch.cos(noise_cond)[:, None, None, None]
        if text_embed is not None:
            t = self.text(text_embed.mean(1))
            if drop_text is not None:
                t = torch.where(drop_text[:, None], torch.zeros_like(t), t)
            h = h + t[:, :, None, None]
        return h


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_seed_same_samples_different_seed_different(sampler: str) -> None:
    den = EDMDenoiser(_TinyNet()).eval()
    cond = {"text_embed": torch.randn(2, 5, 8), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    cfg = SamplingConfig(sampler=sampler, steps=4, guidance_scale=3.0, s_churn=10.0, eta=0.5)
    a = sample(den, (2, 3, 8, 8), cond, cfg, seed=7)
    b = sample(den, (2, 3, 8, 8), cond, cfg, seed=7)
    c = sample(den, (2, 3, 8, 8), cond, cfg, seed=8)
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= 1.0  # dynamic thresholding by default


def test_sample_reports_progress_and_steps(capsys) -> None:
    den = DDPMDenoiser(_TinyNet(), DDPMConfig(timesteps=50)).eval()
    seen = []
    cfg = SamplingConfig(sampler="ddpm", steps=5, guidance_scale=2.0)
    sample(den, (1, 3, 8, 8), None, cfg, progress=True, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(5))
    assert "ddpm" in capsys.readouterr().err


def test_euler_keeps_the_denoised_image_from_a_huge_first_level() -> None:
    # A DDPM stage's uniform-t grid starts at t = 1, sigma ~ 1e7: in float32 the textbook
    # x + (s_next - s)(x - D)/s cancels D away (errors of order 1); one step to sigma = 0 must
    # return D itself.
    target = torch.full((2, 3, 4, 4), 0.37)
    sigmas = torch.tensor([2.3e7, 0.0])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return target

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = sample_euler(denoise, x, sigmas)
    torch.testing.assert_close(out, target)


def test_heun_from_a_huge_first_level_follows_the_ode() -> None:
    # Data N(mu, tau^2) has the exact denoiser mu + tau^2 / (tau^2 + s^2) (x - mu), and the
    # probability-flow ODE carries x = mu + sqrt(tau^2 + s^2) eps to mu + tau eps. From a DDPM
    # stage's first level (sigma ~ 1e7) Heun's trapezoid would scale the change in predicted
    # noise by 1e7; the sample must stay on the ODE's path instead.
    mu, tau = 0.37, 0.1
    sigmas = torch.tensor([2.3e7, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.0])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return mu + tau**2 / (tau**2 + sigma**2) * (x - mu)

    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_heun(denoise, mu + sigmas[0] * eps, sigmas)
    torch.testing.assert_close(out, mu + tau * eps, atol=0.05, rtol=0)
