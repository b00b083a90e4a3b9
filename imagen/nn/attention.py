"""Attention for the UNets: the core masked multi-head attention and the four block types.

Block types (seed, "Attention Blocks"):
    self     multi-head self-attention over the H*W positions
    cross    queries from the image, keys/values from the projected text tokens
    stacked  self-attention, then cross-attention, then a GEGLU feed-forward; zero-init output
    fused    queries from the image; keys/values = [image kv ; normalised text kv], one softmax
             over both (Imagen's base64/SR256 block); text padding is masked
The text context is normalised as NeMo does: GroupNorm(32) over (channel group, all tokens).

Backends of :func:`attention` (the one place attention is computed):
    * flash-attn kernels when ``flash`` is set AND the package imports AND the tensors are on
      CUDA in bf16/fp16; padded keys (text padding) are packed out and the varlen kernel runs
      over the valid tokens only, as NeMo does (:func:`flash_varlen`), with static shapes and
      no host read (no boolean indexing; max_seqlen a Python int);
    * otherwise, with ``stable`` in bf16/fp16 or autocast, NeMo's stable op (below);
    * otherwise ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) with a boolean key
      mask of static shape (B, 1, 1, M).
  No path reads a tensor's value on the host or has a data-dependent shape, so a UNet traces
  as one graph. The backend chosen is logged once per backend (logger
  ``imagen.nn.attention``), outside traced code.
``stable`` (NeMo's ``stable_attention``): in reduced precision (bf16/fp16 inputs or autocast
on) the weights softmax(QK^T/sqrt(d)) are computed as NeMo's ``StableMaskedAttentionOp`` does:
logits in the compute dtype, softmax in fp32, and a backward that divides dW by its largest
magnitude per (sample, head) (at least 1e-4) before the softmax backward and multiplies dQ and
dK back (:class:`StableAttentionWeights`): the exact gradient, kept in range in bf16/fp16. In
fp32 that rescaling changes only the rounding, so fp32 runs SDPA (several times faster on a
CPU). flash-attn kernels already use an fp32 online softmax: with both flags set the flash
path is taken (NeMo refuses the pair).

Keys that are all masked (cross-attention for a caption dropped for classifier-free guidance)
attend to nothing: that sample's attention output is exactly zero, never NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen.nn.layers import group_norm, maybe_checkpoint, zero_module

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

try:  # optional GPU extra: pip install imagen-cascade[gpu]
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the install
    _flash_attn_func = None
    _flash_attn_varlen_func = None


def _log_backend(name: str) -> None:
    """Log the backend the first time it runs eagerly (a log call would break a traced graph)."""
    if name not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(name)
        log.info("attention backend: %s", name)


def pack_order(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Where the valid positions of a padded batch go when packed end to end (varlen layout).

    mask (B, M) bool -> (order (B*M,) int64, cu_seqlens (B+1,) int32): gathering the flattened
    (B*M, ...) positions by ``order`` puts sample b's valid ones, in order, at
    [cu_seqlens[b], cu_seqlens[b+1]) and every padded one after cu_seqlens[B]. One stable sort
    of static size: no boolean indexing, no host read, nothing shaped by the data.
    """
    order = torch.argsort((~mask).flatten().to(torch.uint8), stable=True)
    lens = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = F.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))  # (B+1,)
    return order, cu


def pack(t: Tensor, order: Tensor) -> Tensor:
    """(B, heads, M, d) -> (B*M, heads, d) gathered by a :func:`pack_order` order."""
    b, h, m, d = t.shape
    return t.transpose(1, 2).reshape(b * m, h, d).index_select(0, order)


def full_seqlens(batch: int, length: int, device: torch.device) -> Tensor:
    """cu_seqlens (B+1,) int32 of ``batch`` unpadded sequences of ``length`` each."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


def varlen_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v within each packed sequence: what flash-attn's varlen kernel
    computes, on any device. q (Tq, heads, d), k, v (Tk, heads, d) -> (Tq, heads, d); positions
    past cu[-1] belong to no sequence; a query with no key gives zeros. One masked SDPA over
    every position (a block-diagonal mask from the cu_seqlens): no host read. The max_seqlen
    arguments (flash-attn's signature) are not needed here."""
    nseq = cu_q.numel() - 1

    def seq_id(cu: Tensor, total: int) -> Tensor:  # (total,) sequence of each position
        pos = torch.arange(total, dtype=cu.dtype, device=cu.device)
        return torch.searchsorted(cu[1:].contiguous(), pos, right=True)

    sq, sk = seq_id(cu_q, q.shape[0]), seq_id(cu_k, k.shape[0])
    allowed = (sq[:, None] == sk[None, :]) & (sk < nseq)[None, :]  # (Tq, Tk)
    empty = ~allowed.any(dim=-1)  # (Tq,)
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, T, d)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed | empty[:, None])
    return out[0].transpose(0, 1).masked_fill(empty[:, None, None], 0.0)


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, kernel: Callable) -> Tensor:
    """Masked attention through a varlen kernel (flash-attn's ``flash_attn_varlen_func``).

    q (B, heads, N, d), k, v (B, heads, M, d), key_mask (B, M) -> (B, heads, N, d). The queries
    are all valid (B sequences of N); the valid keys are packed by :func:`pack_order`. Every
    shape is static and max_seqlen is the Python int N (queries) and M (keys: image tokens
    plus token_length, an upper bound of every sample's length); cu_seqlens stay on the device.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    order, cu_k = pack_order(key_mask)
    # the kernels leave the gradient rows past cu_seqlens[-1] unwritten (torch.empty_like):
    # select zeros there so padded keys get an exact zero gradient, never stale memory
    holds_key = (torch.arange(b * m, device=k.device) < cu_k[-1])[:, None, None]
    k_p, v_p = (pack(t, order).where(holds_key, 0.0) for t in (k, v))
    q_p = q.transpose(1, 2).reshape(b * n, h, d)
    cu_q = full_seqlens(b, n, q.device)
    out = kernel(q_p, k_p, v_p, cu_q, cu_k, n, m)  # (B*N, heads, d)
    out = out.view(b, n, h, d).transpose(1, 2)
    empty = ~key_mask.any(dim=-1)  # a sample with no valid key attends to nothing
    return out.masked_fill(empty[:, None, None, None], 0.0)


def _flash(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """flash-attn on (B, heads, N|M, d); with a key mask, the varlen kernel (as NeMo does)."""
    if key_mask is None:
        _log_backend("flash-attn")
        # flash-attn takes (B, seq, heads, d)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    _log_backend("flash-attn-varlen")
    return flash_varlen(q, k, v, key_mask, _flash_attn_varlen_func)


def _flash_runs(q: Tensor) -> bool:
    """flash-attn kernels apply: the package imports and q is on CUDA in bf16/fp16."""
    return _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    *,
    stable: bool = False,
    flash: bool = False,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys where ``key_mask`` is True.

    q: (B, heads, N, d); k, v: (B, heads, M, d); key_mask: (B, M) bool or None.
    Returns (B, heads, N, d) in q's dtype.
    """
    if flash and _flash_runs(q):
        return _flash(q, k, v, key_mask)
    if stable and _reduced_precision(q):
        _log_backend("stable")
        return stable_attention(q, k, v, key_mask)
    _log_backend("sdpa")
    empty = None
    mask = None
    if key_mask is not None:
        empty = ~key_mask.any(dim=-1)  # (B,) samples with no valid key
        # let empty rows attend to every key (finite), then zero their output below
        mask = (key_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, M)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.to(q.dtype)


def _reduced_precision(q: Tensor) -> bool:
    """The product runs in bf16/fp16: such inputs, or autocast on for q's device."""
    return q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(q.device.type)


class StableAttentionWeights(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) over the allowed keys, with NeMo's stable backward.

    Forward (NeMo's ``StableMaskedAttentionOp``): logits q (k / sqrt(d))^T in the compute dtype
    (autocast's, else the inputs'), disallowed keys at -inf, softmax in fp32, a row with no
    allowed key all zero. Backward: s = max |dW| per (sample, head), at least 1e-4;
    dL = softmax_backward(dW / s) in fp32; dQ = dL k s / sqrt(d), dK = dL^T q s / sqrt(d), the
    products in the forward's compute dtype. q (B, heads, N, d), k (B, heads, M, d), allowed
    (B, 1, 1, M) bool or None -> W (B, heads, N, M) fp32.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, allowed: Tensor | None) -> Tensor:
        logits = q @ (k / math.sqrt(k.shape[-1])).transpose(-1, -2)  # (B, heads, N, M)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        w = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)
        ctx.save_for_backward(q, k, w)
        ctx.compute_dtype = logits.dtype
        return w

    @staticmethod
    def backward(ctx: Any, dw: Tensor) -> tuple[Tensor, Tensor, None]:
        q, k, w = ctx.saved_tensors
        dw = dw.float()
        s = dw.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-4)  # (B, heads, 1, 1)
        g = dw / s
        dl = (w * (g - (g * w).sum(dim=-1, keepdim=True))).to(ctx.compute_dtype)
        s = s / math.sqrt(k.shape[-1])
        dt = ctx.compute_dtype
        dq = (dl @ k.to(dt)) * s
        dk = (dl.transpose(-1, -2) @ q.to(dt)) * s
        return dq.to(q.dtype), dk.to(k.dtype), None


def stable_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """NeMo's stable attention: :class:`StableAttentionWeights` times v (in autocast's dtype
    when it is on, else v's), returned in q's dtype. Shapes as :func:`attention`; a sample with
    no valid key gives zeros."""
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    w = StableAttentionWeights.apply(q, k, allowed)  # (B, heads, N, M) fp32
    return (w.to(v.dtype) @ v).to(q.dtype)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def _to_image(t: Tensor, like: Tensor) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) with ``like``'s spatial size."""
    b, c, h, w = like.shape
    return t.transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """Common interface: ``block(x, context, context_mask) -> x + attention(x, ...)``."""

    def __init__(self, *, stable: bool, flash: bool, checkpointing: bool) -> None:
        super().__init__()
        self.stable = stable
        self.flash = flash
        self.checkpointing = checkpointing

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return attention(q, k, v, mask, stable=self.stable, flash=self.flash)

    def _image_queries_text_norm(
        self, channels: int, heads: int, cond_dim: int, context_norm: str
    ) -> None:
        """What every text-attending block has: heads, the image's norm and query projection,
        the text context's norm."""
        self.heads = heads
        self.norm = group_norm(channels)
        self.norm_context = context_norm_layer(context_norm, cond_dim)
        self.q = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        return maybe_checkpoint(self.checkpointing, self._forward, x, context, context_mask)

    def _forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        raise NotImplementedError


class SelfAttention(AttentionBlock):
    """Multi-head self-attention over the image positions."""

    def __init__(self, channels: int, heads: int, **kw: bool) -> None:
        super().__init__(**kw)
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        h = _to_tokens(self.norm(x))  # (B, HW, C)
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        out = _merge_heads(self._attend(q, k, v, None))  # (B, HW, C)
        return x + _to_image(self.proj_out(out), x)


def context_norm_layer(kind: str, cond_dim: int) -> nn.Module:
    """The text-context norm ``unet.context_norm`` names: "group" (NeMo's GroupNorm(32) over
    channel groups and every token position, padding included) or "layer" (per token)."""
    if kind == "group":
        return group_norm(cond_dim)
    if kind == "layer":
        return nn.LayerNorm(cond_dim)
    raise ValueError(f"unet.context_norm: unknown {kind!r}; allowed: group, layer")


def _norm_context(norm: nn.Module, context: Tensor) -> Tensor:
    """Normalise the (B, L, cond_dim) text tokens; GroupNorm sees them as (B, cond_dim, L)."""
    if isinstance(norm, nn.GroupNorm):
        return norm(context.transpose(1, 2)).transpose(1, 2)  # (B, L, cond_dim)
    return norm(context)


class CrossAttention(AttentionBlock):
    """Queries from the image, keys/values from the (GroupNorm-ed) text tokens."""

    def __init__(
        self, channels: int, heads: int, cond_dim: int, context_norm: str = "group", **kw: bool
    ) -> None:
        super().__init__(**kw)
        self._image_queries_text_norm(channels, heads, cond_dim, context_norm)
        self.kv = nn.Linear(cond_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        q = _split_heads(self.q(_to_tokens(self.norm(x))), self.heads)  # (B, heads, HW, d)
        kv = self.kv(_norm_context(self.norm_context, context))  # (B, L, 2C)
        k, v = (_split_heads(t, self.heads) for t in kv.chunk(2, dim=-1))  # (B, heads, L, d)
        out = _merge_heads(self._attend(q, k, v, context_mask))
        return x + _to_image(self.proj_out(out), x)


class FusedAttention(AttentionBlock):
    """One softmax over [image keys ; text keys] (Imagen's combined self/cross attention).

    As NeMo builds it: queries from GroupNorm(x), image keys/values from a second GroupNorm of
    x (``norm_self``), text keys/values from the GroupNorm-ed context.
    """

    def __init__(
        self, channels: int, heads: int, cond_dim: int, context_norm: str = "group", **kw: bool
    ) -> None:
        super().__init__(**kw)
        self._image_queries_text_norm(channels, heads, cond_dim, context_norm)
        self.norm_self = group_norm(channels)
        self.kv_self = nn.Linear(channels, 2 * channels)
        self.kv_context = nn.Linear(cond_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        q = self.q(_to_tokens(self.norm(x)))  # (B, HW, C)
        k_img, v_img = self.kv_self(_to_tokens(self.norm_self(x))).chunk(2, dim=-1)
        kv_txt = self.kv_context(_norm_context(self.norm_context, context))  # (B, L, 2C)
        k_txt, v_txt = kv_txt.chunk(2, dim=-1)  # (B, L, C)
        k = _split_heads(torch.cat([k_img, k_txt], dim=1), self.heads)  # (B, heads, HW+L, d)
        v = _split_heads(torch.cat([v_img, v_txt], dim=1), self.heads)
        img_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)  # (B, HW)
        mask = torch.cat([img_mask, context_mask], dim=1)  # (B, HW+L)
        out = _merge_heads(self._attend(_split_heads(q, self.heads), k, v, mask))
        return x + _to_image(self.proj_out(out), x)


class FeedForward(nn.Module):
    """GroupNorm -> GEGLU (4x inner width) -> Linear, residual (per-position MLP)."""

    def __init__(self, channels: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, 2 * mult * channels)
        self.proj_out = nn.Linear(mult * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = _to_tokens(self.norm(x))  # (B, HW, C)
        a, gate = self.proj_in(h).chunk(2, dim=-1)  # GEGLU: a * GELU(gate)
        return x + _to_image(self.proj_out(a * F.gelu(gate)), x)


class StackedAttention(AttentionBlock):
    """Self-attention, then cross-attention, then feed-forward; zero-initialised output."""

    def __init__(
        self, channels: int, heads: int, cond_dim: int, context_norm: str = "group", **kw: bool
    ) -> None:
        super().__init__(**kw)
        inner = {"stable": kw["stable"], "flash": kw["flash"], "checkpointing": False}
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attn = SelfAttention(channels, heads, **inner)
        self.cross_attn = CrossAttention(channels, heads, cond_dim, context_norm, **inner)
        self.ff = FeedForward(channels)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def _forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        h = self.proj_in(self.norm(x))
        h = self.self_attn(h, context, context_mask)
        h = self.cross_attn(h, context, context_mask)
        h = self.ff(h)
        return x + self.proj_out(h)


def make_attention(
    kind: str,
    channels: int,
    heads: int,
    cond_dim: int,
    *,
    stable: bool,
    flash: bool,
    checkpointing: bool,
    context_norm: str = "group",
) -> AttentionBlock:
    """Build the attention block named by ``unet.attention_type``."""
    kw = {"stable": stable, "flash": flash, "checkpointing": checkpointing}
    if kind == "self":
        return SelfAttention(channels, heads, **kw)
    if kind == "cross":
        return CrossAttention(channels, heads, cond_dim, context_norm, **kw)
    if kind == "stacked":
        return StackedAttention(channels, heads, cond_dim, context_norm, **kw)
    if kind == "fused":
        return FusedAttention(channels, heads, cond_dim, context_norm, **kw)
    raise ValueError(f"unet.attention_type: unknown {kind!r}; allowed: self, cross, stacked, fused")
