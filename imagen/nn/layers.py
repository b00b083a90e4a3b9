"""Convolutional building blocks shared by both UNets: norms, ResBlocks, up/down sampling.

ResBlock follows NeMo's block (REFERENCE.md "Building blocks"):
GroupNorm(32) -> SiLU -> conv3x3; the conditioning embedding -> Linear(2C) applied as
GN(h) * (1 + scale) + shift (scale_shift_norm); SiLU -> dropout -> zero-initialised conv3x3;
a 1x1 convolution on the shortcut when the channel count changes (always, for the Efficient
UNet, as in Imagen's Figure A.27), optionally scaled by 1/sqrt(2). The Efficient UNet's blocks
have no dropout (NeMo's EfficientResBlock).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from imagen.config import UNetConfig


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter (output convolutions start as the identity residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest count dividing ``channels`` (tiny models)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


def maybe_checkpoint(enabled: bool, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """Run ``fn(*args)``, recomputing its activations in backward when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _resample_padding(stride: int) -> tuple[int, int, int]:
    """(kernel, padding, output_padding) so a strided conv maps H -> H / stride exactly and the
    matching transposed conv maps H -> H * stride (kernel 2*stride, NeMo's 4/2/1 for stride 2)."""
    kernel = 2 * stride
    pad = (stride + 1) // 2
    return kernel, pad, 2 * pad - stride


class Downsample(nn.Module):
    """Halve H and W: a strided conv3x3 (``resample_with_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) if self.op is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W with a learned 4x4 transposed conv, stride 2 (NeMo's ``UpsampleLearnable``,
    which its Regular UNet uses whatever ``resample_with_conv`` says; it also works in bf16)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class StridedDown(nn.Module):
    """Efficient UNet down-sampling: a learned conv with ``stride`` (H -> H / stride)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        k, p, _ = _resample_padding(stride)
        self.conv = nn.Conv2d(channels, channels, k, stride=stride, padding=p)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class StridedUp(nn.Module):
    """Efficient UNet up-sampling: a transposed conv with ``stride`` (H -> H * stride)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        k, p, op = _resample_padding(stride)
        self.conv = nn.ConvTranspose2d(
            channels, channels, k, stride=stride, padding=p, output_padding=op
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + pooled text + augmentation) embedding.

    ``up``/``down`` resample inside the block (Regular UNet with resblock_updown), applied to
    both the residual branch (after the first norm/activation) and the shortcut: down by 2x2
    average pooling, up by two separate learned transposed convs (NeMo's ``h_upd``/``x_upd``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        scale_shift_norm: bool = True,
        shortcut_scale: float = 1.0,
        always_conv_shortcut: bool = False,
        up: bool = False,
        down: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.shortcut_scale = shortcut_scale
        self.checkpointing = checkpointing
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift_norm else out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        if in_ch != out_ch or always_conv_shortcut:
            self.shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.shortcut = nn.Identity()
        self.resample_h: nn.Module
        self.resample_x: nn.Module
        if up:
            self.resample_h, self.resample_x = Upsample(in_ch), Upsample(in_ch)
        elif down:
            self.resample_h = self.resample_x = Downsample(in_ch, use_conv=False)
        else:
            self.resample_h = self.resample_x = nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return maybe_checkpoint(self.checkpointing, self._forward, x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self.resample_h(h))  # (B, out_ch, H', W')
        x = self.resample_x(x)
        e = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)  # (B, 2*out_ch | out_ch, 1, 1)
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift  # GN(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) * self.shortcut_scale + h


def heads_for(u: UNetConfig, channels: int) -> int:
    """Attention heads for a block of ``channels``: per_head_channels wins when it divides."""
    if u.per_head_channels > 0 and channels % u.per_head_channels == 0:
        return max(1, channels // u.per_head_channels)
    return max(1, math.gcd(channels, u.num_attn_heads))
