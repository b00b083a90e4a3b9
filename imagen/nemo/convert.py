"""NeMo Imagen weights and configs -> this project's UNet (a renaming; no NeMo code is used).

NeMo's UNetModel / EfficientUNetModel and this project's UNet / EfficientUNet compute the same
function with the same parameters under other names: :func:`nemo_to_project` renames a NeMo
UNet state dict (keys as ``model.model.unet.*`` in a MegatronImagen checkpoint, or already
stripped) into the project's, and :func:`load_nemo_weights` loads it into a built net,
checking that every tensor is accounted for and has the right shape. Conv1d(k=1) projections
of NeMo become the project's Linear layers (the same numbers, one dim fewer).

:func:`model_config_from_nemo` turns NeMo's ``model:`` config block into a
:class:`~imagen.config.ModelConfig`, filling NeMo's constructor defaults for absent keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from imagen.config import ModelConfig

# MegatronImagen.model (Imagen) .model (EDMPrecond | ContinousDDPMPrecond) .unet
UNET_PREFIXES: tuple[str, ...] = ("model.model.unet.", "model.unet.", "unet.")

# Inside one block: NeMo's names -> the project's (ResBlock, attention blocks, resampling)
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"^in_layers\.0\.", "norm1."),
    (r"^in_layers\.2\.", "conv1."),
    (r"^emb_layers\.1\.", "emb."),
    (r"^out_layers\.0\.", "norm2."),
    (r"^out_layers\.[23]\.", "conv2."),  # 3 behind the Regular block's dropout, 2 without
    (r"^skip_connection\.", "shortcut."),
    (r"^h_upd\.conv\.", "resample_h.op."),
    (r"^x_upd\.conv\.", "resample_x.op."),
    (r"^conv\.", "op."),  # UpsampleLearnable
    (r"^self_attention_block\.", "self_attn."),
    (r"^cross_attention_block\.", "cross_attn."),
    (r"^ff\.net\.0\.proj\.", "ff.proj_in."),
    (r"^ff\.net\.2\.", "ff.proj_out."),
)

_COND_RULES: tuple[tuple[str, str], ...] = (
    (r"^time_embed\.", "cond.time_embed."),
    (r"^lowres_time_embed\.", "cond.aug_embed."),
    (r"^attention_pooling\.0\.W\.", "cond.attention_pool.score."),
    (r"^attention_pooling\.1\.", "cond.pool_proj.0."),
    (r"^attention_pooling\.2\.", "cond.pool_proj.1."),
    (r"^text_to_cond\.", "cond.text_to_cond."),
    (r"^to_text_non_attn_cond\.", "cond.pooled_to_emb."),
    (r"^null_text_embedding$", "cond.null_token"),
)


class NemoWeightsError(ValueError):
    """NeMo weights that do not fit the net built from their config."""


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _block(rest: str) -> str:
    return _rename(rest, _BLOCK_RULES) or rest


def strip_unet_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's own tensors of a NeMo state dict (prefix ``model.model.unet.`` or shorter;
    torch.compile's ``._orig_mod`` removed). A dict that is already a bare UNet's is kept."""
    state = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): v for k, v in state.items()}
    for prefix in UNET_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return dict(state)


def _efficient_level_layout(keys: list[str]) -> dict[tuple[str, int], tuple[int, bool, bool]]:
    """(DBlocks|UBlocks, level) -> (ResBlocks, has attention, has a resampling conv)."""
    layout: dict[tuple[str, int], list[Any]] = {}
    for k in keys:
        m = re.match(r"^(DBlocks|UBlocks)\.(\d+)\.(blocks\.(\d+)|attention_layer|conv)\.", k)
        if not m:
            continue
        entry = layout.setdefault((m.group(1), int(m.group(2))), [set(), False, False])
        if m.group(4) is not None:
            entry[0].add(int(m.group(4)))
        elif m.group(3) == "attention_layer":
            entry[1] = True
        else:
            entry[2] = True
    return {k: (len(v[0]), v[1], v[2]) for k, v in layout.items()}


def nemo_to_project(state: Mapping[str, torch.Tensor], unet_type: str) -> dict[str, torch.Tensor]:
    """Rename a NeMo UNet state dict to this project's UNet keys (``unet_type`` as NeMo's:
    base, sr-unet or sr). Unknown keys raise :class:`NemoWeightsError`."""
    state = strip_unet_prefix(state)
    out: dict[str, torch.Tensor] = {}
    layout = _efficient_level_layout(list(state)) if unet_type == "sr" else {}
    for key, value in state.items():
        new = _rename(key, _COND_RULES)
        if new is None and unet_type in ("base", "sr-unet"):
            if key.startswith("input_blocks.0.0."):
                continue  # the same tensor as init_conv.0.* (one module, registered twice)
            if key.startswith("init_conv.0."):
                new = "init_conv." + key[len("init_conv.0.") :]
            elif m := re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", key):
                new = f"down.{int(m.group(1)) - 1}.{m.group(2)}.{_block(m.group(3))}"
            elif m := re.match(r"^middle_block\.(\d+)\.(.*)$", key):
                new = f"middle.{m.group(1)}.{_block(m.group(2))}"
            elif m := re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", key):
                new = f"up.{m.group(1)}.{m.group(2)}.{_block(m.group(3))}"
            elif key.startswith("out."):
                new = key
        elif new is None and unet_type == "sr":
            if key.startswith(("init_conv.", "out.")):
                new = key
            elif m := re.match(r"^(DBlocks|UBlocks)\.(\d+)\.(.*)$", key):
                kind, level, rest = m.group(1), int(m.group(2)), m.group(3)
                n, attn, conv = layout[(kind, level)]
                side = "down" if kind == "DBlocks" else "up"
                first = 1 if (kind == "DBlocks" and conv) else 0  # DBlock: conv comes first
                if mb := re.match(r"^blocks\.(\d+)\.(.*)$", rest):
                    new = f"{side}.{level}.{first + int(mb.group(1))}.{_block(mb.group(2))}"
                elif rest.startswith("attention_layer."):
                    new = f"{side}.{level}.{first + n}.{_block(rest[len('attention_layer.') :])}"
                elif rest.startswith("conv."):
                    index = 0 if kind == "DBlocks" else n + int(attn)
                    new = f"{side}.{level}.{index}.{rest}"
        if new is None:
            raise NemoWeightsError(f"NeMo tensor {key!r}: no counterpart in a {unet_type} UNet")
        out[new] = value
    return out


def load_nemo_weights(net: nn.Module, state: Mapping[str, torch.Tensor], unet_type: str) -> None:
    """Copy NeMo UNet weights into ``net`` (built from the same config) in place.

    Raises :class:`NemoWeightsError` naming the first tensor that is missing, left over or of
    another shape.
    """
    renamed = nemo_to_project(state, unet_type)
    own = net.state_dict()
    missing = [k for k in own if k not in renamed]
    extra = [k for k in renamed if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensors missing from the NeMo weights (first {missing[0]!r})"
            )
        if extra:
            parts.append(f"{len(extra)} NeMo tensors the net does not have (first {extra[0]!r})")
        raise NemoWeightsError(
            "the NeMo weights do not fit the net built from their config: " + "; ".join(parts)
        )
    fitted: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = renamed[key]
        if value.ndim == target.ndim + 1 and value.shape[-1] == 1:
            value = value.squeeze(-1)  # Conv1d(k=1) -> Linear
        if value.shape != target.shape:
            raise NemoWeightsError(
                f"tensor {key!r}: NeMo's has shape {tuple(value.shape)}, the net built from the "
                f"config expects {tuple(target.shape)}"
            )
        fitted[key] = value.to(target.dtype)
    net.load_state_dict(fitted, strict=True)


# NeMo's constructor defaults (nets.py), which apply to keys a NeMo config leaves out: the
# keys both UNets share, then each UNet's own.
_NEMO_SHARED_DEFAULTS: dict[str, Any] = {
    "channels": 3,
    "per_head_channels": 64,
    "attention_type": "fused",
    "feature_pooling_type": "attention",
    "learned_sinu_pos_emb_dim": 16,
    "use_null_token": False,
    "init_conv_kernel_size": 3,
    "gradient_checkpointing": False,
    "scale_shift_norm": True,
    "stable_attention": True,
    "flash_attention": False,
}
_NEMO_UNET_DEFAULTS: dict[str, Any] = {
    **_NEMO_SHARED_DEFAULTS,
    "num_res_blocks": 3,
    "channel_mult": [1, 2, 3, 4],
    "num_attn_heads": 4,
    "cond_dim": 512,
    "attention_resolutions": [8, 16, 32],
    "dropout": 0.0,
    "resblock_updown": False,
    "resample_with_conv": True,
}
_NEMO_EFFICIENT_DEFAULTS: dict[str, Any] = {
    **_NEMO_SHARED_DEFAULTS,
    "channel_mult": [1, 1, 2, 4, 8],
    "num_attn_heads": 8,
    "atnn_enabled_at": [0, 0, 0, 0, 1],
    "stride": 2,
    "num_resblocks": [1, 2, 4, 8, 8],
    "skip_connection_scaling": False,
}
_EFFICIENT_KEYS = set(_NEMO_EFFICIENT_DEFAULTS) | {"embed_dim", "image_size"}
_REGULAR_KEYS = set(_NEMO_UNET_DEFAULTS) | {"embed_dim", "image_size"}


def model_config_from_nemo(model: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig computing what NeMo's ``model:`` block (model_config.yaml) builds.

    NeMo's constructor defaults fill absent UNet keys (learned_sinu_pos_emb_dim 16, ...);
    NeMo's preconditioning defaults to DDPM when ``preconditioning_type`` is absent.
    """
    unet_type = model.get("unet_type", "base")
    given = dict(model.get("unet") or {})
    if unet_type == "sr":
        unet = {**_NEMO_EFFICIENT_DEFAULTS, **given}
        unet = {k: v for k, v in unet.items() if k in _EFFICIENT_KEYS}
    else:
        unet = {**_NEMO_UNET_DEFAULTS, **given}
        unet = {k: v for k, v in unet.items() if k in _REGULAR_KEYS}
        if isinstance(unet.get("num_res_blocks"), list | tuple):
            unet["num_resblocks"] = list(unet.pop("num_res_blocks"))
            unet["num_res_blocks"] = max(unet["num_resblocks"])
    if isinstance(unet.get("dropout"), bool):
        # NeMo passes the bool to nn.Dropout: False is p = 0; True (p = 1) would zero every
        # activation, a NeMo bug this project does not copy
        if unet["dropout"]:
            raise NemoWeightsError("unet.dropout: True means p = 1 in NeMo (every unit dropped)")
        unet["dropout"] = 0.0
    unet["flash_attention"] = False  # a kernel choice, not part of the function computed
    cond = dict(model.get("conditioning") or {})
    conditioning = {k: cond[k] for k in ("embed_dim", "token_length", "drop_rate") if k in cond}
    kind = model.get("preconditioning_type", "DDPM")
    pre = dict(model.get("preconditioning") or {})
    return ModelConfig.model_validate(
        {
            "unet_type": unet_type,
            "unet": unet,
            "conditioning": conditioning,
            "preconditioning_type": kind,
            "preconditioning": pre,
            "noise_cond_aug": bool(model.get("noise_cond_aug", False)),
        }
    )
