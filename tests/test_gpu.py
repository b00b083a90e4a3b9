"""On a CUDA device: the small base UNet in bf16 autocast with flash attention agrees with fp32.

Marked ``gpu``: skipped with the reason on a machine without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from imagen.config import ConditioningConfig, ModelConfig
from imagen.nn import build_unet
from imagen.presets import PRESETS

pytestmark = pytest.mark.gpu


def test_bf16_flash_unet_on_cuda_matches_fp32() -> None:
    unet = dict(PRESETS["small_res_64"]["unet"], flash_attention=True)
    cfg = ModelConfig.model_validate(
        {"unet_type": "base", "unet": unet, "conditioning": ConditioningConfig(embed_dim=32)}
    )
    torch.manual_seed(0)
    net = build_unet(cfg).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    t = torch.tensor([0.1, -0.5], device="cuda")
    text = torch.randn(2, 12, 32, device="cuda")
    mask = torch.arange(12, device="cuda")[None] < torch.tensor([[12], [5]], device="cuda")
    with torch.no_grad():
        ref = net(x, t, text_embed=text, text_mask=mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net(x, t, text_embed=text, text_mask=mask)
    assert torch.isfinite(low).all()
    err = (low.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() + 1e-2, err
