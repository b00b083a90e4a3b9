"""What each key of NeMo's Imagen configs becomes here: a params key, nothing (with the reason),
or nothing because the project already behaves so.

Three tables, by config kind: ``TRAINING`` (base64-*.yaml, sr256-*.yaml, sr1024-*.yaml),
``INFERENCE`` (inference_pipeline.yaml, and the ``infer:`` block of imagen_fid_images.yaml) and
``FID`` (the rest of imagen_fid_images.yaml). Keys are NeMo's dotted paths (``*`` ends a
subtree, ``#`` stands for a list index); ``{s}`` in a target is the stage being imported.
Keys whose meaning depends on other keys (the UNet, batch sizes, crops, the pyramid) are
``SPECIAL``: :mod:`imagen.nemo.config_model`, ``config_train`` and ``config_infer`` map them in
code. :class:`Imported` collects what one import maps, notes and rejects; :func:`apply_rule`
applies one table rule to one NeMo key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Kind = type | tuple[type, ...] | str  # a Python type, or "floats" / "ints" / "strs" (lists)


@dataclass(frozen=True)
class Map:
    """NeMo's value becomes ``target`` (after a type check against ``kind``)."""

    target: str
    kind: Kind
    note: str = ""


@dataclass(frozen=True)
class Unmapped:
    """No counterpart: the key is reported and written as a comment with ``reason``."""

    reason: str


@dataclass(frozen=True)
class Same:
    """The project already does what NeMo's ``expected`` value means; other values have no
    counterpart (``otherwise``)."""

    expected: Any
    reason: str
    otherwise: str


SPECIAL = "special"
Rule = Map | Unmapped | Same | str

_MLFLOW = "runs are logged to MLflow (mlflow.*), not to this logger"
_VAL = "no validation loop during training; held-out evaluation is `imagen evaluate`"
_RESUME = (
    "a stage resumes from its own last checkpoint by the stage runner's rule (docs/training.md)"
)
_DDP = "a Megatron/DDP tuning flag; Lightning's DDP defaults are used"
_PBSS = (
    "checkpoint upload to PBSS (an object store) with a credentials file: not supported, and "
    "the credentials file is never read"
)
_CORRUPT = (
    "blur/resize/noise/JPEG degradation of the low-res input is not implemented: SR stages "
    "train on clean bicubic downsamples"
)
_SCHED = "the schedule is linear warm-up then constant (NeMo's WarmupPolicy); no counterpart"

TRAINING: dict[str, Rule] = {
    "name": Unmapped("NeMo's run name; MLflow names each run by its stage"),
    "allow_tf32": Map("stages.{s}.trainer.allow_tf32", bool),
    "trainer.devices": SPECIAL,
    "trainer.num_nodes": Map("stages.{s}.trainer.num_nodes", int),
    "trainer.max_epochs": Same(-1, "training is step-based: max_steps decides", "set max_steps"),
    "trainer.max_steps": Map("stages.{s}.trainer.max_steps", int),
    "trainer.logger": Unmapped(_MLFLOW),
    "trainer.precision": SPECIAL,
    "trainer.accelerator": Map("stages.{s}.trainer.accelerator", str),
    "trainer.limit_val_batches": Unmapped(_VAL),
    "trainer.log_every_n_steps": Map("stages.{s}.trainer.log_every_n_steps", int),
    "trainer.num_sanity_val_steps": Unmapped(_VAL),
    "trainer.enable_checkpointing": Unmapped(
        "the stage writes its own checkpoints (trainer.checkpoint_every_n_steps)"
    ),
    "trainer.accumulate_grad_batches": Same(
        1,
        "NeMo derives accumulation from model.global_batch_size (mapped there)",
        "NeMo derives accumulation from model.global_batch_size; this value is not used",
    ),
    "trainer.gradient_clip_val": Map("stages.{s}.trainer.gradient_clip_val", float),
    "trainer.benchmark": Map("stages.{s}.trainer.benchmark", bool),
    "trainer.enable_model_summary": Unmapped(
        "Lightning's model summary; the stage run logs its parameter count"
    ),
    "trainer.resume_from_checkpoint": SPECIAL,
    "exp_manager.exp_dir": Unmapped(
        "checkpoints and models go to the stage's folders (models/<stage>, DVC outputs)"
    ),
    "exp_manager.name": Unmapped("NeMo's experiment name; the MLflow one is mlflow.experiment"),
    "exp_manager.create_wandb_logger": Unmapped(_MLFLOW),
    "exp_manager.wandb_logger_kwargs.*": Unmapped(_MLFLOW),
    "exp_manager.create_tensorboard_logger": Unmapped(_MLFLOW),
    "exp_manager.create_checkpoint_callback": Same(
        True, "the stage always writes checkpoints", "the stage always writes checkpoints"
    ),
    "exp_manager.checkpoint_callback_params.monitor": SPECIAL,
    "exp_manager.checkpoint_callback_params.save_top_k": SPECIAL,
    "exp_manager.checkpoint_callback_params.every_n_epochs": Same(
        0, "checkpoints are step-based", "checkpoints are step-based (every_n_train_steps)"
    ),
    "exp_manager.checkpoint_callback_params.every_n_train_steps": Map(
        "stages.{s}.trainer.checkpoint_every_n_steps", int
    ),
    "exp_manager.checkpoint_callback_params.filename": Unmapped(
        "checkpoint file names are the stage's own (step-numbered)"
    ),
    "exp_manager.resume_if_exists": Unmapped(_RESUME),
    "exp_manager.resume_ignore_no_checkpoint": Unmapped(_RESUME),
    "exp_manager.resume_from_checkpoint": SPECIAL,
    "exp_manager.ema.enable": Same(
        True,
        "the stage always keeps EMA weights and saves them as the stage model",
        "the EMA cannot be switched off (the stage model is the EMA weights)",
    ),
    "exp_manager.ema.decay": Map(
        "stages.{s}.trainer.ema_decay",
        float,
        "a fixed decay, as NeMo's (trainer.ema_warmup: false)",
    ),
    "exp_manager.ema.validate_original_weights": Same(
        False, "grids and the stage model use the EMA weights", "grids always use the EMA weights"
    ),
    "exp_manager.ema.every_n_steps": Same(
        1, "the EMA is updated every optimiser step", "the EMA is updated every optimiser step"
    ),
    "exp_manager.ema.cpu_offload": Same(
        False, "the EMA weights stay on the training device", "no CPU offload of the EMA"
    ),
    "model.precision": SPECIAL,
    "model.micro_batch_size": SPECIAL,
    "model.global_batch_size": SPECIAL,
    "model.inductor": Map("stages.{s}.model.inductor", bool),
    "model.inductor_cudagraphs": Same(False, "CUDA graphs are not used", "CUDA graphs: not used"),
    "model.unet_type": SPECIAL,
    "model.channels_last": Map("stages.{s}.model.channels_last", bool),
    "model.unet.*": SPECIAL,
    "model.seed": Map("stages.{s}.trainer.seed", int),
    "model.resume_from_checkpoint": SPECIAL,
    "model.apex_transformer_log_level": Unmapped("apex/Megatron log level: neither is used"),
    "model.gradient_as_bucket_view": Unmapped(_DDP),
    "model.ddp_overlap": Unmapped(_DDP),
    "model.noise_cond_aug": SPECIAL,
    "model.preconditioning_type": SPECIAL,
    "model.preconditioning.*": SPECIAL,
    "model.conditioning.embed_dim": Map(
        "model.conditioning.embed_dim",
        int,
        "NeMo's precached shards carry features of this width; sampling and online encoding "
        "need a T5 of that width at model.conditioning.encoder_path",
    ),
    "model.conditioning.token_length": Map("model.conditioning.token_length", int),
    "model.conditioning.drop_rate": Map("model.conditioning.drop_rate", float),
    "model.conditioning.precached_key": Map("model.conditioning.precached_key", str),
    "model.conditioning.out_key": Map("model.conditioning.out_key", str),
    "model.conditioning.online_encoding": Map("model.conditioning.online_encoding", bool),
    "model.conditioning.encoder_path": SPECIAL,
    "model.data.num_workers": Map("stages.{s}.trainer.num_workers", int),
    "model.data.synthetic_data": Same(
        False, "real shards", "the project's synthetic set is data.source: embedded"
    ),
    "model.data.synthetic_data_length": Unmapped(
        "only used with synthetic_data; the embedded set's size is data.num_train"
    ),
    "model.data.train.dataset_path": SPECIAL,
    "model.data.train.augmentations.resize_smallest_side": SPECIAL,
    "model.data.train.augmentations.center_crop_h_w": SPECIAL,
    "model.data.train.augmentations.horizontal_flip": Same(
        False, "no flips", "no flip augmentation"
    ),
    "model.data.train.filterings": Same(
        None, "no filter beyond data.min_resolution", "unknown filter"
    ),
    "model.data.train.filterings.resolution.method": SPECIAL,
    "model.data.train.filterings.resolution.value": SPECIAL,
    "model.data.train.filterings.estimated_portion": Unmapped(
        "NeMo's epoch-length estimate; training here is step-based"
    ),
    "model.data.train.target_resolutions": SPECIAL,
    "model.data.train.corruption_aug.target_resolution": SPECIAL,
    "model.data.train.corruption_aug.*": Unmapped(_CORRUPT),
    "model.data.webdataset.use_webdataset": SPECIAL,
    "model.data.webdataset.object_store": Same(
        False,
        "local shards",
        "give data.source_path a URL webdataset opens (pipe:, http://) instead",
    ),
    "model.data.webdataset.infinite_sampler": Unmapped(
        "training streams repeat the shards forever; held-out streams are one epoch"
    ),
    "model.data.webdataset.local_root_path": Map(
        "data.source_root", str, "the folder the wdinfo files' tar_files are relative to"
    ),
    "model.data.webdataset.verbose": Unmapped("webdataset logging is not a params key"),
    "model.data.pbss_checkpoint_saving.*": Unmapped(_PBSS),
    "model.optim.name": SPECIAL,
    "model.optim.lr": Map("stages.{s}.trainer.optim.lr", float),
    "model.optim.eps": SPECIAL,
    "model.optim.betas": Map("stages.{s}.trainer.optim.betas", "floats"),
    "model.optim.weight_decay": Map("stages.{s}.trainer.optim.weight_decay", float),
    "model.optim.sched.name": SPECIAL,
    "model.optim.sched.warmup_steps": Map("stages.{s}.trainer.optim.warmup_steps", int),
    "model.optim.sched.warmup_ratio": SPECIAL,
    "model.optim.sched.*": Unmapped(_SCHED),
}

INFERENCE: dict[str, Rule] = {
    "num_images_per_promt": Map("sample.num_images", int),
    "model_name": Unmapped(
        "NeMo's pretrained-model registry; import a .nemo: imagen import-nemo FILE --stage NAME"
    ),
    "run_ema_model": Same(
        True,
        "stage models hold EMA weights; import-nemo takes NeMo's EMA weights when present",
        "imagen import-nemo --no-ema imports the raw weights",
    ),
    "customized_model.*": SPECIAL,
    "target_resolution": SPECIAL,
    "inference_precision": SPECIAL,
    "thresholding_method": SPECIAL,
    "texts": Map("sample.prompts", "strs"),
    "output_path": Map("sample.out_dir", str),
    "record_time": Same(True, "imagen sample prints the time taken", "always printed"),
    "encoder_path": SPECIAL,
    "samplings.#.step": SPECIAL,
    "samplings.#.cfg": SPECIAL,
}

_LAUNCH = "NeMo's SLURM launcher layout; the sweep runs as one process (imagen evaluate)"
FID: dict[str, Rule] = {
    "name": Unmapped("NeMo's job name"),
    "fid.classifier_free_guidance": Map("evaluate.guidance_scales", "floats"),
    "fid.nnodes_per_cfg": Unmapped(_LAUNCH),
    "fid.ntasks_per_node": Unmapped(_LAUNCH),
    "fid.local_task_id": Unmapped(_LAUNCH),
    "fid.num_images_to_eval": Map("evaluate.num_images", int),
    "fid.coco_captions_path": Unmapped(
        "the sweep scores the held-out split of the ingested data: ingest COCO "
        "(data.source: folder) to score on it"
    ),
    "fid.coco_images_path": Unmapped(
        "the sweep compares with the held-out images of the ingested data"
    ),
    "fid.save_path": Map("evaluate.reports_dir", str),
    "fid.ncaptions_per_batch": Map("evaluate.batch_size", int),
    "fid.save_all_res": Unmapped("the sweep writes its report and grids to evaluate.reports_dir"),
    "fid.save_text": Unmapped("the sweep writes its report and grids to evaluate.reports_dir"),
    "models.#.restore_from_path": Unmapped(
        "import it: imagen import-nemo {value} --stage NAME --out models"
    ),
    "trainer.*": Unmapped("the sweep runs on one device (imagen evaluate); no launcher settings"),
}

STAGE_ORDER: tuple[str, ...] = ("base64", "sr256", "sr1024")  # NeMo's samplings / ckpts order


def rule_for(table: dict[str, Rule], path: str) -> tuple[str, Rule] | None:
    """The table entry for a NeMo key path: an exact key, else the longest ``*`` subtree; list
    indices match ``#``."""
    norm = ".".join("#" if p.isdigit() else p for p in path.split("."))
    if norm in table:
        return norm, table[norm]
    parts = norm.split(".")
    for n in range(len(parts) - 1, 0, -1):
        key = ".".join(parts[:n]) + ".*"
        if key in table:
            return key, table[key]
    return None


@dataclass
class Imported:
    """The outcome of one import: params keys (with their NeMo source) and the notes."""

    source: Path
    kind: str  # training | inference | fid
    stage: str | None
    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # params key -> NeMo key
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, NeMo key, reason)
    errors: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)  # NeMo keys already handled

    def put(self, key: str, value: Any, nemo: str, note: str = "") -> None:
        self.values[key] = value
        self.origin[key] = nemo
        self.done.add(nemo)
        if note:
            self.notes.append(("note", nemo, note))

    def skip(self, nemo: str, reason: str) -> None:
        self.notes.append(("unmapped", nemo, reason))
        self.done.add(nemo)

    def same(self, nemo: str, reason: str) -> None:
        self.notes.append(("same", nemo, reason))
        self.done.add(nemo)

    def error(self, nemo: str, target: str, message: str) -> None:
        self.errors.append(f"NeMo {nemo} (-> {target}): {message}")
        self.done.add(nemo)


def type_ok(value: Any, kind: Kind) -> bool:
    """Whether NeMo's value has the type NeMo's code needs (bools are not numbers)."""
    if kind == "floats":
        return isinstance(value, list) and all(type_ok(v, float) for v in value)
    if kind == "ints":
        return isinstance(value, list) and all(type_ok(v, int) for v in value)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is None:
        return False
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)  # type: ignore[arg-type]


def _describe(kind: Kind) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    lists = {"floats": "a list of numbers", "ints": "a list of integers", "strs": "a list of text"}
    return names.get(kind, lists.get(kind, str(kind)))  # type: ignore[call-overload]


def apply_rule(imp: Imported, path: str, value: Any, rule: Rule) -> None:
    """Map / note one NeMo key by its table rule (SPECIAL keys are handled elsewhere)."""
    stage = imp.stage or "?"
    if isinstance(rule, Map):
        target = rule.target.format(s=stage)
        if not type_ok(value, rule.kind):
            imp.error(path, target, f"needs {_describe(rule.kind)}, got {value!r}")
            return
        imp.put(target, list(value) if isinstance(value, tuple) else value, path, rule.note)
    elif isinstance(rule, Unmapped):
        imp.skip(path, rule.reason.format(value=value, stage=stage))
    elif isinstance(rule, Same):
        if value == rule.expected:
            imp.same(path, rule.reason)
        else:
            imp.skip(path, f"{value!r}: {rule.otherwise}")
