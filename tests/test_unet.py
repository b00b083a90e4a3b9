"""The UNets on tiny real configurations: shapes, masking, guidance, checkpointing, training."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from imagen.config import ConditioningConfig, ModelConfig
from imagen.nn import EfficientUNet, UNet, build_unet, count_parameters
from imagen.nn.attention import attention

TEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


ATTENTION = ["self", "cross", "stacked", "fused"]
POOLING = ["attention", "mean"]
KINDS = ["base", "sr-unet", "sr"]


def tiny_model(
    kind: str = "base", channels_last: bool = False, noise_cond_aug: bool = False, **unet: object
) -> ModelConfig:
    """A real ModelConfig shrunk to a few thousand parameters at 16x16."""
    if kind == "sr":
        u: dict[str, object] = dict(
            embed_dim=16,
            image_size=16,
            channel_mult=[1, 2, 2],
            num_resblocks=[1, 1, 1],
            atnn_enabled_at=[0, 1, 1],
        )
    else:
        u = dict(
            embed_dim=16,
            image_size=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[8],
        )
    u.update(per_head_channels=8, cond_dim=16, **unet)
    return ModelConfig.model_validate(
        {
            "unet_type": kind,
            "unet": u,
            "conditioning": ConditioningConfig(embed_dim=TEXT_DIM),
            "channels_last": channels_last,
            "noise_cond_aug": noise_cond_aug,
        }
    )


def build(kind: str = "base", noise_cond_aug: bool = False, **unet: object) -> torch.nn.Module:
    """A tiny UNet whose zero-initialised layers are perturbed, so every path is live."""
    net = build_unet(tiny_model(kind, noise_cond_aug=noise_cond_aug, **unet))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(kind: str, b: int = 2, size: int = 16, length: int = 6) -> dict[str, torch.Tensor]:
    kw = {
        "x": torch.randn(b, 3, size, size),
        "noise_cond": torch.randn(b),
        "text_embed": torch.randn(b, length, TEXT_DIM),
        "text_mask": torch.ones(b, length, dtype=torch.bool),
    }
    if kind != "base":
        kw["lowres"] = torch.randn(b, 3, size // 4, size // 4)
        kw["aug_level"] = torch.rand(b)
    return kw


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention_type", ATTENTION)
@pytest.mark.parametrize("pooling", POOLING)
def test_output_shape_every_attention_and_pooling(kind, attention_type, pooling):
    net = build(kind, attention_type=attention_type, feature_pooling_type=pooling)
    assert net.is_sr == (kind != "base")
    assert net.image_size == 16
    out = net(**inputs(kind))
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_unet_types_build_the_right_net():
    assert isinstance(build("base"), UNet) and not build("base").is_sr
    assert isinstance(build("sr-unet"), UNet) and build("sr-unet").is_sr
    assert isinstance(build("sr"), EfficientUNet)


@pytest.mark.parametrize("kind", ["sr-unet", "sr"])
def test_sr_nets_are_fully_convolutional_and_need_lowres(kind):
    net = build(kind)  # trained on 16x16 crops
    kw = inputs(kind, size=32)  # sampled at 32x32 with an 8x8 low-res image
    assert net(**kw).shape == (2, 3, 32, 32)
    kw.pop("lowres")
    with pytest.raises(ValueError, match="lowres"):
        net(**kw)


def test_lowres_and_aug_level_change_the_output():
    net = build("sr", noise_cond_aug=True).eval()
    kw = inputs("sr")
    ref = net(**kw)
    assert not torch.allclose(ref, net(**{**kw, "lowres": kw["lowres"] + 1.0}), atol=1e-4)
    assert not torch.allclose(ref, net(**{**kw, "aug_level": kw["aug_level"] + 0.3}), atol=1e-4)


@pytest.mark.parametrize("kind", ["base", "sr"])
@pytest.mark.parametrize("attention_type", ATTENTION)
@pytest.mark.parametrize("pooling", POOLING)
def test_padding_is_masked(kind, attention_type, pooling):
    """With masked_pooling and context_norm layer (departures from NeMo, whose pooling and
    GroupNorm see the padding): one caption padded to 5 and to 11 tokens -> same output."""
    net = build(
        kind,
        attention_type=attention_type,
        feature_pooling_type=pooling,
        masked_pooling=True,
        context_norm="layer",
    ).eval()
    kw = inputs(kind, b=1, length=5)
    kw["text_mask"][:, 4:] = False  # 4 real tokens
    long_embed = torch.randn(1, 11, TEXT_DIM) * 3.0
    long_embed[:, :4] = kw["text_embed"][:, :4]
    long_mask = torch.zeros(1, 11, dtype=torch.bool)
    long_mask[:, :4] = True
    with torch.no_grad():
        short = net(**kw)
        long = net(**{**kw, "text_embed": long_embed, "text_mask": long_mask})
    torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-5)


def test_padding_length_matters_by_default_as_in_nemo():
    """NeMo pools over, and GroupNorms across, every token position: more padding, other output."""
    net = build("base", attention_type="fused").eval()
    kw = inputs("base", b=1, length=5)
    kw["text_mask"][:, 4:] = False
    kw["text_embed"][:, 4:] = 0.0
    longer = torch.zeros(1, 11, TEXT_DIM)
    longer[:, :5] = kw["text_embed"]
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        short = net(**kw)
        long = net(**{**kw, "text_embed": longer, "text_mask": mask})
    assert (short - long).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    plain = build(kind, attention_type="stacked").train()
    ckpt = build_unet(tiny_model(kind, attention_type="stacked", gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    kw = inputs(kind)
    plain(**kw).square().mean().backward()
    ckpt(**kw).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def _reference_attention(q, k, v, key_mask):
    """softmax(QK^T / sqrt(d)) V written out, with masked keys at -inf."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, M)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("stable", [False, True])
def test_sdpa_path_equals_math_attention(stable):
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)  # (B, heads, N, d) each, M = N = 10
    k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)  # M = 7
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = attention(q, k, v, mask, stable=stable)
    torch.testing.assert_close(out, _reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v), _reference_attention(q, k, v, None))


def test_attention_with_no_valid_key_is_zero_not_nan():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    mask = torch.tensor([[False] * 3, [True, True, False]])
    q.requires_grad_(True)
    out = attention(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], _reference_attention(q[1:], k[1:], v[1:], mask[1:]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_flash_request_on_cpu_falls_back_to_sdpa_and_logs_once(caplog):
    import imagen.nn.attention as attn_mod

    attn_mod._LOGGED.clear()
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    with caplog.at_level(logging.INFO, logger="imagen.nn.attention"):
        a = attention(q, k, v, flash=True)
        attention(q, k, v, flash=True)
    torch.testing.assert_close(a, _reference_attention(q, k, v, None))
    backend_lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert backend_lines == ["attention backend: sdpa"]


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_channels_last_gives_the_same_output(kind):
    plain = build(kind).eval()
    cl = build_unet(tiny_model(kind, channels_last=True)).eval()
    cl.load_state_dict(plain.state_dict())
    assert cl.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    kw = inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(cl(**kw), plain(**kw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["base", "sr"])
@pytest.mark.parametrize("attention_type", ["cross", "fused"])
def test_drop_text_is_finite_and_differs_from_conditioned(kind, attention_type):
    net = build(kind, attention_type=attention_type)
    kw = inputs(kind)
    cond = net(**kw)
    dropped = net(**kw, drop_text=torch.tensor([True, False]))
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped[0], cond[0], atol=1e-4)
    torch.testing.assert_close(dropped[1], cond[1])
    # the null condition does not depend on the caption that was dropped
    other = net(
        **{**kw, "text_embed": torch.randn_like(kw["text_embed"])},
        drop_text=torch.ones(2, dtype=torch.bool),
    )
    torch.testing.assert_close(other[0], dropped[0])
    other.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_no_text_at_all_runs():
    net = build("base", attention_type="cross")
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("attention_type", ["cross", "fused"])
def test_use_null_token(attention_type):
    net = build("base", attention_type=attention_type, use_null_token=True)
    kw = inputs("base")
    drop = torch.tensor([True, False])
    out = net(**kw, drop_text=drop)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], net(**kw)[0], atol=1e-4)
    out.square().mean().backward()
    assert net.cond.null_token.grad.abs().sum() > 0


def test_learned_sinusoidal_time_embedding():
    net = build("sr", noise_cond_aug=True, learned_sinu_pos_emb_dim=16)
    out = net(**inputs("sr"))
    assert out.shape == (2, 3, 16, 16)
    out.square().mean().backward()
    assert net.cond.time_embed[0].weights.grad.abs().sum() > 0
    assert net.cond.aug_embed[0].weights.grad.abs().sum() > 0


def test_noise_level_changes_the_output_over_its_range():
    net = build("base").eval()
    kw = inputs("base", b=1)
    with torch.no_grad():
        outs = [net(**{**kw, "noise_cond": torch.tensor([c])}) for c in (-5.0, -1.0, 0.0, 1.0)]
    for a, b in zip(outs, outs[1:], strict=False):
        assert (a - b).abs().max() > 1e-3


def test_tiny_unet_overfits_one_batch():
    """Predict x0 from x0 + sigma * noise at fixed sigmas: the loss falls at least tenfold."""
    torch.manual_seed(0)
    net = build_unet(tiny_model("base", attention_type="fused"))
    n = 4
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x0 = torch.stack(
        [torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy - i), xx * yy]) for i in range(n)]
    )  # (4, 3, 16, 16)
    sigma = torch.tensor([0.1, 0.3, 0.6, 1.0])
    noise = torch.randn_like(x0)
    text = torch.randn(n, 6, TEXT_DIM)
    xn = (x0 + sigma[:, None, None, None] * noise) / torch.sqrt(1 + sigma[:, None, None, None] ** 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(net(xn, sigma.log() / 4, text), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_count_parameters_counts_every_parameter():
    net = build("base")
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 1000


def test_noise_cond_scale_multiplies_the_noise_level_before_its_features():
    """unet.noise_cond_scale (a departure, off = 1 as in NeMo): the net with scale 1000 is the
    default net fed 1000 x the noise level."""
    scaled = build("base", noise_cond_scale=1000.0).eval()
    plain = build_unet(tiny_model("base")).eval()
    plain.load_state_dict(scaled.state_dict())
    kw = inputs("base")
    with torch.no_grad():
        torch.testing.assert_close(
            scaled(**kw), plain(**{**kw, "noise_cond": kw["noise_cond"] * 1000.0})
        )
        assert not torch.allclose(scaled(**kw), plain(**kw), atol=1e-4)
