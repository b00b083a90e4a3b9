"""``imagen import-nemo --config FILE.yaml``: a NeMo Imagen config -> a params profile.

A NeMo training config (base64-*.yaml, sr256-*.yaml, sr1024-*.yaml) becomes the dotted params
keys of one stage; inference_pipeline.yaml becomes the sampling settings of every stage and the
``sample`` block; imagen_fid_images.yaml becomes the ``evaluate`` sweep. The result is a
profile (profiles/*.yaml) that every command takes with ``--profile``.

Every key of the NeMo file is accounted for (tables in :mod:`imagen.nemo.config_rules`): mapped
to a params key (the NeMo key is named beside it), the same as the project's behaviour, or not
mapped, with the reason, printed and written as a comment. An unknown (misspelt) key, a value of
a type NeMo would reject, or a UNet the resolution cannot be divided for stops the import with
the NeMo key and the params key it would have become. The UNet block is read with NeMo's
constructor defaults for absent keys (:func:`imagen.nemo.convert.model_config_from_nemo`), and
every UNet key is written, so the profile builds NeMo's network whatever params.yaml's preset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imagen.config import ConfigError, Params, load_params, resolve_params
from imagen.nemo import config_rules as R
from imagen.nemo.config_infer import map_inference
from imagen.nemo.config_model import map_model
from imagen.nemo.config_rules import Imported, apply_rule
from imagen.nemo.config_train import map_data, map_optim, map_trainer
from imagen.nemo.config_yaml import leaves, read_nemo_yaml


# --------------------------------------------------------------------------------------------
# Kinds, stages, type checks
# --------------------------------------------------------------------------------------------
def config_kind(cfg: dict[str, Any]) -> str:
    """training, inference or fid, from the top-level keys NeMo's scripts read."""
    if "fid" in cfg and "infer" in cfg:
        return "fid"
    if "samplings" in cfg or "customized_model" in cfg:
        return "inference"
    if isinstance(cfg.get("model"), dict) and "unet" in cfg["model"]:
        return "training"
    raise ConfigError(
        "not a NeMo Imagen config: expected a training config (model.unet), "
        "inference_pipeline.yaml (samplings) or imagen_fid_images.yaml (fid, infer)"
    )


def detect_stage(cfg: dict[str, Any]) -> str:
    """The cascade stage a training config trains, from its UNet type and resolution."""
    model = cfg["model"]
    if model.get("unet_type", "base") == "base":
        return "base64"
    aug = ((model.get("data") or {}).get("train") or {}).get("augmentations") or {}
    size = aug.get("resize_smallest_side") or (model.get("unet") or {}).get("image_size")
    return "sr1024" if isinstance(size, int) and size > 256 else "sr256"


def walk(imp: Imported, cfg: dict[str, Any], table: dict[str, R.Rule], prefix: str = "") -> None:
    """Apply ``table`` to every leaf not handled yet; unknown keys are errors. The leaves of an
    unmapped subtree (``x.*``) are reported once, named."""
    groups: dict[str, list[str]] = {}
    for path, value in leaves(cfg):
        full = f"{prefix}{path}"
        if full in imp.done or any(full.startswith(d + ".") for d in imp.done):
            continue
        found = R.rule_for(table, path)
        if found is None:
            imp.error(full, "no params key", "unknown key (misspelt?) for this NeMo config")
        elif found[1] == R.SPECIAL:
            imp.error(full, "no params key", "not expected in this kind of NeMo config")
        elif found[0].endswith(".*") and isinstance(found[1], R.Unmapped):
            groups.setdefault(found[0], []).append(path[len(found[0]) - 1 :])
        else:
            apply_rule(imp, full, value, found[1])
    for pattern, names in groups.items():
        rule = table[pattern]
        assert isinstance(rule, R.Unmapped)
        imp.skip(f"{prefix}{pattern} ({len(names)} keys: {', '.join(names)})", rule.reason)


# --------------------------------------------------------------------------------------------
# The kinds
# --------------------------------------------------------------------------------------------
def import_training(imp: Imported, cfg: dict[str, Any]) -> None:
    map_model(imp, cfg)
    map_trainer(imp, cfg)
    map_data(imp, cfg)
    map_optim(imp, cfg)
    walk(imp, cfg, R.TRAINING)


def import_inference(imp: Imported, cfg: dict[str, Any], prefix: str = "") -> None:
    map_inference(imp, cfg, prefix)
    walk(imp, cfg, R.INFERENCE, prefix)


def import_fid(imp: Imported, cfg: dict[str, Any]) -> None:
    import_inference(imp, cfg.get("infer") or {}, "infer.")
    walk(imp, {k: v for k, v in cfg.items() if k != "infer"}, R.FID)


def import_config(path: str | Path, stage: str | None = None) -> Imported:
    """Read a NeMo config and map every key; :attr:`Imported.errors` lists what is wrong."""
    path = Path(path)
    cfg = read_nemo_yaml(path)
    kind = config_kind(cfg)
    if kind == "training":
        detected = detect_stage(cfg)
        if stage is not None and (stage == "base64") != (detected == "base64"):
            raise ConfigError(
                f"{path}: a {cfg['model'].get('unet_type', 'base')} UNet cannot be the "
                f"{stage} stage"
            )
        stage = stage or detected
    imp = Imported(path, kind, stage)
    {"training": import_training, "inference": import_inference, "fid": import_fid}[kind](imp, cfg)
    return imp


# --------------------------------------------------------------------------------------------
# Validation against params, the profile file
# --------------------------------------------------------------------------------------------
def _nemo_of(imp: Imported, line: str) -> str:
    """``NeMo x -> params y: message`` for one line of a params validation error."""
    path = line.strip().split(":", 1)[0]
    keys = [k for k in imp.origin if path == k or path.startswith(k + ".")]
    if not keys:
        return line.strip()
    best = max(keys, key=len)
    return f"NeMo {imp.origin[best]}{path[len(best) :]} -> {line.strip()}"


def validate(imp: Imported, params_file: str | Path | None) -> Params:
    """The params the profile gives on top of ``params_file`` (or on its own): a ConfigError
    names each bad value by its NeMo key and its params key."""
    try:
        if params_file is not None and Path(params_file).exists():
            return load_params(params_file, imp.values)
        raw: dict[str, Any] = {"stages": {imp.stage or "base64": {}}}
        for key, value in imp.values.items():
            *parents, last = key.split(".")
            node = raw
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return resolve_params(raw)
    except ConfigError as e:
        lines = str(e).splitlines()
        body = [_nemo_of(imp, ln) for ln in lines[1:]] or [_nemo_of(imp, lines[0])]
        raise ConfigError(
            f"{imp.source}: the imported values are not valid:\n  " + "\n  ".join(body)
        ) from None


def default_out(imp: Imported) -> Path:
    return Path("profiles") / f"nemo-{imp.source.stem}.yaml"


def main(args: argparse.Namespace) -> int:
    """``imagen import-nemo --config FILE.yaml [--stage NAME] [--out PROFILE]``."""
    from imagen.nemo.config_profile import render_profile, summary

    try:
        imp = import_config(args.config, args.stage)
        if imp.errors:
            raise ConfigError(f"{imp.source}:\n  " + "\n  ".join(imp.errors))
        validate(imp, args.params)
    except ConfigError as e:
        print(f"imagen import-nemo: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out not in (None, "models") else default_out(imp)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_profile(imp, out))
    print(summary(imp, out))
    return 0
