"""Regular UNet (NeMo ``unet_type: base``, and ``sr-unet`` with the low-res image concatenated).

Layout (Ho et al. 2020 / Dhariwal & Nichol 2021, as NeMo configures it):
    init conv -> per level: num_res_blocks x [ResBlock (+ attention)] then a down-sample
    -> middle: ResBlock, attention, ResBlock
    -> per level (reversed): (num_res_blocks + 1) x [concat skip, ResBlock (+ attention)],
       then an up-sample -> GroupNorm, SiLU, zero-initialised conv.
Down-sampling: a strided conv3x3 (resample_with_conv) or 2x2 average pooling; up-sampling is
always NeMo's learned 4x4 transposed conv; with resblock_updown both happen inside a ResBlock.
Module order mirrors NeMo's UNetModel (``down[i]`` is its ``input_blocks[i + 1]``, ``middle``
its ``middle_block``, ``up[i]`` its ``output_blocks[i]``): imagen.nemo.convert maps the weights.
Attention sits at the levels whose pixel resolution (image_size / 2**level) is listed in
``attention_resolutions``, and always in the middle block. ``num_resblocks`` (a list per
level), when given, overrides ``num_res_blocks``. The net is fully convolutional: attention
runs over whatever H*W it is given, so an SR net trained on crops samples at full size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imagen.config import UNetConfig
from imagen.nn.attention import AttentionBlock, make_attention
from imagen.nn.embeddings import Conditioning, resize_lowres
from imagen.nn.layers import (
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    heads_for,
    zero_module,
)


class UNetBase(nn.Module):
    """What both UNets share: the conditioning and the forward signature's input handling."""

    def __init__(
        self,
        cfg: UNetConfig,
        text_embed_dim: int,
        is_sr: bool,
        *,
        cond_dim: int | None = None,
        noise_cond_aug: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.is_sr = is_sr
        self.image_size = cfg.image_size
        self.channels = cfg.channels
        self.in_channels = 2 * cfg.channels if is_sr else cfg.channels
        self.emb_dim = 4 * cfg.embed_dim
        self.channels_last = False  # build_unet sets it with model.channels_last
        self.cond_dim = cfg.cond_dim if cond_dim is None else cond_dim
        self.noise_cond_aug = noise_cond_aug
        if noise_cond_aug and not is_sr:
            raise ValueError("noise_cond_aug needs a super-resolution UNet (low-res input)")
        self.cond = Conditioning(
            embed_dim=cfg.embed_dim,
            text_embed_dim=text_embed_dim,
            cond_dim=self.cond_dim,
            pooling=cfg.feature_pooling_type,
            learned_sinu_pos_emb_dim=cfg.learned_sinu_pos_emb_dim,
            use_null_token=cfg.use_null_token,
            noise_cond_aug=noise_cond_aug,
            masked_pooling=cfg.masked_pooling,
            noise_cond_scale=cfg.noise_cond_scale,
        )

    def _attention(self, channels: int) -> AttentionBlock:
        c = self.cfg
        return make_attention(
            c.attention_type,
            channels,
            heads_for(c, channels),
            self.cond_dim,
            stable=c.stable_attention,
            flash=c.flash_attention,
            checkpointing=c.gradient_checkpointing,
            context_norm=c.context_norm,
        )

    def forward(
        self,
        x: Tensor,
        noise_cond: Tensor,
        text_embed: Tensor | None = None,
        text_mask: Tensor | None = None,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), noise_cond (B,) -> prediction (B, C, H, W); see :mod:`imagen.nn`.

        Concatenates the low-res image (SR nets), builds the conditioning, then runs the
        subclass's layers (:meth:`body`).
        """
        if self.is_sr:
            if lowres is None:
                raise ValueError("this is a super-resolution UNet: pass lowres (B, C, h, w)")
            x = torch.cat([x, resize_lowres(lowres, x)], dim=1)  # (B, 2C, H, W)
        elif lowres is not None:
            raise ValueError("lowres was given to a UNet built without low-res conditioning")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if noise_cond.ndim == 0:
            noise_cond = noise_cond.expand(x.shape[0])
        emb, context, mask = self.cond(noise_cond, text_embed, text_mask, aug_level, drop_text)
        return self.body(x, emb, context, mask)

    def body(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """The layers: input (B, in_channels, H, W) and conditioning -> (B, C, H, W)."""
        raise NotImplementedError


def run_block(module: nn.Module, h: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
    """Dispatch on the block kind: ResBlock(h, emb), attention(h, context, mask), or h."""
    if isinstance(module, ResBlock):
        return module(h, emb)
    if isinstance(module, AttentionBlock):
        return module(h, context, mask)
    return module(h)


class UNet(UNetBase):
    """Regular UNet; see the module docstring for the layout."""

    def __init__(
        self,
        cfg: UNetConfig,
        text_embed_dim: int,
        is_sr: bool = False,
        *,
        noise_cond_aug: bool = False,
    ) -> None:
        super().__init__(cfg, text_embed_dim, is_sr, noise_cond_aug=noise_cond_aug)
        e, mult = cfg.embed_dim, cfg.channel_mult
        levels = len(mult)
        blocks = cfg.num_resblocks or [cfg.num_res_blocks] * levels
        attn_levels = {i for i, r in enumerate(cfg.resolutions) if r in cfg.attention_resolutions}
        k = cfg.init_conv_kernel_size

        def res(i: int, o: int, **kw: bool) -> ResBlock:
            return ResBlock(
                i,
                o,
                self.emb_dim,
                dropout=cfg.dropout,
                scale_shift_norm=cfg.scale_shift_norm,
                checkpointing=cfg.gradient_checkpointing,
                **kw,
            )

        ch = e * mult[0]
        self.init_conv = nn.Conv2d(self.in_channels, ch, k, padding=k // 2)
        skip_channels = [ch]
        self.down = nn.ModuleList()  # each entry: one skip-producing step
        for level, m in enumerate(mult):
            for _ in range(blocks[level]):
                step = nn.ModuleList([res(ch, e * m)])
                ch = e * m
                if level in attn_levels:
                    step.append(self._attention(ch))
                self.down.append(step)
                skip_channels.append(ch)
            if level < levels - 1:
                sample = (
                    res(ch, ch, down=True)
                    if cfg.resblock_updown
                    else Downsample(ch, cfg.resample_with_conv)
                )
                self.down.append(nn.ModuleList([sample]))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([res(ch, ch), self._attention(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for j in range(blocks[level] + 1):
                step = nn.ModuleList([res(ch + skip_channels.pop(), e * mult[level])])
                ch = e * mult[level]
                if level in attn_levels:
                    step.append(self._attention(ch))
                if level > 0 and j == blocks[level]:
                    step.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                self.up.append(step)

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.channels, k, padding=k // 2))
        )

    def body(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        h = self.init_conv(x)
        skips = [h]
        for step in self.down:
            for module in step:
                h = run_block(module, h, emb, context, mask)
            skips.append(h)
        for module in self.middle:
            h = run_block(module, h, emb, context, mask)
        for step in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip, H, W)
            for module in step:
                h = run_block(module, h, emb, context, mask)
        return self.out(h)
