"""Efficient UNet (Imagen, Saharia et al. 2022, Appendix B.1; NeMo ``unet_type: sr``).

Changes from the Regular UNet, as the seed lists them:
  1. parameters move to the low resolutions (``num_resblocks`` per level, more at the bottom);
  2. ResBlock shortcuts are scaled by 1/sqrt(2) (``skip_connection_scaling``) and always carry
     a 1x1 convolution (Imagen Figure A.27);
  3. each down level down-samples (a learned conv with ``stride``) BEFORE its ResBlocks and
     each up level up-samples (a transposed conv) AFTER its ResBlocks; the deepest level does
     neither. A level's U-Net skip is added (not concatenated) to the up path.

Level i (channels c_i = embed_dim * channel_mult[i], c_-1 = c_0):
    down i: [stride-down c_{i-1}] -> ResBlock c_{i-1}->c_i, (n_i - 1) x ResBlock c_i
            -> attention (when atnn_enabled_at[i])                     -> skip_i
    up i:   (+ skip_i) -> ResBlock c_i->c_{i-1}, (n_i - 1) x ResBlock c_{i-1}
            -> attention (when atnn_enabled_at[i]) -> [stride-up c_{i-1}]
The input is the noisy image concatenated with the bicubically up-sampled low-res image; the
output head is a plain 1x1 conv. As in NeMo, the text conditioning width (attention context and
pooled vector) is the text embedding's own dim: ``cond_dim`` does not apply to this net, and
its ResBlocks have no dropout. ``atnn_enabled_at`` absent means NeMo's default [0, 0, 0, 0, 1]
(attention at the fifth level only).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from imagen.config import UNetConfig
from imagen.nn.layers import ResBlock, StridedDown, StridedUp
from imagen.nn.unet import UNetBase, run_block

# NeMo's EfficientUNetModel default when atnn_enabled_at is not given
DEFAULT_ATTENTION_AT: tuple[int, ...] = (0, 0, 0, 0, 1)


def default_attention_at(cfg: UNetConfig, levels: int) -> list[int]:
    """``atnn_enabled_at``, or NeMo's default [0, 0, 0, 0, 1] cut to ``levels`` when absent."""
    if cfg.atnn_enabled_at is not None:
        return list(cfg.atnn_enabled_at)
    if levels > len(DEFAULT_ATTENTION_AT):
        raise ValueError(
            f"unet.atnn_enabled_at: NeMo's default covers {len(DEFAULT_ATTENTION_AT)} levels, "
            f"channel_mult has {levels}; give one 0/1 per level"
        )
    return list(DEFAULT_ATTENTION_AT[:levels])


class EfficientUNet(UNetBase):
    """Efficient UNet super-resolution net; see the module docstring."""

    def __init__(
        self, cfg: UNetConfig, text_embed_dim: int, *, noise_cond_aug: bool = False
    ) -> None:
        super().__init__(
            cfg, text_embed_dim, is_sr=True, cond_dim=text_embed_dim, noise_cond_aug=noise_cond_aug
        )
        e, mult = cfg.embed_dim, cfg.channel_mult
        levels = len(mult)
        if cfg.num_resblocks is None or len(cfg.num_resblocks) != levels:
            raise ValueError("unet.num_resblocks: the Efficient UNet needs one count per level")
        attn = default_attention_at(cfg, levels)
        k = cfg.init_conv_kernel_size

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(
                i,
                o,
                self.emb_dim,
                dropout=0.0,
                scale_shift_norm=cfg.scale_shift_norm,
                shortcut_scale=1 / math.sqrt(2) if cfg.skip_connection_scaling else 1.0,
                always_conv_shortcut=True,
                checkpointing=cfg.gradient_checkpointing,
            )

        ch = e * mult[0]
        self.init_conv = nn.Conv2d(self.in_channels, ch, k, padding=k // 2)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level, m in enumerate(mult):
            out = e * m
            last = level == levels - 1
            n = cfg.num_resblocks[level]
            down: list[nn.Module] = [] if last else [StridedDown(ch, cfg.stride)]
            down += [res(ch, out)] + [res(out, out) for _ in range(n - 1)]
            up: list[nn.Module] = [res(out, ch)] + [res(ch, ch) for _ in range(n - 1)]
            if attn[level]:
                down.append(self._attention(out))
                up.append(self._attention(ch))
            if not last:
                up.append(StridedUp(ch, cfg.stride))
            self.down.append(nn.ModuleList(down))
            self.up.append(nn.ModuleList(up))
            ch = out

        self.out = nn.Conv2d(e * mult[0], cfg.channels, 1)

    def body(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """x: the noisy image concatenated with the up-sampled low-res image."""
        h = self.init_conv(x)  # (B, c_0, H, W)
        skips = []
        for blocks in self.down:
            for module in blocks:
                h = run_block(module, h, emb, context, mask)
            skips.append(h)
        skips.pop()  # the deepest level feeds the up path directly
        for level in reversed(range(len(self.up))):
            if level < len(self.up) - 1:
                h = h + skips[level]
            for module in self.up[level]:
                h = run_block(module, h, emb, context, mask)
        return self.out(h)
