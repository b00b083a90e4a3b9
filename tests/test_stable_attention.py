"""``stable_attention`` computes NeMo's stable attention (nemo_toolkit 2.4.0 as the oracle).

NeMo's ``QKVStableMaskedAttention`` / ``QKVStableAttention`` compute the softmax weights with
a custom backward that divides dW by its largest magnitude per (sample, head) and multiplies
dQ, dK back. The project's :class:`StableAttentionWeights` is that op; it runs in reduced
precision (bf16/fp16 or autocast), and fp32 runs SDPA, whose gradient is the same in exact
arithmetic. Both are compared with NeMo's modules: outputs and the gradients of q, k and v.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import nemo_oracle
import pytest
import torch
from host_reads import HostReads

import imagen.nn.attention as attn
from imagen.nn.attention import attention, stable_attention

try:
    nemo_oracle.load()
    with warnings.catch_warnings():  # NeMo's torch.cuda.amp.custom_fwd is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        NEMO_ATTN = importlib.import_module(
            "nemo.collections.multimodal.modules.imagen.diffusionmodules.attention"
        )
except ImportError as e:  # pragma: no cover - depends on the install
    pytest.skip(f"NeMo oracle unavailable ({e})", allow_module_level=True)

B, HEADS, N, M, D = 3, 2, 10, 14, 8


def _inputs(masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Masked: cross/fused-style keys (M) with padding, a hole and an empty sample; else
    self-attention (M = N, NeMo's unmasked op)."""
    g = torch.Generator().manual_seed(0)
    m = M if masked else N
    q, k, v = (torch.randn(B, HEADS, s, D, generator=g) for s in (N, m, m))
    if not masked:
        return q, k, v, None
    key_mask = torch.arange(M)[None] < torch.tensor([[14], [9], [0]])  # one sample has no key
    key_mask[0, 4] = False
    return q, k, v, key_mask


def _to_nemo(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> NeMo's (B, heads*d, T), head-major channels."""
    b, h, n, d = t.shape
    return t.permute(0, 1, 3, 2).reshape(b, h * d, n).contiguous()


def _nemo(q, k, v, key_mask) -> torch.Tensor:
    """NeMo's stable attention module on our layout -> (B, heads, N, d)."""
    if key_mask is None:
        qkv = torch.cat([_to_nemo(q), _to_nemo(k), _to_nemo(v)], dim=1)
        out, _ = NEMO_ATTN.QKVStableAttention(HEADS)(qkv)
    else:
        mask = key_mask[:, None, :].expand(B, N, M)  # (B, N, M), True = attend
        out, _ = NEMO_ATTN.QKVStableMaskedAttention(HEADS)(
            _to_nemo(q), _to_nemo(k), _to_nemo(v), mask
        )
    return out.view(B, HEADS, D, N).permute(0, 1, 3, 2)


def _value_and_grads(fn, q, k, v, key_mask, autocast: bool = False):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves, key_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out.float(), leaves, grad_out)
    return out.float(), grads


def _stable(q, k, v, key_mask):
    return attention(q, k, v, key_mask, stable=True)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("ours", [_stable, stable_attention], ids=["attention", "stable_op"])
def test_fp32_stable_attention_equals_nemos(masked: bool, ours) -> None:
    """fp32: ``attention(stable=True)`` (SDPA) and the stable op itself both give NeMo's output
    and NeMo's rescaled gradients."""
    q, k, v, key_mask = _inputs(masked)
    ref, ref_grads = _value_and_grads(_nemo, q, k, v, key_mask)
    got, got_grads = _value_and_grads(ours, q, k, v, key_mask)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if masked:
        assert got[2].abs().max() == 0  # no valid key: zero, as NeMo's nan_to_num gives


@pytest.mark.parametrize("masked", [True, False])
def test_bf16_stable_attention_is_nemos_op(masked: bool, caplog: pytest.LogCaptureFixture) -> None:
    """bf16: the stable op runs (no fp32 cast) and agrees with NeMo's within bf16 round-off
    (NeMo's softmax is bf16 on a CPU, ours fp32 as NeMo's is under CUDA autocast); fp32 inputs
    under bf16 autocast run it too (not SDPA in fp32)."""
    q, k, v, key_mask = _inputs(masked)
    lo = [t.bfloat16() for t in (q, k, v)]
    ref, ref_grads = _value_and_grads(_nemo, *lo, key_mask)
    got, got_grads = _value_and_grads(_stable, *lo, key_mask)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max() < 0.03 * b.float().abs().max()
    attn._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="imagen.nn.attention"):
        auto, auto_grads = _value_and_grads(_stable, q, k, v, key_mask, autocast=True)
    assert [r.getMessage() for r in caplog.records] == ["attention backend: stable"]
    assert (auto - ref).abs().max() < 0.02 * ref.abs().max()
    for a, b in zip(auto_grads, ref_grads, strict=True):
        assert (a - b.float()).abs().max() < 0.03 * b.float().abs().max()


def test_stable_op_traces_whole_under_autocast() -> None:
    """No host read; forward and the custom backward trace whole and give the eager grads."""
    q, k, v, key_mask = _inputs(masked=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fn(q, k, v, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attention(q, k, v, mask, stable=True).float().square().sum()

    with HostReads() as reads:
        fn(*leaves, key_mask).backward()
    assert reads.count == 0
    eager = [t.grad for t in leaves]
    leaves = [t.clone().detach().requires_grad_() for t in (q, k, v)]
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves, key_mask).backward()
    for a, b in zip((t.grad for t in leaves), eager, strict=True):
        torch.testing.assert_close(a, b)
