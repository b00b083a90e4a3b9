"""NeMo's Imagen (nemo_toolkit 2.4.0) as a test oracle, importable on a CPU without its extras.

nemo_toolkit 2.4.0 is the last release that holds Imagen. Its Imagen modules import two things
this test environment does not have, stood in for here by small shims:

* ``apex.contrib.group_norm.GroupNorm``: apex's fused GroupNorm; the shim is torch's GroupNorm
  followed by the optional activation (``act="silu"``), which is what apex computes;
* ``nemo.collections.multimodal.parts.utils``: the real module pulls in Lightning and Megatron;
  the Imagen code needs only its ``randn_like(x, generator)``.

:func:`load` installs the shims in ``sys.modules`` (only where nothing real is importable) and
returns a namespace with NeMo's classes, or raises ``ImportError`` when nemo is not installed
(``make install`` installs it: ``pip install --no-deps nemo_toolkit==2.4.0 einops``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

NEMO_VERSION = "2.4.0"


class _GroupNorm(torch.nn.GroupNorm):
    """apex.contrib.group_norm.GroupNorm's interface on torch's GroupNorm."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act="", **_):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.act = act

    def forward(self, x):
        y = super().forward(x)
        return F.silu(y) if self.act in ("silu", "swish") else y


def _randn_like(x, generator=None):
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _install_shims() -> None:
    if "apex.contrib.group_norm" not in sys.modules and importlib.util.find_spec("apex") is None:
        apex = types.ModuleType("apex")
        contrib = types.ModuleType("apex.contrib")
        group_norm = types.ModuleType("apex.contrib.group_norm")
        group_norm.GroupNorm = _GroupNorm
        apex.contrib = contrib
        contrib.group_norm = group_norm
        sys.modules.update(
            {"apex": apex, "apex.contrib": contrib, "apex.contrib.group_norm": group_norm}
        )
    name = "nemo.collections.multimodal.parts.utils"
    if name not in sys.modules:
        utils = types.ModuleType(name)
        utils.randn_like = _randn_like
        sys.modules[name] = utils


@functools.cache
def load() -> types.SimpleNamespace:
    """NeMo's Imagen classes: UNetModel, EfficientUNetModel, EDMPrecond, ContinousDDPMPrecond,
    EDMSampler, DDPMSampler, GaussianDiffusionContinuousTimes, thresholding_x0."""
    nemo = importlib.import_module("nemo")
    version = getattr(nemo, "__version__", "?")
    if version != NEMO_VERSION:
        raise ImportError(f"the oracle is nemo_toolkit {NEMO_VERSION}, found {version}")
    _install_shims()
    nets = importlib.import_module(
        "nemo.collections.multimodal.modules.imagen.diffusionmodules.nets"
    )
    precond = importlib.import_module(
        "nemo.collections.multimodal.models.text_to_image.imagen.precond"
    )
    sampler = importlib.import_module("nemo.collections.multimodal.modules.imagen.sampler.sampler")
    ddpm = importlib.import_module(
        "nemo.collections.multimodal.modules.imagen.sampler.continuous_ddpm"
    )
    return types.SimpleNamespace(
        UNetModel=nets.UNetModel,
        EfficientUNetModel=nets.EfficientUNetModel,
        EDMPrecond=precond.EDMPrecond,
        ContinousDDPMPrecond=precond.ContinousDDPMPrecond,
        EDMSampler=sampler.EDMSampler,
        DDPMSampler=sampler.DDPMSampler,
        thresholding_x0=sampler.thresholding_x0,
        GaussianDiffusionContinuousTimes=ddpm.GaussianDiffusionContinuousTimes,
    )
