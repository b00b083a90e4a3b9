"""Varlen packing for flash attention: packing the valid keys computes the masked attention.

flash-attn's varlen kernels take the valid tokens of a padded batch packed end to end (NeMo's
way with padded text). :func:`flash_varlen` packs them with static shapes (one stable sort and
index gathers, max_seqlen a Python int); on the CPU it runs through the reference kernel and
must equal the masked attention the SDPA path computes, in value and gradient, without host
reads or graph breaks. A ``gpu`` test runs the real kernel where flash-attn is installed.
"""

from __future__ import annotations

import pytest
import torch
from host_reads import HostReads

from imagen.nn.attention import (
    attention,
    flash_varlen,
    pack,
    pack_order,
    varlen_attention_reference,
)


def _qkv_mask(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    b, heads, n, m, d = 4, 2, 10, 16, 8
    q, k, v = (
        torch.randn(b, heads, s, d, generator=g).requires_grad_(requires_grad) for s in (n, m, m)
    )
    lengths = torch.tensor([16, 11, 9, 0])  # fused-style image keys plus padded text; one empty
    key_mask = torch.arange(m)[None] < lengths[:, None]
    key_mask[1, 3] = False  # a hole, not only right padding
    return q, k, v, key_mask


def test_pack_order_keeps_each_samples_valid_tokens_in_order() -> None:
    t = torch.arange(2 * 1 * 4 * 1, dtype=torch.float32).view(2, 1, 4, 1)  # (B, heads, M, d)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    order, cu = pack_order(mask)
    packed = pack(t, order)
    assert packed.shape == (8, 1, 1)  # static: B*M, whatever the mask
    assert packed.flatten().tolist()[:5] == [0.0, 1.0, 4.0, 6.0, 7.0]  # the valid, end to end
    assert sorted(packed.flatten().tolist()[5:]) == [2.0, 3.0, 5.0]  # the padding, after
    assert cu.tolist() == [0, 2, 5] and cu.dtype == torch.int32


def test_varlen_packing_equals_masked_attention() -> None:
    q, k, v, key_mask = _qkv_mask(requires_grad=True)
    masked = attention(q, k, v, key_mask)  # the SDPA path
    grads = torch.autograd.grad(masked.square().sum(), (q, k, v))
    with HostReads() as reads:
        out = flash_varlen(q, k, v, key_mask, varlen_attention_reference)
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert reads.count == 0
    torch.testing.assert_close(out, masked, atol=1e-6, rtol=1e-5)
    assert out[3].abs().max() == 0  # no valid key: zero output, as the masked path gives
    for a, b in zip(got, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _UnwrittenTail(torch.autograd.Function):
    """The reference kernel with flash-attn's backward contract: dk and dv rows past
    cu_seqlens_k[-1] are left unwritten (here: NaN)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k):
        ctx.save_for_backward(q, k, v, cu_q, cu_k)
        return varlen_attention_reference(q, k, v, cu_q, cu_k)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            out = varlen_attention_reference(*leaves, cu_q, cu_k)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad)
        tail = (torch.arange(k.shape[0]) >= cu_k[-1])[:, None, None]
        return (
            dq,
            dk.masked_fill(tail, float("nan")),
            dv.masked_fill(tail, float("nan")),
            None,
            None,
        )


def test_padded_keys_get_zero_gradient_whatever_the_kernel_leaves() -> None:
    q, k, v, key_mask = _qkv_mask(requires_grad=True)
    masked = attention(q, k, v, key_mask)
    grads = torch.autograd.grad(masked.square().sum(), (q, k, v))

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        return _UnwrittenTail.apply(q, k, v, cu_q, cu_k)

    out = flash_varlen(q, k, v, key_mask, kernel)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(got, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # finite, padded keys exactly 0
    assert got[1][~key_mask[:, None, :, None].expand_as(k)].abs().max() == 0


def test_varlen_path_traces_whole() -> None:
    q, k, v, key_mask = _qkv_mask()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        return flash_varlen(q, k, v, mask, varlen_attention_reference)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(q, k, v, key_mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.gpu
def test_flash_attn_varlen_kernel_equals_masked_attention() -> None:
    """The real kernel in bf16 against fp32 SDPA: values and gradients, padded keys exactly 0."""
    flash_attn = pytest.importorskip("flash_attn")
    q, k, v, key_mask = (t.cuda() for t in _qkv_mask())
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_leaves, key_mask)  # fp32 SDPA
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    lo = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = flash_varlen(*lo, key_mask, flash_attn.flash_attn_varlen_func)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), lo)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.float() - b).abs().max() < 0.03 * b.abs().max()
    assert grads[1][~key_mask[:, None, :, None].expand_as(k)].abs().max() == 0
