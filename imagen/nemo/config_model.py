"""NeMo's ``model:`` UNet, preconditioning and noise augmentation -> one stage's params keys.

Every key of ``model.unet`` is checked against NeMo's UNet (Regular for ``base`` / ``sr-unet``,
Efficient for ``sr``) and its type; the block is then read as NeMo builds it, constructor
defaults included (:func:`imagen.nemo.convert.model_config_from_nemo`), and written key for
key, so a preset of params.yaml cannot leak into the imported network.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from imagen.config import ModelConfig
from imagen.nemo.config_rules import Imported, type_ok
from imagen.nemo.convert import (
    _EFFICIENT_KEYS,
    _REGULAR_KEYS,
    NemoWeightsError,
    model_config_from_nemo,
)
from imagen.presets import PRESETS

_INTS = {"channel_mult", "attention_resolutions", "num_resblocks", "atnn_enabled_at"}
_STRS = {"attention_type", "feature_pooling_type"}
_BOOLS = {
    "use_null_token",
    "gradient_checkpointing",
    "scale_shift_norm",
    "stable_attention",
    "flash_attention",
    "resblock_updown",
    "resample_with_conv",
    "skip_connection_scaling",
    "low_res_cond",
}
# not part of the function a net computes: never decide whether a preset matches
_SPEED_KEYS = {"flash_attention", "gradient_checkpointing", "stable_attention"}


def unet_value_ok(key: str, value: Any) -> str | None:
    """What type NeMo needs for ``model.unet.<key>`` when ``value`` is not of it, else None."""
    if key == "num_res_blocks":
        return None if type_ok(value, int) or type_ok(value, "ints") else "an integer or a list"
    if key == "dropout":
        return None if type_ok(value, bool) or type_ok(value, float) else "a rate or False"
    if key in _INTS:
        return None if type_ok(value, "ints") else "a list of integers"
    if key in _STRS:
        return None if type_ok(value, str) else "a string"
    if key in _BOOLS:
        return None if type_ok(value, bool) else "true or false"
    return None if type_ok(value, int) else "an integer"


def matching_preset(model: ModelConfig) -> str | None:
    """The preset whose UNet is this one (speed settings aside), if any."""

    def arch(unet_type: str, unet: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return unet_type, {k: v for k, v in unet.items() if k not in _SPEED_KEYS}

    mine = arch(model.unet_type, model.unet.model_dump())
    for name, p in PRESETS.items():
        other = ModelConfig.model_validate({"unet_type": p["unet_type"], "unet": p["unet"]})
        if arch(other.unet_type, other.unet.model_dump()) == mine:
            return name
    return None


def _check_unet(imp: Imported, model: dict[str, Any], where: str) -> bool:
    """Unknown keys and wrong types of model.unet; True when the block can be read."""
    unet_type = model.get("unet_type", "base")
    if unet_type not in ("base", "sr-unet", "sr"):
        imp.error(
            "model.unet_type", f"{where}.unet_type", f"{unet_type!r}; NeMo's: base, sr-unet, sr"
        )
        return False
    unet = model.get("unet")
    if not isinstance(unet, dict):
        imp.error("model.unet", f"{where}.unet", "NeMo's UNet block must be a mapping")
        return False
    known = _EFFICIENT_KEYS if unet_type == "sr" else _REGULAR_KEYS | {"low_res_cond"}
    net = "Efficient UNet (unet_type sr)" if unet_type == "sr" else "UNet"
    ok = True
    for key, value in unet.items():
        nemo, target = f"model.unet.{key}", f"{where}.unet.{key}"
        if key not in known:
            imp.error(nemo, target, f"unknown key (misspelt?); NeMo's {net} takes: {sorted(known)}")
            ok = False
        elif (need := unet_value_ok(key, value)) is not None:
            imp.error(nemo, target, f"NeMo needs {need}, got {value!r}")
            ok = False
    low = unet.get("low_res_cond", unet_type == "sr-unet")
    if unet_type != "sr" and low != (unet_type == "sr-unet"):
        imp.error(
            "model.unet.low_res_cond",
            f"{where}.unet_type",
            f"low_res_cond {low} with unet_type {unet_type}: an SR UNet takes the low-res image "
            "(sr-unet), a base UNet does not",
        )
        ok = False
    elif "low_res_cond" in unet:
        imp.same("model.unet.low_res_cond", "implied by unet_type sr-unet / base")
    return ok


def _validation_errors(imp: Imported, e: ValidationError, where: str) -> None:
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p)[:1].isupper())
        msg = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
        imp.error(f"model.{loc}", f"{where}.{loc}", msg)


def map_model(imp: Imported, cfg: dict[str, Any]) -> None:
    """The stage's unet_type, every UNet key, preconditioning and noise_cond_aug."""
    model, where = cfg["model"], f"stages.{imp.stage}.model"
    imp.done.update({"model.unet", "model.unet_type", "model.preconditioning"})
    imp.done.update({"model.preconditioning_type", "model.noise_cond_aug"})
    if not _check_unet(imp, model, where):
        return
    try:
        mc = model_config_from_nemo(model)
    except ValidationError as e:
        _validation_errors(imp, e, where)
        return
    except (NemoWeightsError, ValueError) as e:
        imp.error("model.unet", f"{where}.unet", str(e))
        return
    given = model["unet"]
    unet = mc.unet.model_dump()
    unet["flash_attention"] = bool(given.get("flash_attention", False))  # NeMo's kernel choice
    imp.put(f"{where}.preset", matching_preset(mc), "model.unet (the preset it equals)")
    imp.put(f"{where}.unet_type", mc.unet_type, "model.unet_type")
    for key, value in unet.items():
        src = "num_res_blocks" if key == "num_resblocks" and "num_res_blocks" in given else key
        nemo = f"model.unet.{src}" if src in given else "NeMo's default (absent in model.unet)"
        if key in ("masked_pooling", "context_norm", "noise_cond_scale"):
            nemo = "NeMo's computation (README 'Differences from NeMo')"
        imp.put(f"{where}.unet.{key}", value, nemo)
    pre_src = "model.preconditioning_type"
    if "preconditioning_type" not in model:
        pre_src += " (absent: NeMo's default DDPM)"
    imp.put(f"{where}.preconditioning_type", mc.preconditioning_type, pre_src)
    imp.put(f"{where}.preconditioning", mc.preconditioning.model_dump(), "model.preconditioning")
    if mc.is_sr or "noise_cond_aug" in model:
        src = "model.noise_cond_aug" if "noise_cond_aug" in model else "NeMo's default (False)"
        aug = {"enabled": mc.noise_cond_aug.enabled, "kind": "edm"}
        imp.put(f"{where}.noise_cond_aug", aug, src)
