"""Diffusion: EDM and continuous-DDPM preconditioning, samplers, guidance, noise augmentation.

Every preconditioning is a :class:`Denoiser` (``denoiser(x, sigma, **cond) -> x0_hat`` with
``x = x0 + sigma * eps``; ``denoiser.loss(x0, cond)`` for training), and every sampler works
with every preconditioning through that one interface. :func:`sample` is the entry point.
"""

from imagen.diffusion.denoiser import (
    LOWRES_IMAGE,
    DDPMDenoiser,
    Denoiser,
    EDMDenoiser,
    LowresResidual,
    SampleGenerators,
    build_denoiser,
    elementwise_loss,
    upsample_to,
)
from imagen.diffusion.guidance import (
    GuidedDenoiser,
    apply_threshold,
    drop_mask,
    dynamic_threshold,
    static_threshold,
)
from imagen.diffusion.inpaint import Inpaint, fit_image, fit_mask
from imagen.diffusion.noise_aug import (
    augment_lowres,
    lowres_condition,
    sample_aug_level,
    sr_condition,
)
from imagen.diffusion.samplers import (
    SAMPLERS,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from imagen.diffusion.schedules import (
    karras_sigmas,
    log_snr_cosine,
    log_snr_linear,
    uniform_t_sigmas,
)

__all__ = [
    "LOWRES_IMAGE",
    "LowresResidual",
    "SampleGenerators",
    "SAMPLERS",
    "DDPMDenoiser",
    "Denoiser",
    "EDMDenoiser",
    "GuidedDenoiser",
    "Inpaint",
    "apply_threshold",
    "augment_lowres",
    "build_denoiser",
    "drop_mask",
    "dynamic_threshold",
    "elementwise_loss",
    "fit_image",
    "fit_mask",
    "karras_sigmas",
    "log_snr_cosine",
    "log_snr_linear",
    "lowres_condition",
    "sample",
    "sample_aug_level",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sr_condition",
    "static_threshold",
    "uniform_t_sigmas",
    "upsample_to",
]
