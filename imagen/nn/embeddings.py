"""Conditioning embeddings: noise level, augmentation level, and text (tokens + pooled vector).

As NeMo's Imagen computes them (nemo_toolkit 2.4.0, the reference implementation):

* the noise level the diffusion code passes (EDM: c_noise = ln(sigma)/4; continuous DDPM: the
  log-SNR) goes raw into fixed [cos, sin] features with periods up to 10^4, then an MLP;
  ``noise_cond_scale`` (default 1, NeMo's) multiplies it first: 1000 spreads an order-1 input
  over every feature band, the classic DDPM timestep range (a departure kept as an option);
* the SR nets' noise-augmentation level (``aug_level``) has its own embedding of the same form,
  present only when ``noise_cond_aug`` is on (NeMo's ``lowres_time_embed``);
* text: tokens projected to cond_dim (keys/values of attention); a pooled vector (attention or
  mean pooling over every token position, padding included, as NeMo does; ``masked_pooling``
  pools over the valid tokens only) -> LayerNorm -> MLP, added to the time embedding;
* classifier-free guidance's null text is NeMo's: a zero text embedding, mask unchanged;
* ``use_null_token``: a learned token ~ N(0, 1) appended to every sample's context, always valid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Fixed [cos, sin] features of ``scale * x`` (Vaswani et al. 2017; Ho et al. 2020)."""

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 1e4) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        args = (x.float() * self.scale)[:, None] * self.freqs[None]  # (B, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
        if self.out_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
        return emb


class LearnedSinusoidalEmbedding(nn.Module):
    """[x, sin(2 pi x w), cos(2 pi x w)] with learned frequencies w ~ N(0, 1) (random Fourier
    features, Tancik et al. 2020; used for diffusion time by Kingma et al. 2021)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"unet.learned_sinu_pos_emb_dim must be even, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2))
        self.out_dim = dim + 1

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, None]  # (B, 1)
        args = x * self.weights[None] * 2 * math.pi  # (B, dim/2)
        return torch.cat([x, torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim+1)


def level_embedding(features: int, learned_dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """Sinusoidal features (fixed when learned_dim == 0) -> Linear -> SiLU -> Linear(out_dim)."""
    pos: nn.Module
    if learned_dim > 0:
        pos = LearnedSinusoidalEmbedding(learned_dim)
    else:
        pos = SinusoidalEmbedding(features, scale=scale)
    return nn.Sequential(
        pos, nn.Linear(pos.out_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
    )


class AttentionPooling(nn.Module):
    """softmax over tokens of a learned score w^T e_l, then sum_l a_l e_l (Safari et al. 2020,
    self-attention pooling). With a mask only the valid tokens are pooled."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        scores = self.score(tokens).squeeze(-1)  # (B, L)
        if mask is None:
            weights = torch.softmax(scores, dim=1)
        else:
            # a finite fill keeps gradients finite; all-masked rows get zero weights (no text)
            scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
            weights = (torch.softmax(scores, dim=-1) * mask).to(tokens.dtype)
        return (tokens * weights[..., None]).sum(dim=1)  # (B, D)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens; zero when a sample has none. (B, L, D) -> (B, D)."""
    m = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


class Conditioning(nn.Module):
    """Everything the UNet is conditioned on, mapped to (emb, context, context_mask).

    emb (B, 4E) = MLP(noise level) [+ MLP(augmentation level), with noise_cond_aug]
                  + MLP(LayerNorm(pooled text))
    context (B, L[+1], cond_dim): text tokens projected to cond_dim, plus the learned null
    token when ``use_null_token``; context_mask (B, L[+1]) bool.

    Classifier-free guidance (``drop_text``): a dropped sample's text embedding is zeroed and
    its mask kept (NeMo's null condition).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        text_embed_dim: int,
        cond_dim: int,
        pooling: str,
        learned_sinu_pos_emb_dim: int,
        use_null_token: bool,
        noise_cond_aug: bool,
        masked_pooling: bool = False,
        noise_cond_scale: float = 1.0,
    ) -> None:
        super().__init__()
        emb_dim = 4 * embed_dim
        self.emb_dim = emb_dim
        self.text_embed_dim = text_embed_dim
        self.pooling = pooling
        self.masked_pooling = masked_pooling
        self.use_null_token = use_null_token
        lsd = learned_sinu_pos_emb_dim
        self.time_embed = level_embedding(embed_dim, lsd, emb_dim, noise_cond_scale)
        self.aug_embed = (
            level_embedding(embed_dim, lsd, emb_dim, noise_cond_scale) if noise_cond_aug else None
        )
        self.text_to_cond = nn.Linear(text_embed_dim, cond_dim)
        if pooling == "attention":
            self.attention_pool = AttentionPooling(text_embed_dim)
            self.pool_proj = nn.Sequential(
                nn.LayerNorm(text_embed_dim), nn.Linear(text_embed_dim, cond_dim)
            )
        elif pooling != "mean":
            raise ValueError(
                f"unet.feature_pooling_type: unknown {pooling!r}; allowed: attention, mean"
            )
        self.pooled_to_emb = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        if use_null_token:
            self.null_token = nn.Parameter(torch.randn(1, 1, cond_dim))

    def forward(
        self,
        noise_cond: Tensor,
        text_embed: Tensor | None,
        text_mask: Tensor | None,
        aug_level: Tensor | None,
        drop_text: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, device = noise_cond.shape[0], noise_cond.device
        dtype = self.text_to_cond.weight.dtype
        if text_embed is None:  # unconditional: one empty token per sample
            text_embed = torch.zeros(b, 1, self.text_embed_dim, device=device, dtype=dtype)
            text_mask = torch.zeros(b, 1, dtype=torch.bool, device=device)
        elif text_mask is None:
            text_mask = torch.ones(text_embed.shape[:2], dtype=torch.bool, device=device)
        text_mask = text_mask.bool()
        if drop_text is not None:
            keep = ~drop_text.bool().to(device)
            text_embed = text_embed * keep[:, None, None].to(text_embed.dtype)

        emb = self.time_embed(noise_cond)  # (B, 4E)
        if self.aug_embed is not None:
            if aug_level is None:
                raise ValueError("this UNet was built with noise_cond_aug: pass aug_level (B,)")
            emb = emb + self.aug_embed(aug_level)

        context = self.text_to_cond(text_embed)  # (B, L, cond_dim)
        pool_mask = text_mask if self.masked_pooling else None
        if self.pooling == "attention":
            pooled = self.attention_pool(text_embed, pool_mask)  # (B, D)
            pooled = self.pool_proj(pooled)  # (B, cond_dim)
        elif pool_mask is not None:
            pooled = masked_mean(context, pool_mask)  # (B, cond_dim)
        else:
            pooled = context.mean(dim=1)  # (B, cond_dim)
        if self.use_null_token:
            null = self.null_token.to(context.dtype).expand(b, -1, -1)  # (B, 1, cond_dim)
            context = torch.cat([context, null], dim=1)
            ones = torch.ones(b, 1, dtype=torch.bool, device=device)
            text_mask = torch.cat([text_mask, ones], dim=1)
        emb = emb + self.pooled_to_emb(pooled)
        return emb, context, text_mask


def resize_lowres(lowres: Tensor, like: Tensor) -> Tensor:
    """Bicubic resize of the low-res conditioning image to ``like``'s H, W (as NeMo does)."""
    if lowres.shape[-2:] != like.shape[-2:]:
        lowres = F.interpolate(lowres, size=like.shape[-2:], mode="bicubic")
    return lowres.to(like.dtype)
