"""The training loss traces whole and never reads the device, for every UNet type.

One training loss forward+backward, as the stage module computes it (text drop, the SR stages'
noise conditioning augmentation, the denoiser's sigma sampling and loss weighting), of tiny
real nets with padded text and ``flash_attention: true``: the base Regular UNet with fused and
with stacked attention, the sr-unet and the Efficient UNet (both with NeMo's ``noise_cond_aug``).
Each runs on two attention paths: SDPA with a static-shape mask (what the CPU runs) and the
flash varlen path, its CUDA kernels replaced by the reference kernel so the CPU runs the packing
code the GPU runs. Checked: no ``aten._local_scalar_dense`` (the op behind .item(), bool(),
int(), float() of a tensor) and ``torch.compile(fullgraph=True)`` of forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads

import imagen.nn.attention as attn
from imagen.config import ConditioningConfig, ModelConfig
from imagen.diffusion.denoiser import build_denoiser
from imagen.diffusion.guidance import drop_mask
from imagen.diffusion.noise_aug import sr_condition
from imagen.nn import build_unet

TEXT_DIM, LENGTH, BATCH = 16, 6, 2
CASES = {  # name: (unet_type, attention_type, noise_cond_aug)
    "base-fused": ("base", "fused", False),
    "base-stacked": ("base", "stacked", False),
    "sr-unet": ("sr-unet", "fused", True),
    "efficient-sr": ("sr", "fused", True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash_attn_func's contract on (B, seq, heads, d), computed by SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def use_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The attention path: SDPA, or the flash path run on the CPU through reference kernels.
    The backend log starts empty, as in a fresh process (its first call is the one traced)."""
    monkeypatch.setattr(attn, "_LOGGED", set())
    if path == "flash-varlen":
        monkeypatch.setattr(attn, "_flash_runs", lambda q: True)
        monkeypatch.setattr(attn, "_flash_attn_func", _dense_flash_reference)
        monkeypatch.setattr(attn, "_flash_attn_varlen_func", attn.varlen_attention_reference)


def model_config(name: str) -> ModelConfig:
    kind, attention_type, aug = CASES[name]
    if kind == "sr":
        u: dict[str, object] = dict(
            channel_mult=[1, 2, 2], num_resblocks=[1, 1, 1], atnn_enabled_at=[0, 1, 1]
        )
    else:
        u = dict(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8])
    u.update(
        embed_dim=16,
        image_size=16,
        per_head_channels=8,
        cond_dim=16,
        attention_type=attention_type,
        flash_attention=True,
    )
    return ModelConfig.model_validate(
        {
            "unet_type": kind,
            "unet": u,
            "conditioning": ConditioningConfig(embed_dim=TEXT_DIM),
            "noise_cond_aug": aug,
        }
    )


def training_loss(name: str) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """(denoiser, loss()) : the stage module's training loss on one fixed padded batch."""
    model = model_config(name)
    den = build_denoiser(model, build_unet(model))
    lengths = torch.tensor([[4], [2]])  # padded text: 4 and 2 valid tokens of 6
    batch = {
        "image": torch.randn(BATCH, 3, 16, 16),
        "text_embed": torch.randn(BATCH, LENGTH, TEXT_DIM),
        "text_mask": torch.arange(LENGTH)[None] < lengths,
        "lowres": torch.randn(BATCH, 3, 8, 8),
    }

    def loss() -> torch.Tensor:
        cond = {
            "text_embed": batch["text_embed"],
            "text_mask": batch["text_mask"],
            "drop_text": drop_mask(BATCH, model.conditioning.drop_rate, device="cpu"),
        }
        if model.is_sr:
            cond.update(sr_condition(batch["lowres"], model, training=True))
        return den.loss(batch["image"], cond)

    return den, loss


@pytest.mark.parametrize("path", ["sdpa", "flash-varlen"])
@pytest.mark.parametrize("name", list(CASES))
def test_training_loss_reads_nothing_from_the_device(
    name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_path(monkeypatch, path)
    den, loss = training_loss(name)
    with HostReads() as reads:
        loss().backward()
    assert reads.count == 0
    assert all(p.grad is not None for p in den.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("name", "path", "backend"),
    [(name, "flash-varlen", "eager") for name in CASES] + [("base-fused", "sdpa", "aot_eager")],
)
def test_training_loss_traces_whole(
    name: str, path: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One graph (fullgraph raises on a break); aot_eager traces the backward too. Every UNet
    type on the flash path (the rest of each net is the same on both paths)."""
    use_path(monkeypatch, path)
    den, loss = training_loss(name)
    torch._dynamo.reset()
    value = torch.compile(loss, fullgraph=True, backend=backend)()
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in den.parameters() if p.grad is not None)
