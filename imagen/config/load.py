"""Reading params.yaml: shared defaults merged under each stage, presets applied, validated.

:func:`load_params` is the single entry point; every other module receives the resulting
:class:`~imagen.config.run.Params`. A bad value raises :class:`ConfigError` listing every
offending key with its full path before any work is done.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagen.config.base import STAGE_RESOLUTIONS, ConfigError
from imagen.config.encoders import MINILM, fill_from_folder
from imagen.config.model import (
    AUTO_ENCODER_PATH,
    DEFAULT_ENCODER_PATH,
    ConditioningConfig,
    validate_unet,
)
from imagen.config.run import Params, StageConfig, StageOverride
from imagen.presets import PRESETS


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins; neither input is modified."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_preset(model: dict[str, Any], where: str) -> dict[str, Any]:
    name = model.get("preset")
    if name is None:
        return model
    if name not in PRESETS:
        raise ConfigError(f"{where}.preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    preset = PRESETS[name]
    # preset first, explicit keys on top (an explicit unet_type or unet key overrides it)
    base = {"unet_type": preset["unet_type"], "unet": preset["unet"]}
    if "noise_cond_aug" in preset:
        base["noise_cond_aug"] = preset["noise_cond_aug"]
    return deep_merge(base, model)


def _format(err: ValidationError, prefix: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        # pydantic puts union member names (EDMConfig...) into paths; keep the user's keys
        loc = ".".join(p for p in loc.split(".") if not p[:1].isupper())
        path = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; " + msg.replace("Input should be", "allowed:")
        lines.append(f"{path}: {msg}")
    return lines


def _resolve_stage(
    name: str, block: Any, shared: Mapping[str, Mapping[str, Any]], errors: list[str]
) -> StageConfig | None:
    """One ``stages.<name>`` block merged over the shared defaults, preset applied, validated."""
    where = f"stages.{name}"
    if name not in STAGE_RESOLUTIONS:
        errors.append(f"{where}: unknown stage; allowed: {list(STAGE_RESOLUTIONS)}")
        return None
    try:
        over = StageOverride.model_validate(block or {})
        model = _apply_preset(deep_merge(shared["model"], over.model), f"{where}.model")
    except ValidationError as e:
        errors.extend(_format(e, where))
        return None
    except ConfigError as e:
        errors.append(str(e))
        return None
    res, lowres = STAGE_RESOLUTIONS[name]
    stage = {
        "name": name,
        "resolution": over.resolution or res,
        "lowres": over.lowres if over.lowres is not None else lowres,
        "model": model,
        "trainer": deep_merge(shared["trainer"], over.trainer),
        "sampling": deep_merge(shared["sampling"], over.sampling),
    }
    try:
        sc = StageConfig.model_validate(stage)
    except ValidationError as e:
        errors.extend(_format(e, where))
        return None
    if not sc.model.is_sr and over.resolution is None:
        # the base stage generates at its UNet's size (64 for the paper presets; a small
        # CPU recipe may train at 32): the SR stage after it up-samples whatever it gets
        sc.resolution = sc.model.unet.image_size
    errors.extend(_stage_errors(name, sc))
    return sc


def _stage_errors(name: str, sc: StageConfig) -> list[str]:
    """Cross-field checks of one resolved stage."""
    where = f"stages.{name}"
    errors = [
        f"{where}.model.unet.{k}: {m}" for k, m in validate_unet(sc.model.unet_type, sc.model.unet)
    ]
    if sc.model.is_sr and sc.lowres is None:
        errors.append(f"{where}.lowres: an SR stage needs the low-res input size")
    if not sc.model.is_sr and name != "base64":
        errors.append(
            f"{where}.model.unet_type: {name} is a super-resolution stage; "
            "allowed: 'sr-unet' or 'sr'"
        )
    if name == "base64" and sc.model.is_sr:
        errors.append(f"{where}.model.unet_type: base64 generates from text; allowed: 'base'")
    return errors


def _conditioning_errors(stages: Mapping[str, StageConfig]) -> list[str]:
    """Precache writes one set of embeddings, so the text features must agree across stages."""
    errors: list[str] = []
    conds = {n: s.model.conditioning for n, s in stages.items()}
    first = next(iter(conds.values()), None)
    for n, c in conds.items():
        for key in ("embed_dim", "precached_key", "encoder_path", "online_encoding"):
            if first is not None and getattr(c, key) != getattr(first, key):
                errors.append(
                    f"stages.{n}.model.conditioning.{key}: must equal the other stages' value "
                    f"({getattr(first, key)!r}); one text encoder serves the whole cascade"
                )
    return errors


# Tokens each tokenizer needs for the embedded captions (they reach 112 bytes / 21 words);
# 128 is NeMo's token_length for T5.
_TOKEN_LENGTH = {"word": 24, "byt5": 128}


# MiniLM word pieces an own caption gets under encoder_path auto: alt-text-like captions of up
# to ~25 words; precache counts (and prints) the captions it had to cut.
OWN_TOKEN_LENGTH = 32


def _choose_encoder(cond: ConditioningConfig, source: str) -> None:
    """``encoder_path: auto``: the small T5 built here for the embedded captions (its word
    tokenizer knows their grammar); for anyone else's, the pretrained all-MiniLM-L6-v2 that
    installs with the project (a random encoder knows no language: on a real folder its
    captions were not followed, docs/own_data.md), unless ``encoder.tokenizer`` asks for the
    built one or ``embed_dim`` is set to another width (for example precached NeMo embeddings,
    which need their own encoder for new prompts: set encoder_path to it)."""
    if cond.encoder_path != AUTO_ENCODER_PATH:
        return
    if source == "embedded" or cond.encoder.tokenizer != "auto" or cond.embed_dim is not None:
        cond.encoder_path = DEFAULT_ENCODER_PATH
        if cond.embed_dim is None:
            cond.embed_dim = cond.encoder.d_model
        return
    cond.encoder_path = MINILM
    if cond.token_length is None:
        cond.token_length = OWN_TOKEN_LENGTH
    cond._chosen = (
        f"model.conditioning.encoder_path auto: data.source is {source!r}, so your captions "
        f"are encoded by the pretrained all-MiniLM-L6-v2 (packaged, offline), token_length "
        f"{cond.token_length}; set encoder.tokenizer: byt5 for the small random T5 built here"
    )


def _fill_text_defaults(params: Params) -> None:
    """encoder_path auto is chosen from the data source; the built encoder's tokenizer follows
    the data source unless set: word for the embedded captions, bytes for anyone else's;
    token_length follows the tokenizer unless set."""
    source = params.data.source
    for sc in params.stages.values():
        cond = sc.model.conditioning
        _choose_encoder(cond, source)
        if cond.encoder.tokenizer == "auto":
            cond.encoder.tokenizer = "word" if source == "embedded" else "byt5"
        if cond.encoder_path != DEFAULT_ENCODER_PATH:
            fill_from_folder(cond)  # unset embed_dim / token_length: what the folder says
        elif cond.token_length is None:
            cond.token_length = _TOKEN_LENGTH[cond.encoder.tokenizer]
    cond = params.conditioning
    own_word = cond.encoder.tokenizer == "word" and cond.encoder_path == DEFAULT_ENCODER_PATH
    if source != "embedded" and own_word:
        raise ConfigError(
            "model.conditioning.encoder.tokenizer: 'word' knows only the embedded captions' "
            f"vocabulary (every other word becomes <unk>), but data.source is {source!r}; "
            "leave it unset or use 'byt5' for your own captions, or point "
            "model.conditioning.encoder_path at a real T5"
        )


def resolve_params(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml) into :class:`Params`.

    Raises :class:`ConfigError` listing every bad key with its full path.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: the top level must be a mapping")
    raw, _ = apply_own_data(raw)
    shared = {k: raw.pop(k, None) or {} for k in ("model", "trainer", "sampling")}
    stage_raw = raw.pop("stages", None) or {}
    if not isinstance(stage_raw, Mapping):
        raise ConfigError("stages: must be a mapping of stage name -> stage block")
    errors: list[str] = []
    stages = {}
    for name, block in stage_raw.items():
        sc = _resolve_stage(name, block, shared, errors)
        if sc is not None:
            stages[name] = sc
    if errors:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    errors = _conditioning_errors(stages)
    try:
        params = Params.model_validate({**raw, "stages": stages})
    except ValidationError as e:
        errors.extend(_format(e, "params"))
        params = None
    if errors or params is None:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    if not params.stages:
        raise ConfigError("stages: at least one stage (base64) must be configured")
    _fill_text_defaults(params)
    return params


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a mapping")
    node[parts[-1]] = value


def load_params(
    path: str | Path = "params.yaml", overrides: Mapping[str, Any] | list[str] | None = None
) -> Params:
    """Read params.yaml, apply ``key.path=value`` overrides, validate.

    ``overrides`` is a mapping of dotted keys or a list of ``key=value`` strings (values are
    parsed as YAML, so ``trainer.max_steps=10`` gives an int).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.path=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v)))
    for k, v in items:
        _set_dotted(raw, k, v)
    before = flatten({k: v for k, v in raw.items() if k != OWN_DATA})
    raw, chosen = apply_own_data(raw, [k for k, _ in items])
    for k, v in items:  # the command line wins over own_data too
        _set_dotted(raw, k, v)
    params = resolve_params(raw)
    params._own_data = chosen
    params._own_replaced = {k: before[k] for k in chosen if k in before and before[k] != chosen[k]}
    return params


OWN_DATA = "own_data"


def apply_own_data(
    raw: Mapping[str, Any], keep: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """params.yaml's ``own_data`` block: the keys that replace the demo's when the data is the
    user's own (``data.source`` folder or webdataset), measured on a real folder
    (docs/own_data.md). Returns the params without the block (merged over them unless the data
    is the embedded demo's) and the dotted keys it set, less those in ``keep`` (the command
    line's, which win)."""
    raw = dict(raw)
    own = raw.pop(OWN_DATA, None)
    if own is None:
        return raw, {}
    if not isinstance(own, Mapping):
        raise ConfigError(f"{OWN_DATA}: must be a mapping of params keys (like stages: ...)")
    data = raw.get("data") or {}
    source = data.get("source", "embedded") if isinstance(data, Mapping) else "embedded"
    if source == "embedded":
        try:  # checked all the same, so a misspelt key shows before anyone's data needs it
            resolve_params(deep_merge(raw, own))
        except ConfigError as e:
            raise ConfigError(f"{OWN_DATA} (the keys for your own data): {e}") from None
        return raw, {}
    keep = keep or []
    chosen = {
        k: v
        for k, v in flatten(own).items()
        if not any(k == c or k.startswith(c + ".") for c in keep)
    }
    return deep_merge(raw, own), chosen


def params_hash(params: Params) -> str:
    """A short stable hash of the resolved params (tagged on every MLflow run)."""

    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
