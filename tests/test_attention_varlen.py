"""Varlen packing for flash attention: packing the valid keys computes the masked attention.

flash-attn's varlen kernels take the valid tokens of a padded batch packed end to end (NeMo's
way with padded text); on the CPU the same packing runs through the reference kernel and must
equal the masked attention the SDPA path computes.
"""

from __future__ import annotations

import torch

from imagen.nn.attention import attention, pack_valid, unpack, varlen_attention_reference


def test_pack_valid_keeps_each_samples_valid_tokens_in_order() -> None:
    t = torch.arange(2 * 1 * 4 * 1, dtype=torch.float32).view(2, 1, 4, 1)  # (B, heads, M, d)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    packed, cu, max_len = pack_valid(t, mask)
    assert packed.shape == (5, 1, 1)
    assert packed.flatten().tolist() == [0.0, 1.0, 4.0, 6.0, 7.0]
    assert cu.tolist() == [0, 2, 5] and cu.dtype == torch.int32 and max_len == 3
    full = torch.ones(2, 4, dtype=torch.bool)
    p, cu_full, _ = pack_valid(t, full)
    torch.testing.assert_close(unpack(p, cu_full, 4), t)


def test_varlen_packing_equals_masked_attention() -> None:
    g = torch.Generator().manual_seed(0)
    b, heads, n, m, d = 4, 2, 10, 16, 8
    q, k, v = (torch.randn(b, heads, s, d, generator=g) for s in (n, m, m))
    lengths = torch.tensor([16, 11, 9, 0])  # fused-style image keys plus padded text; one empty
    key_mask = torch.arange(m)[None] < lengths[:, None]
    key_mask[1, 3] = False  # a hole, not only right padding
    masked = attention(q, k, v, key_mask)  # the SDPA path
    full = torch.ones(b, n, dtype=torch.bool)
    q_p, cu_q, _ = pack_valid(q, full)
    k_p, cu_k, _ = pack_valid(k, key_mask)
    v_p, _, _ = pack_valid(v, key_mask)
    out = unpack(varlen_attention_reference(q_p, k_p, v_p, cu_q, cu_k), cu_q, n)
    torch.testing.assert_close(out, masked, atol=1e-6, rtol=1e-5)
    assert out[3].abs().max() == 0  # no valid key: zero output, as the masked path gives
