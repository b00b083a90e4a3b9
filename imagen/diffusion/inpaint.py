"""Inpainting: sample a masked region of an image and keep the rest, with any sampler.

The replacement method (Song et al. 2021, Sec. 5; Lugmayr et al. 2022, eq. 8): the sampler runs
as usual, and after every step the kept region of ``x`` is replaced by the known image noised
to the step's noise level, ``known + sigma_next * z`` in the variance-exploding view every
denoiser shares (a DDPM stage's ``x_vp = alpha x`` is the same point, so nothing depends on the
preconditioning). The starting noise is merged the same way, and the known pixels are pasted
into the result at the end, so the kept region is exactly the known image.

RePaint's resampling (Lugmayr et al. 2022, Algorithm 1 with jump length 1): with
``resample = r > 1`` every step but the last is taken r times; between two takes the merged
``x`` at sigma_next is noised back to sigma (``x + sqrt(sigma^2 - sigma_next^2) z``), which lets
the regenerated region harmonise with the kept one at the cost of r times the evaluations.
Each take is one call of the sampler over a one-step schedule, so a multistep solver
(dpmpp_2m) cannot resample: its history would mix takes; it is refused.

Masks are boolean, True where new content is sampled. :func:`fit_image` and :func:`fit_mask`
bring an image and its mask to a stage's resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from imagen.diffusion.denoiser import randn

# The samplers whose step depends only on the current x (and noise level): RePaint can repeat it
ONE_STEP_SAMPLERS = ("euler", "heun", "ddim", "ddpm")


def check_resample(resample: int, sampler: str) -> None:
    """A clear error for a ``resample`` below 1 or a sampler that cannot jump back ("auto" is
    Heun or DDPM, both one-step)."""
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample: got {resample!r}; it must be an integer >= 1")
    if resample > 1 and sampler not in (*ONE_STEP_SAMPLERS, "auto"):
        raise ValueError(
            f"resample {resample}: the sampler {sampler!r} is multistep and cannot jump back; "
            f"resample with one of {list(ONE_STEP_SAMPLERS)}"
        )


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, C, size, size): unchanged at that size, else bicubic
    (antialiased when shrinking) and clamped to [-1, 1]."""
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image.float(), size=(size, size), mode="bicubic", antialias=True)
    return out.clamp(-1, 1)


def fit_mask(regenerate: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) bool -> (N, 1, size, size) bool: a pixel at ``size`` is regenerated when any
    mask pixel under it is (a thin stroke never vanishes at a low resolution)."""
    if regenerate.shape[-2:] == (size, size):
        return regenerate.bool()
    return F.adaptive_max_pool2d(regenerate.float(), (size, size)) > 0


@dataclass
class Inpaint:
    """What to keep: ``known`` (B, C, H, W), the image at the sample's resolution, and
    ``regenerate`` (B, 1, H, W) bool (or any shape that broadcasts to the samples' with the
    same batch), True where the sampler makes new content; ``resample`` is RePaint's r (1: the
    plain replacement method)."""

    known: torch.Tensor
    regenerate: torch.Tensor
    resample: int = 1

    def check(self, shape: tuple[int, ...], sampler: str) -> None:
        """Clear errors for a known image or mask that does not fit ``shape``, a bad
        ``resample`` or a sampler that cannot resample."""
        if tuple(self.known.shape) != tuple(shape):
            raise ValueError(f"inpaint: known image {tuple(self.known.shape)} for samples {shape}")
        mask = tuple(self.regenerate.shape)
        fits = len(mask) == len(shape) and mask[0] == shape[0]
        fits = fits and all(m in (1, n) for m, n in zip(mask[1:], shape[1:], strict=True))
        if not fits:
            raise ValueError(f"inpaint: mask {mask} for samples {shape}")
        check_resample(self.resample, sampler)

    def merge(self, x: torch.Tensor, sigma: torch.Tensor, generator: Any) -> torch.Tensor:
        """x in the regenerated region, the known image noised to ``sigma`` elsewhere."""
        known = self.known.to(x)
        if float(sigma) > 0:
            known = known + sigma * randn(x.shape, x, generator)
        return torch.where(self.regenerate.to(x.device), x, known)

    def paste(self, x: torch.Tensor) -> torch.Tensor:
        """The known pixels, exactly, outside the regenerated region."""
        return torch.where(self.regenerate.to(x.device), x, self.known.to(x))


@torch.no_grad()
def sample_inpaint(
    fn: Callable[..., torch.Tensor],
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    inpaint: Inpaint,
    *,
    generator: Any = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Run the sampler ``fn`` from ``x`` (at sigmas[0]) over ``sigmas``, keeping the known region.

    ``options`` are the sampler's own keywords (Heun's churn, DDIM's eta).
    """
    sigmas = sigmas.to(x)
    x = inpaint.merge(x, sigmas[0], generator)
    if inpaint.resample == 1:

        def replace(info: dict[str, Any]) -> torch.Tensor:
            merged = inpaint.merge(info["x"], info["sigma_next"], generator)
            if callback is not None:
                callback({**info, "x": merged})
            return merged  # a callback's tensor replaces the sampler's x

        x = fn(denoise_fn, x, sigmas, generator=generator, callback=replace, progress=progress)
        return inpaint.paste(x)
    n = len(sigmas) - 1
    if "s_churn" in options:  # Heun's churn per step is s_churn / n: one-step calls get it so
        options = {**options, "s_churn": options["s_churn"] / n}
    from tqdm.auto import tqdm

    for i in tqdm(range(n), desc="inpaint", disable=not progress, leave=False):
        s, s_next = sigmas[i], sigmas[i + 1]
        takes = inpaint.resample if s_next > 0 else 1  # the last step to sigma 0: taken once
        for take in range(takes):
            x_next = fn(denoise_fn, x, sigmas[i : i + 2], generator=generator, **options)
            x_next = inpaint.merge(x_next, s_next, generator)
            if take < takes - 1:  # jump back: noise x_next from s_next to s again
                x = x_next + (s**2 - s_next**2).sqrt() * randn(x.shape, x, generator)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": None})
    return inpaint.paste(x)
