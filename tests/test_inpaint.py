"""Inpainting: the replacement method and RePaint's resampling, on exact and tiny real models.

The exact denoiser of a two-component Gaussian mixture gives the ground truth: keeping one
coordinate at a value only one component explains, the regenerated coordinate must follow that
component, whatever the sampler and preconditioning. A tiny random cascade shows the kept region
is the input image to the pixel at the base stage and through an SR stage, and ``imagen sample
--image --mask`` writes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_tiny_cascade, shrink, write_params

from imagen.cli import main as cli_main
from imagen.config import ConfigError, DDPMConfig, EDMConfig, SamplingConfig
from imagen.diffusion import DDPMDenoiser, EDMDenoiser, Inpaint, fit_image, fit_mask, sample
from imagen.diffusion.analytic import GaussianMixture, exact_net
from imagen.sample.cascade import Cascade

F64 = torch.float64
N = 400


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(threads)


def _mixture() -> GaussianMixture:
    # component A around (-1, 0.6), B around (1, -0.6); 0.1 variance: 6 standard deviations apart
    means = torch.tensor([[-1.0, 0.6], [1.0, -0.6]], dtype=F64)
    return GaussianMixture([0.3, 0.7], means, 0.1 * torch.eye(2, dtype=F64).expand(2, 2, 2))


def _inpaint_mixture(kind: str, sampler: str, resample: int) -> torch.Tensor:
    """N samples of the mixture with x[0] kept at -1 (only component A explains it)."""
    target = _mixture()
    if kind == "EDM":
        den = exact_net(target, EDMDenoiser, config=EDMConfig())
    else:
        den = exact_net(target, DDPMDenoiser, config=DDPMConfig(pred_objective="v"))
    known = torch.tensor([-1.0, 0.0], dtype=F64).expand(N, 2)
    regenerate = torch.tensor([False, True]).expand(N, 2)
    schedule = "karras" if sampler in ("heun", "euler", "dpmpp_2m") else "auto"
    cfg = SamplingConfig(sampler=sampler, steps=40, guidance_scale=1.0, schedule=schedule)
    x = sample(den, (N, 2), sampling=cfg, seed=1, dtype=F64,
               inpaint=Inpaint(known, regenerate, resample))  # fmt: skip
    assert torch.equal(x[:, 0], known[:, 0])  # kept exactly
    return x[:, 1]


@pytest.mark.parametrize(
    ("kind", "sampler"), [("EDM", "heun"), ("EDM", "dpmpp_2m"), ("DDPM", "ddpm"), ("DDPM", "ddim")]
)
def test_regenerated_coordinate_follows_the_kept_one(kind: str, sampler: str) -> None:
    y = _inpaint_mixture(kind, sampler, 1)
    # Unconditionally 70% of samples come from B: P(x[1] > 0) = .31, mean -0.24. Given
    # x[0] = -1 they come from A, x[1] ~ N(0.6, 0.1): P(x[1] > 0) = .97. The replacement method
    # is approximate (measured at 4000 samples: mean .26-.41, P .78-.92 over the samplers).
    assert (y > 0).double().mean() > 0.7 and y.mean() > 0.2, ((y > 0).double().mean(), y.mean())


def test_resampling_moves_closer_to_the_conditional() -> None:
    # RePaint's jumps back let the regenerated coordinate catch up with the kept one: at 4000
    # samples the mean of x[1] goes from .27 (r = 1) to .44 (r = 3) and P(x[1] > 0) from .79
    # to .96; the truth is .6 and .97
    plain, resampled = _inpaint_mixture("EDM", "euler", 1), _inpaint_mixture("EDM", "euler", 3)
    assert float(resampled.mean()) - float(plain.mean()) > 0.1, (plain.mean(), resampled.mean())
    assert (resampled > 0).double().mean() > (plain > 0).double().mean() + 0.08


def test_bad_inpaint_arguments_fail_clearly() -> None:
    den = exact_net(_mixture(), EDMDenoiser, config=EDMConfig())
    known, regenerate = torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=torch.bool)
    cfg = SamplingConfig(sampler="dpmpp_2m", steps=2)
    with pytest.raises(ValueError, match="multistep and cannot jump back"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate, 2))
    with pytest.raises(ValueError, match="resample: got 0"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate, 0))
    with pytest.raises(ValueError, match="mask"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate[:1], 1))


def test_fit_mask_keeps_thin_strokes() -> None:
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 10, 20] = True  # one pixel at 64 px is still regenerated at 16 px
    small = fit_mask(mask, 16)
    assert small.shape == (1, 1, 16, 16) and small.sum() == 1 and small[0, 0, 2, 5]
    assert torch.equal(fit_mask(small, 32)[0, 0, 4:6, 10:12], torch.ones(2, 2, dtype=torch.bool))
