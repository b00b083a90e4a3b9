"""NeMo's trainer, batch sizes, checkpointing, data block and optimiser -> one stage's keys.

The keys here depend on each other (global batch on micro batch and the data-parallel size,
the training crop on the UNet size, the low-res size on the image pyramid), so they are mapped
in code; the one-to-one keys are in :data:`imagen.nemo.config_rules.TRAINING`.
"""

from __future__ import annotations

import math
from typing import Any

from imagen.config import STAGE_RESOLUTIONS, TrainerConfig
from imagen.nemo.config_rules import Imported, type_ok


def _get(cfg: dict[str, Any], path: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def _has(cfg: dict[str, Any], path: str) -> bool:
    return _get(cfg, path, KeyError) is not KeyError


def _int(imp: Imported, cfg: dict[str, Any], path: str, target: str) -> int | None:
    value = _get(cfg, path)
    if value is not None and not type_ok(value, int):
        imp.error(path, target, f"needs an integer, got {value!r}")
        return None
    return value


def _devices(imp: Imported, cfg: dict[str, Any], s: str) -> int:
    """Maps trainer.devices; returns the device count per node for the data-parallel size."""
    if not _has(cfg, "trainer.devices"):
        return 1
    value, target = _get(cfg, "trainer.devices"), f"stages.{s}.trainer.devices"
    if value in (-1, "auto"):
        imp.put(target, "auto", "trainer.devices", "every visible GPU; accumulation assumes 1")
        return 1
    if isinstance(value, list) and all(type_ok(v, int) for v in value):
        imp.put(target, len(value), "trainer.devices", f"GPU ids {value}: the count is kept")
        return len(value)
    if not type_ok(value, int) or value < 1:
        imp.error("trainer.devices", target, f"needs a GPU count or a list of ids, got {value!r}")
        return 1
    imp.put(target, value, "trainer.devices")
    return value


def _batch(imp: Imported, cfg: dict[str, Any], s: str, devices: int) -> None:
    """micro batch -> batch_size; global > micro x data-parallel -> accumulate_grad_batches."""
    micro = _int(imp, cfg, "model.micro_batch_size", f"stages.{s}.trainer.batch_size")
    glob = _int(imp, cfg, "model.global_batch_size", f"stages.{s}.trainer.accumulate_grad_batches")
    nodes = _get(cfg, "trainer.num_nodes", 1)
    nodes = nodes if type_ok(nodes, int) else 1
    if micro is not None:
        imp.put(f"stages.{s}.trainer.batch_size", micro, "model.micro_batch_size")
    if micro is None or glob is None:
        return
    dp = devices * nodes
    target = f"stages.{s}.trainer.accumulate_grad_batches"
    if glob % (micro * dp):
        imp.error(
            "model.global_batch_size",
            target,
            f"{glob} is not a multiple of micro_batch_size x data-parallel size "
            f"({micro} x {dp} = {micro * dp}, devices x num_nodes); NeMo rejects it too",
        )
        return
    note = f"{glob} = {micro} per device x {dp} devices x {glob // (micro * dp)} accumulated"
    imp.put(target, glob // (micro * dp), "model.global_batch_size", note)


def _precision(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    value = _get(cfg, "trainer.precision")
    target = f"stages.{s}.trainer.precision"
    if _has(cfg, "trainer.precision"):
        if not (type_ok(value, int) or type_ok(value, str)):
            imp.error("trainer.precision", target, f"needs 32, 16, bf16..., got {value!r}")
        else:
            imp.put(target, str(value), "trainer.precision")
    if _has(cfg, "model.precision"):
        if _get(cfg, "model.precision") == value:
            imp.same("model.precision", "one precision per stage: trainer.precision")
        else:
            imp.skip("model.precision", "differs from trainer.precision, which is used")


def _resume(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    paths = ("trainer.resume_from_checkpoint", "exp_manager.resume_from_checkpoint")
    for path in (*paths, "model.resume_from_checkpoint"):
        if not _has(cfg, path):
            continue
        value = _get(cfg, path)
        if value is None:
            imp.same(path, "no checkpoint named: the stage resumes its own, if any")
        elif "init_from" in TrainerConfig.model_fields:
            imp.put(f"stages.{s}.trainer.init_from", value, path, "starts from these weights")
        else:
            imp.skip(path, f"start from NeMo's weights: imagen import-nemo {value} --stage {s}")


def _keep(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    """save_top_k / monitor -> trainer.keep.* where this version of params has that block."""
    base = "exp_manager.checkpoint_callback_params"
    has_keep = "keep" in TrainerConfig.model_fields
    for key in ("save_top_k", "monitor"):
        path = f"{base}.{key}"
        if not _has(cfg, path):
            continue
        value = _get(cfg, path)
        if not has_keep:
            imp.skip(path, f"{value!r}: no params key for which checkpoints are kept")
        elif key == "save_top_k" and type_ok(value, int):
            imp.put(f"stages.{s}.trainer.keep.top_k", max(0, value), path)
        elif key == "monitor" and value == "reduced_train_loss":
            note = "NeMo's reduced_train_loss: the training loss averaged over ranks"
            imp.put(f"stages.{s}.trainer.keep.monitor", "train/loss_avg", path, note)
        elif key == "monitor" and value in ("val_loss", "validation_loss"):
            note = f"NeMo's {value}: the held-out denoising loss (trainer.heldout_loss)"
            imp.put(f"stages.{s}.trainer.keep.monitor", "heldout/loss", path, note)
        else:
            imp.skip(path, f"{value!r}: checkpoints are ranked by the training or held-out loss")


def map_trainer(imp: Imported, cfg: dict[str, Any]) -> None:
    """trainer.devices / precision, the batch sizes, resume and checkpoint retention keys."""
    s = imp.stage or "base64"
    devices = _devices(imp, cfg, s)
    imp.done.update({"model.micro_batch_size", "model.global_batch_size"})
    _batch(imp, cfg, s, devices)
    _precision(imp, cfg, s)
    if _has(cfg, "exp_manager.ema.decay"):  # NeMo's fixed decay, whatever params.yaml warms up
        imp.values[f"stages.{s}.trainer.ema_warmup"] = False
        imp.origin[f"stages.{s}.trainer.ema_warmup"] = "exp_manager.ema.decay"
    # NeMo trains every step at the full size, whatever params.yaml's demo does first
    imp.values[f"stages.{s}.trainer.progressive"] = None
    imp.origin[f"stages.{s}.trainer.progressive"] = "NeMo's training (full size throughout)"
    _resume(imp, cfg, s)
    _keep(imp, cfg, s)


def _crop(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    path = "model.data.train.augmentations.center_crop_h_w"
    if not _has(cfg, path):
        return
    value = _get(cfg, path)
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    parts = [parts] if isinstance(parts, int) else parts
    key = f"stages.{s}.model.unet.image_size"
    if not (isinstance(parts, list) and all(str(p).isdigit() for p in parts) and parts):
        imp.error(path, key, f"needs 'H, W', got {value!r}")
        return
    h, w = int(parts[0]), int(parts[-1])
    size = imp.values.get(key)
    if h != w:
        imp.error(path, key, f"{h}x{w}: the stages train on square crops")
    elif h == size:
        imp.same(path, "the training crop is the UNet's image_size")
    elif size is not None and h < size and imp.values.get(f"stages.{s}.model.unet_type") == "sr":
        note = (
            f"NeMo trains on {h} px crops of the {size} px net; the Efficient UNet's weights do "
            "not depend on its size, and sampling runs at the stage resolution"
        )
        imp.put(key, h, path, note)
    else:
        imp.skip(path, f"a {h} px crop of a {size} px UNet: the UNet trains at its image_size")


def _resolution(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    path = "model.data.train.augmentations.resize_smallest_side"
    if not _has(cfg, path):
        return
    value = _get(cfg, path)
    res = (
        STAGE_RESOLUTIONS[s][0]
        if s != "base64"
        else imp.values.get(f"stages.{s}.model.unet.image_size")
    )
    if not type_ok(value, int):
        imp.error(path, f"stages.{s}.resolution", f"needs an integer, got {value!r}")
    elif value == res:
        imp.same(path, f"images are resized to the stage resolution ({res})")
    elif s != "base64":
        imp.put(f"stages.{s}.resolution", value, path)
    else:
        imp.skip(path, f"{value}: the base stage trains at its UNet's image_size ({res})")


def _pyramid(imp: Imported, cfg: dict[str, Any], s: str) -> None:
    for path in (
        "model.data.train.target_resolutions",
        "model.data.train.corruption_aug.target_resolution",
    ):
        if not _has(cfg, path):
            continue
        value = _get(cfg, path)
        if not type_ok(value, "ints") or len(value) < 2:
            imp.error(path, "data.pyramid", f"needs [low, high] resolutions, got {value!r}")
            continue
        imp.put("data.pyramid", sorted(value), path, "stored copies at these sizes")
        res = imp.values.get(f"stages.{s}.resolution", STAGE_RESOLUTIONS[s][0])
        if s != "base64":
            imp.put(f"stages.{s}.lowres", res * min(value) // max(value), path)


def map_data(imp: Imported, cfg: dict[str, Any]) -> None:
    """Crop, resize, resolution filter, pyramid, webdataset, text encoder path."""
    s = imp.stage or "base64"
    _crop(imp, cfg, s)
    _resolution(imp, cfg, s)
    _pyramid(imp, cfg, s)
    base = "model.data.train.filterings.resolution"
    if _has(cfg, f"{base}.value"):
        method, value = _get(cfg, f"{base}.method", "larger"), _get(cfg, f"{base}.value")
        if _has(cfg, f"{base}.method"):
            imp.same(f"{base}.method", f"{method!r}: data.min_resolution is a minimum size")
        if method != "larger":
            imp.skip(f"{base}.value", f"method {method!r}: only a minimum size is filtered")
        elif not type_ok(value, int):
            imp.error(f"{base}.value", "data.min_resolution", f"needs an integer, got {value!r}")
        else:
            note = "NeMo keeps images whose both sides are >= value: the short side's minimum"
            imp.put("data.min_resolution", value, f"{base}.value", note)
    path = "model.data.train.dataset_path"
    if _has(cfg, path):
        value = _get(cfg, path)
        if type_ok(value, str) or (type_ok(value, "strs") and value):
            note = "NeMo's wdinfo .pkl files (or shards), relative to where NeMo ran"
            imp.put("data.source_path", value, path, note)
        else:
            imp.error(path, "data.source_path", f"needs paths, got {value!r}")
    path = "model.data.webdataset.use_webdataset"
    if _has(cfg, path):
        if _get(cfg, path) is True:
            imp.put("data.source", "webdataset", path)
        else:
            imp.skip(path, "only webdataset shards or an image folder (data.source) are read")
    path = "model.conditioning.encoder_path"
    if _has(cfg, path):
        value = _get(cfg, path)
        why = (
            "empty: NeMo downloads T5; nothing is downloaded here"
            if value is None
            else f"{value!r} is NeMo's encoder folder (t5xxl-encoder.bin)"
        )
        imp.skip(path, f"{why}: set model.conditioning.encoder_path to a Hugging Face T5 folder")


def map_optim(imp: Imported, cfg: dict[str, Any]) -> None:
    """optim.name / eps / sched (the plain keys are in the table)."""
    s = imp.stage or "base64"
    name = _get(cfg, "model.optim.name")
    if _has(cfg, "model.optim.name"):
        if name in ("fused_adam", "adamw", "adam_w"):
            imp.same("model.optim.name", "AdamW with decoupled weight decay (fused_adam's update)")
        else:
            imp.skip("model.optim.name", f"{name!r}: the optimiser is AdamW")
    if _has(cfg, "model.optim.eps"):
        eps = _get(cfg, "model.optim.eps")
        if type_ok(eps, float) and math.isclose(eps, 1e-8):
            imp.same("model.optim.eps", "1e-8, the AdamW eps the stage uses")
        else:
            imp.skip("model.optim.eps", f"{eps!r}: no params key; the stage's AdamW uses 1e-8")
    if _has(cfg, "model.optim.sched.name"):
        sched = _get(cfg, "model.optim.sched.name")
        if sched == "WarmupPolicy":
            imp.same("model.optim.sched.name", "linear warm-up, then constant")
        else:
            imp.skip("model.optim.sched.name", f"{sched!r}: the schedule is warm-up then constant")
    path = "model.optim.sched.warmup_ratio"
    if _has(cfg, path):
        ratio, steps = _get(cfg, path), _get(cfg, "trainer.max_steps")
        if ratio is None:
            imp.same(path, "warm-up given in steps")
        elif _has(cfg, "model.optim.sched.warmup_steps"):
            imp.skip(path, "warmup_steps is given and used")
        elif type_ok(ratio, float) and type_ok(steps, int):
            target = f"stages.{s}.trainer.optim.warmup_steps"
            imp.put(target, round(ratio * steps), path, f"{ratio} x max_steps {steps}")
        else:
            imp.error(path, f"stages.{s}.trainer.optim.warmup_steps", f"got {ratio!r}")
