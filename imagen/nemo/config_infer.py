"""NeMo's inference_pipeline.yaml and imagen_fid_images.yaml -> sampling and sweep keys.

``samplings[i]`` (step, cfg) is stage i of the cascade (base64, sr256, sr1024);
``target_resolution`` stops the cascade (``sample.output_res``, and ``evaluate.depth`` for the
FID sweep); ``customized_model`` checkpoints are named with the command that imports them.
"""

from __future__ import annotations

from typing import Any

from imagen.config import STAGE_RESOLUTIONS
from imagen.nemo.config_rules import STAGE_ORDER, Imported, type_ok

_THRESHOLDING = {"dynamic": "dynamic", "static": "static", "none": "none", None: "none"}


def _samplings(imp: Imported, cfg: dict[str, Any], prefix: str) -> None:
    items = cfg.get("samplings")
    if items is None:
        return
    if not isinstance(items, list) or len(items) > len(STAGE_ORDER):
        imp.error(f"{prefix}samplings", "stages.*.sampling", "needs one entry per stage (<= 3)")
        return
    for i, item in enumerate(items):
        stage = STAGE_ORDER[i]
        for key in set(item or {}) - {"step", "cfg"}:
            imp.error(f"{prefix}samplings.{i}.{key}", f"stages.{stage}.sampling", "unknown key")
        for key, target, kind in (("step", "steps", int), ("cfg", "guidance_scale", float)):
            path = f"{prefix}samplings.{i}.{key}"
            if not isinstance(item, dict) or key not in item:
                continue
            full = f"stages.{stage}.sampling.{target}"
            if type_ok(item[key], kind):
                imp.put(full, item[key], path)
            else:
                imp.error(path, full, f"needs a number, got {item[key]!r}")
        # NeMo's sampler guides at every level down to sigma 0.002, whatever the demo sets
        for key, value in (("guidance_interval", None), ("sigma_min", 0.002)):
            imp.values[f"stages.{stage}.sampling.{key}"] = value
            imp.origin[f"stages.{stage}.sampling.{key}"] = f"{prefix}samplings.{i} (NeMo's)"
        imp.done.add(f"{prefix}samplings.{i}")


def _stage_of(res: Any) -> str | None:
    for name, (r, _) in STAGE_RESOLUTIONS.items():
        if r == res:
            return name
    return None


def _models(imp: Imported, cfg: dict[str, Any], prefix: str) -> None:
    names = {"base": "base64", "sr256": "sr256", "sr1024": "sr1024"}
    for key, value in (cfg.get("customized_model") or {}).items():
        path = f"{prefix}customized_model.{key}"
        stage = names.get(key.rsplit("_", 1)[0], "NAME")
        if value is None:
            imp.same(path, "nothing named")
        elif key.endswith("_ckpt"):
            imp.skip(path, f"import it: imagen import-nemo {value} --stage {stage} --out models")
        elif key.endswith("_cfg"):
            imp.skip(path, f"a .ckpt's model config: imagen import-nemo CKPT --config {value}")
        else:
            imp.error(path, "no params key", "unknown key (misspelt?) of customized_model")
    imp.done.add(f"{prefix}customized_model")


def map_inference(imp: Imported, cfg: dict[str, Any], prefix: str = "") -> None:
    """Per-stage steps and guidance, thresholding, the output resolution, checkpoints."""
    _samplings(imp, cfg, prefix)
    _models(imp, cfg, prefix)
    if "target_resolution" in cfg:
        res, path = cfg["target_resolution"], f"{prefix}target_resolution"
        if _stage_of(res) is None:
            imp.error(path, "sample.output_res", f"{res!r}; NeMo's: 64, 256, 1024")
        else:
            imp.put("sample.output_res", res, path, f"the cascade stops after {_stage_of(res)}")
            if prefix:  # the FID sweep's depth
                imp.put("evaluate.depth", _stage_of(res), path)
    if "thresholding_method" in cfg:
        value, path = cfg["thresholding_method"], f"{prefix}thresholding_method"
        if value not in _THRESHOLDING:
            imp.error(
                path, "stages.*.sampling.thresholding", f"{value!r}; allowed: dynamic, static"
            )
        for stage in STAGE_ORDER:
            imp.put(f"stages.{stage}.sampling.thresholding", _THRESHOLDING.get(value), path)
    if "inference_precision" in cfg:
        value, path = cfg["inference_precision"], f"{prefix}inference_precision"
        if str(value) == "32":
            imp.same(path, "sampling runs in float32")
        else:
            imp.skip(path, f"{value!r}: sampling runs in float32")
    if "encoder_path" in cfg:
        path = f"{prefix}encoder_path"
        imp.skip(
            path,
            f"{cfg['encoder_path']!r} is NeMo's encoder folder: the stage models name their "
            "encoder (model.conditioning.encoder_path, a Hugging Face T5 folder)",
        )
