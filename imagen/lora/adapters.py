"""LoRA adapters on a stage UNet through ``peft``: the layers they go on, adding and merging.

The adapted layers are every ``nn.Linear`` inside an attention block (query, key/value and
output projections, the feed-forward of a stacked block) and every ``nn.Conv2d`` of the UNet
(the ResBlocks' convolutions and shortcuts, the 1x1 projections, the input and output
convolutions). Each gets ``W + (alpha / r) B A`` with ``B`` zero-initialised, so the adapted
network starts out as the trained one; only ``A`` and ``B`` train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LORA_MARK = "lora_"  # every adapter parameter's name holds it (peft's naming)


def lora_targets(net: nn.Module) -> list[str]:
    """Qualified names of the layers that get adapters (attention projections, convolutions)."""
    from imagen.nn.attention import AttentionBlock

    names: set[str] = set()
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            names.add(name)
        elif isinstance(module, AttentionBlock):
            for sub, layer in module.named_modules():
                if isinstance(layer, nn.Linear):
                    names.add(f"{name}.{sub}")
    if not names:
        raise ValueError("the UNet has no attention or convolution layer to adapt")
    return sorted(names)


def add_lora(net: nn.Module, rank: int, alpha: float | None = None) -> Any:
    """``net`` wrapped in a ``peft`` model with LoRA adapters of ``rank`` on
    :func:`lora_targets`; every other parameter frozen. ``alpha`` defaults to ``rank``."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=lora_targets(net),
        lora_dropout=0.0,
        bias="none",
    )
    return get_peft_model(net, config)


def lora_parameters(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter parameters (the only trainable ones)."""
    return [(n, p) for n, p in model.named_parameters() if LORA_MARK in n]


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped UNet's own weights under their original names (adapters left out)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if LORA_MARK in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = tensor
    return out


def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """The UNet's state dict with the adapters merged into its weights (``W + s B A``), under
    the original names; ``model`` itself keeps its separate adapters."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
