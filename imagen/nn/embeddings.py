"""Conditioning embeddings: noise level, augmentation level, and text (tokens + pooled vector).

Noise-level scale: the diffusion code passes an order-1 value (EDM: c_noise = ln(sigma)/4;
continuous DDPM: a scaled log-SNR). :data:`NOISE_COND_SCALE` multiplies it by 1000 before the
fixed sinusoidal features, the classic DDPM timestep range: over inputs in [-5, 5] the
lowest frequency (1/10000) turns through one radian and the highest through thousands, so every
feature band resolves the noise level. The noise-augmentation level (in [0, 1]) of the SR
stages uses the same embedding, i.e. it spans the range of a DDPM timestep in [0, 1000].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISE_COND_SCALE = 1000.0


class SinusoidalEmbedding(nn.Module):
    """Fixed sin/cos features of ``scale * x`` (Vaswani et al. 2017; Ho et al. 2020)."""

    def __init__(self, dim: int, scale: float = NOISE_COND_SCALE, max_period: float = 1e4) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.out_dim = 2 * half

    def forward(self, x: Tensor) -> Tensor:
        args = (x.float() * self.scale)[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)


class LearnedSinusoidalEmbedding(nn.Module):
    """[x, sin(2 pi x w), cos(2 pi x w)] with learned frequencies w ~ N(0, 1) (random Fourier
    features, Tancik et al. 2020; used for diffusion time by Kingma et al. 2021 / imagen-pytorch).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"unet.learned_sinu_pos_emb_dim must be even, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2))
        self.out_dim = dim + 1

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()[:, None]  # (B, 1)
        args = 2 * math.pi * x * self.weights[None].float()  # (B, dim/2)
        return torch.cat([x, torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim+1)


def level_embedding(features: int, learned_dim: int, out_dim: int) -> nn.Sequential:
    """Sinusoidal features (fixed when learned_dim == 0) -> Linear -> SiLU -> Linear(out_dim)."""
    pos: nn.Module
    if learned_dim > 0:
        pos = LearnedSinusoidalEmbedding(learned_dim)
    else:
        pos = SinusoidalEmbedding(features)
    return nn.Sequential(
        pos, nn.Linear(pos.out_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
    )


class AttentionPooling(nn.Module):
    """softmax over valid tokens of a learned score w^T e_l, then sum_l a_l e_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        scores = self.score(tokens).squeeze(-1).float()  # (B, L)
        # a finite fill keeps gradients finite; all-masked rows get zero weights (no text)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask  # (B, L)
        return torch.einsum("bl,bld->bd", weights.to(tokens.dtype), tokens)  # (B, D)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens; zero when a sample has none. (B, L, D) -> (B, D)."""
    m = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


class Conditioning(nn.Module):
    """Everything the UNet is conditioned on, mapped to (emb, context, context_mask).

    emb (B, 4E) = MLP(noise level) [+ MLP(augmentation level), SR nets]
                  + MLP(LayerNorm(Linear(pooled text)))
    context (B, L[+1], cond_dim): text tokens projected to cond_dim (keys/values of attention),
    plus a learned null token when ``use_null_token``.

    Classifier-free guidance (``drop_text``): a dropped sample gets no text tokens (its
    embedding is zeroed and masked out, NeMo's zero embedding without leaking the caption
    length); its pooled vector is then zero, or the learned null pooled vector when
    ``use_null_token``. With the null token, every sample can always attend to it.
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
        is_sr: bool,
    ) -> None:
        super().__init__()
        emb_dim = 4 * embed_dim
        self.emb_dim = emb_dim
        self.text_embed_dim = text_embed_dim
        self.pooling = pooling
        self.use_null_token = use_null_token
        self.time_embed = level_embedding(embed_dim, learned_sinu_pos_emb_dim, emb_dim)
        self.aug_embed = (
            level_embedding(embed_dim, learned_sinu_pos_emb_dim, emb_dim) if is_sr else None
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
            self.null_token = nn.Parameter(torch.randn(1, 1, cond_dim) * 0.02)
            self.null_pooled = nn.Parameter(torch.randn(1, cond_dim) * 0.02)

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
            drop_text = drop_text.bool().to(device)
            keep = ~drop_text
            text_embed = text_embed * keep[:, None, None].to(text_embed.dtype)
            text_mask = text_mask & keep[:, None]

        emb = self.time_embed(noise_cond)  # (B, 4E)
        if self.aug_embed is not None:
            if aug_level is None:
                aug_level = torch.zeros(b, device=device)
            emb = emb + self.aug_embed(aug_level)

        context = self.text_to_cond(text_embed)  # (B, L, cond_dim)
        if self.pooling == "attention":
            pooled = self.pool_proj(self.attention_pool(text_embed, text_mask))  # (B, cond_dim)
        else:
            pooled = masked_mean(context, text_mask)  # (B, cond_dim)
        if self.use_null_token:
            # always in the graph (zero gradient when nothing is dropped): DDP-friendly
            drop = drop_text if drop_text is not None else torch.zeros(b, 1, device=device).bool()
            pooled = torch.where(drop.view(b, 1), self.null_pooled.to(pooled.dtype), pooled)
            null = self.null_token.to(context.dtype).expand(b, -1, -1)  # (B, 1, cond_dim)
            context = torch.cat([context, null], dim=1)
            ones = torch.ones(b, 1, dtype=torch.bool, device=device)
            text_mask = torch.cat([text_mask, ones], dim=1)
        emb = emb + self.pooled_to_emb(pooled)
        return emb, context, text_mask


def resize_lowres(lowres: Tensor, like: Tensor) -> Tensor:
    """Bilinear resize of the low-res conditioning image to ``like``'s H, W."""
    if lowres.shape[-2:] != like.shape[-2:]:
        lowres = F.interpolate(lowres, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return lowres.to(like.dtype)
