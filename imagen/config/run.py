"""The rest of params.yaml: trainer, sampling, data, evaluation, MLflow, and the resolved Params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from imagen.config.base import ConfigError, StageName
from imagen.config.base import Strict as _Strict
from imagen.config.model import ConditioningConfig, ModelConfig
from imagen.config.sampling import SamplerName, SamplingConfig

# --------------------------------------------------------------------------------------------
# trainer / optimiser / sampling
# --------------------------------------------------------------------------------------------


class OptimConfig(_Strict):
    """AdamW with linear warm-up (reference: lr 1e-4, betas 0.9/0.999, wd 0.01, 10k warm-up),
    then NeMo's constant rate (WarmupHoldPolicy) or, a departure, a cosine decay to
    ``decay_to`` x lr at the stage's ``max_steps``."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10000, ge=0)
    decay: Literal["none", "cosine"] = Field(
        "none", description="after warm-up: none (NeMo: hold the rate) or cosine to decay_to x lr"
    )
    decay_to: float = Field(0.1, ge=0, le=1, description="cosine decay's final rate / lr")


class KeepConfig(_Strict):
    """Which checkpoints are kept besides ``last.ckpt`` (NeMo keeps the best 5 every 1000 steps).

    Every ``every_n_steps`` (default: ``checkpoint_every_n_steps``) a checkpoint is written and
    the best ``top_k`` by ``monitor`` are kept; with ``archive_every_n_steps`` every n-th step is
    also kept for good. Nothing else is ever removed.
    """

    top_k: int = Field(2, ge=0, description="keep the best k checkpoints by monitor (0: none)")
    monitor: Literal["train/loss_avg", "train/loss", "heldout/loss"] = Field(
        "train/loss_avg",
        description="ranks the kept checkpoints (loss_avg: mean of the last "
        "log_every_n_steps steps over all ranks, NeMo's rule; loss: this step's; heldout/loss: "
        "the held-out denoising loss at fixed noise levels, trainer.heldout_loss)",
    )
    mode: Literal["min", "max"] = "min"
    every_n_steps: int | None = Field(None, gt=0, description="default: checkpoint_every_n_steps")
    archive_every_n_steps: int = Field(0, ge=0, description="also keep every n-th step (0: off)")


class HeldoutLossConfig(_Strict):
    """The held-out denoising loss: the stage's training loss on ``num`` held-out samples (the
    holdout split ingest wrote) at fixed noise levels ``sigmas`` with fixed noise, by the EMA
    weights, no text dropped; logged as ``heldout/loss`` (the mean over the levels) and
    ``heldout/loss_sigma_<s>`` at every best-k candidate step (``keep.every_n_steps``), where
    ``keep.monitor: heldout/loss`` ranks checkpoints by it. Measuring draws nothing from the
    training random streams, so training is the same with it on or off."""

    num: int = Field(16, ge=0, description="held-out samples (0: off)")
    sigmas: list[float] = Field(
        [0.05, 0.2, 1.0, 5.0, 20.0], min_length=1, description="the fixed noise levels (bands)"
    )

    @field_validator("sigmas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not s > 0 for s in v):
            raise ValueError(f"every noise level must be > 0, got {v}")
        return v


class ProgressiveConfig(_Strict):
    """Progressive resolution: the first ``steps`` optimiser steps train on the images
    downsampled (area average) to ``resolution``, the rest at the UNet's own size.

    The UNet is convolutional, so the same weights denoise both sizes; a 32 px step of a 64 px
    base stage costs about a quarter as much per image, and the layout, colours and positions
    the captions name are learned from those cheap images (docs/demo.md). NeMo trains at the
    full size only (null, the default).
    """

    resolution: int = Field(gt=0, description="training size of the first steps (px)")
    steps: int = Field(
        gt=0, description="optimiser steps at that size (all of them when >= max_steps)"
    )
    batch_size: int | None = Field(
        None,
        gt=0,
        description="batch of those steps (default: trainer.batch_size); the loader draws the "
        "larger of the two batches and the full-size steps use their first trainer.batch_size",
    )


class TrainerConfig(_Strict):
    """NeMo's ``trainer`` block plus what the stage runner needs."""

    precision: Literal["32", "bf16", "bf16-mixed", "16", "16-mixed", "32-true"] = "32"
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)
    accumulate_grad_batches: int = Field(1, gt=0)
    gradient_clip_val: float = Field(1.0, ge=0)
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, gt=0)
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="auto: one device, else DDP; ddp: DDP (weights replicated); fsdp: FSDP2, "
        "the UNet, its EMA, gradients and AdamW state sharded over the ranks (for 2b_res_64)",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes per rank (null: from the cores this process "
        "may use, shared by the ranks of a node, at most 8; 0: load in the training process)",
    )
    shuffle_buffer: int | None = Field(
        None,
        ge=0,
        description="samples in each loader stream's shuffle buffer (null: twice "
        "data.samples_per_shard, so consecutive shards mix; 0 or 1: no buffer)",
    )
    allow_tf32: bool | None = Field(
        None,
        description="TF32 matmuls and convolutions on CUDA (NeMo's top-level allow_tf32, true "
        "in its configs); null: PyTorch's defaults. No effect on the CPU",
    )
    benchmark: bool | None = Field(
        None,
        description="cudnn.benchmark: time the convolution kernels per input shape and keep the "
        "fastest (NeMo's trainer.benchmark); null: PyTorch's default (off)",
    )
    crops_per_image: int = Field(
        1,
        gt=0,
        description="random crops taken from each decoded image (SR stages trained on crops: "
        "decoding a 1024 px image costs more than training on one 64 px crop of it)",
    )
    progressive: ProgressiveConfig | None = Field(
        None,
        description="train the first steps on downsampled images (base stages; NeMo: null)",
    )
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(
        False,
        description="EMA decay min(ema_decay, (1+n)/(10+n)) after n updates instead of NeMo's "
        "fixed decay, so a short run's EMA is not its random initialisation",
    )
    checkpoint_every_n_steps: int = Field(200, gt=0)
    sample_every_n_steps: int = Field(500, gt=0)
    log_every_n_steps: int = Field(10, gt=0)
    progress_seconds: float = Field(
        30.0, gt=0, description="seconds between progress lines when not on a terminal"
    )
    nan_policy: Literal["stop", "skip"] = "stop"
    sample_grid_size: int = Field(8, gt=0, description="images in each training sample grid")
    sample_prompts: list[str] = Field(
        default_factory=list, description="grid prompts (default: held-out captions)"
    )
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    keep: KeepConfig = KeepConfig()
    heldout_loss: HeldoutLossConfig = HeldoutLossConfig()
    init_from: str | None = Field(
        None,
        description="fine-tune: start from these weights (a stage .ckpt or model.pt, a folder "
        "holding model.pt, models:/name@alias, a NeMo .nemo/.ckpt) with a fresh optimiser",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _str_precision(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _heldout_monitor(self) -> TrainerConfig:
        if self.keep.monitor == "heldout/loss" and self.heldout_loss.num == 0:
            raise ValueError(
                "keep.monitor heldout/loss needs the held-out loss: heldout_loss.num is 0"
            )
        return self


# NeMo's inference defaults per stage (conf/inference_pipeline.yaml): (steps, guidance scale)
NEMO_INFERENCE: dict[str, tuple[int, float]] = {
    "base64": (30, 7.5),
    "sr256": (20, 8.0),
    "sr1024": (20, 7.5),
}


class StageConfig(_Strict):
    """One cascade stage, resolved: the shared defaults merged under the stage's own keys."""

    name: str
    resolution: int = Field(gt=0, description="output resolution of the stage (64/256/1024)")
    lowres: int | None = Field(None, description="resolution of the conditioning image (SR)")
    model: ModelConfig
    trainer: TrainerConfig = TrainerConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="before")
    @classmethod
    def _nemo_inference_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("sampling", {}), Mapping):
            steps, scale = NEMO_INFERENCE.get(data.get("name", ""), (30, 7.5))
            sampling = {"steps": steps, "guidance_scale": scale, **(data.get("sampling") or {})}
            data = {**data, "sampling": sampling}
        return data

    @model_validator(mode="after")
    def _progressive_fits(self) -> StageConfig:
        p = self.trainer.progressive
        if p is None:
            return self
        key = "trainer.progressive"
        if self.model.is_sr:
            raise ValueError(
                f"{key}: only a base stage trains on whole downsampled images; an SR stage's "
                "low-res input is fixed by its cascade"
            )
        size, levels = self.model.unet.image_size, len(self.model.unet.channel_mult)
        step = 2 ** (levels - 1)
        if p.resolution >= size or size % p.resolution or p.resolution % step:
            raise ValueError(
                f"{key}.resolution: {p.resolution} must be smaller than the UNet's image_size "
                f"{size}, divide it, and be a multiple of {step} (its {levels} levels halve it "
                f"{levels - 1} times)"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_supported(self) -> StageConfig:
        if self.trainer.strategy != "fsdp":
            return self
        if self.trainer.precision in ("16", "16-mixed"):
            raise ValueError(
                f"trainer.strategy fsdp with trainer.precision {self.trainer.precision}: fp16's "
                "gradient scaler is not supported on sharded gradients; use bf16 or 32"
            )
        if self.model.inductor:
            raise ValueError(
                "trainer.strategy fsdp with model.inductor true: compiling a sharded UNet is "
                "not supported; set model.inductor false"
            )
        return self

    def progressive_resolution(self, step: int) -> int | None:
        """The size optimiser step ``step`` trains at when it is not the UNet's own, else None."""
        p = self.trainer.progressive
        return p.resolution if p is not None and step < p.steps else None

    def step_batch_size(self, step: int) -> int:
        """Images optimiser step ``step`` trains on (the progressive batch during its steps)."""
        p = self.trainer.progressive
        if p is not None and p.batch_size and step < p.steps:
            return p.batch_size
        return self.trainer.batch_size

    @property
    def loader_batch_size(self) -> int:
        """Images per loader batch: the larger of the full-size and progressive batches."""
        p = self.trainer.progressive
        extra = p.batch_size if p is not None and p.batch_size else 0
        return max(self.trainer.batch_size, extra)

    @model_validator(mode="after")
    def _auto_sampler(self) -> StageConfig:
        if self.sampling.sampler == "auto":
            kind = "heun" if self.model.preconditioning_type == "EDM" else "ddpm"
            object.__setattr__(self, "sampling", self.sampling.model_copy(update={"sampler": kind}))
        return self


# --------------------------------------------------------------------------------------------
# data / evaluation / tracking
# --------------------------------------------------------------------------------------------
class DataConfig(_Strict):
    """Where ingest reads from and how it writes shards."""

    source: Literal["embedded", "folder", "webdataset"] = "embedded"
    source_path: str | list[str] | None = Field(
        None,
        description="folder: a folder of images; webdataset: tar shards as a folder, glob, "
        "brace pattern or URL, NeMo wdinfo .pkl files (their tar_files), or a list of these",
    )
    source_root: str | None = Field(
        None,
        description="NeMo's local_root_path: the folder a wdinfo .pkl's tar_files are relative "
        "to (default: the .pkl's own folder)",
    )
    num_train: int = Field(2048, gt=0, description="embedded: training samples")
    num_holdout: int = Field(256, ge=0, description="embedded: held-out captions/images")
    image_size: int = Field(256, gt=0, le=4096, description="stored image size")
    min_resolution: int = Field(32, gt=0)
    samples_per_shard: int = Field(256, gt=0)
    pyramid: list[int] = Field(
        default_factory=lambda: [64, 256],
        description="also store copies at these sizes (keys <size>.png / <size>.jpg) so a stage "
        "decodes only the resolution it trains on, not the full image",
    )
    max_caption_chars: int = Field(512, gt=0)
    seed: int = 0
    shards_dir: str = "data/shards"
    encoded_dir: str = "data/encoded"


class EvaluateConfig(_Strict):
    """FID-CLIP sweep (NeMo's guidance scales by default)."""

    guidance_scales: list[float] = Field(
        default_factory=lambda: [1, 1.5, 2, 3, 4, 5, 6, 7], min_length=1
    )
    num_images: int = Field(64, gt=0)
    batch_size: int = Field(32, gt=0)
    depth: StageName = "base64"
    inception_path: str | None = None
    clip_path: str | None = None
    reports_dir: str = "reports"
    seed: int = 1234
    steps: int | None = Field(None, gt=0, description="sweep sampling steps (None: the stage's)")
    tradeoff_tolerance: float = Field(
        0.25,
        ge=0.0,
        description="best point: the best-aligned scale whose fidelity distance is within "
        "this share of the lowest (0.25: at most 25% worse)",
    )
    tradeoff_margin: float = Field(
        0.0,
        ge=0.0,
        description="best point: alignments within this margin of the highest eligible one "
        "count as equal, and the lowest fidelity distance among them wins (0: the highest)",
    )
    grid_images: int = Field(16, ge=0, description="images per guidance scale in its grid")
    cascade_prompts: int = Field(4, ge=0, description="prompts in the full-cascade grid (0: off)")
    cascade_steps: int | None = Field(None, gt=0, description="steps per stage for that grid")
    sampler: SamplerName | None = Field(
        None, description="sweep sampler (None: each stage's own sampling.sampler)"
    )
    sr_pairs: int = Field(
        8, ge=0, description="held-out pairs per SR stage scored against bicubic (0: off)"
    )
    sr_tiles: int = Field(
        256,
        ge=0,
        description="more pairs where needed so each SR stage's Frechet distance sees at least "
        "this many 64 px tiles (sr256: 16 a picture, sr1024: 256)",
    )
    guide: str | None = Field(
        None,
        description="autoguidance beside CFG in the sweep: the base64 guide (a model.pt, a "
        "training checkpoint .ckpt or a models:/ URI; None: CFG only)",
    )
    guide_scales: list[float] | None = Field(
        None, min_length=1, description="autoguidance scales swept (None: guidance_scales)"
    )


class EvaluatorConfig(_Strict):
    """``imagen evaluator``: the offline image-text dual encoder trained on the training split
    (imagen.evaluate.dual), which gives the sweep its Frechet features and alignment scores for
    any data set when no Inception / CLIP weights are configured."""

    steps: int = Field(400, gt=0, description="optimiser steps (batches of batch_size pairs)")
    batch_size: int = Field(64, gt=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    resolution: int = Field(64, gt=0, description="image size the image tower reads")
    width: int = Field(16, ge=8, description="channels of the image tower's first conv")
    embed_dim: int = Field(128, gt=0, description="joint embedding size")
    max_images: int = Field(20000, gt=0, description="training pairs read at most")
    quality_pairs: int = Field(
        512, gt=1, description="held-out real pairs its own quality is measured on, at most"
    )
    seed: int = 0
    out_dir: str | None = Field(
        None, description="where evaluator.pt is written (default: <models_dir>/evaluator)"
    )


class SampleConfig(_Strict):
    """``imagen sample`` defaults, as NeMo's inference_pipeline.yaml sets them; the command's
    options override them."""

    prompts: list[str] = Field(
        default_factory=list, description="prompts used when none is given (NeMo: texts)"
    )
    num_images: int = Field(
        1, gt=0, description="images per prompt, each with its own seed (num_images_per_promt)"
    )
    output_res: int | None = Field(
        None,
        gt=0,
        description="stop the cascade at the stage of this resolution (NeMo: "
        "target_resolution); None: the last stage loaded",
    )
    out_dir: str = Field("samples", description="output folder (NeMo: output_path)")
    precision: Literal["auto", "32", "bf16"] = Field(
        "auto",
        description="sampling, the cascade and evaluate: the networks in bf16 autocast (bf16) or "
        "fp32 (32); auto: bf16 on CUDA, fp32 elsewhere (also the training grids)",
    )

    def bf16_on(self, device_type: str) -> bool:
        """Whether the networks sample in bf16 autocast on a device of this type."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite")
    experiment: str = "imagen"
    register_models: bool = True
    model_alias: str = Field(
        "champion",
        description="the champion alias: moved to a new cascade only on evidence (promote); "
        "every new version is 'challenger'",
    )
    promote: Literal["evidence", "always", "never"] = Field(
        "evidence",
        description="evidence: champion moves when the new cascade is at least as good on "
        "`selection` under the same evaluation settings; always / never",
    )
    selection: Literal["alignment", "fidelity"] = Field(
        "alignment",
        description="the selection metric at the sweep's best point: alignment (higher is "
        "better) or fidelity distance (lower is better)",
    )
    system_metrics: bool = Field(
        True, description="MLflow system metrics (CPU, memory, GPU) on training runs"
    )


class StageOverride(_Strict):
    """What params.yaml may say under ``stages.<name>`` before merging with the defaults."""

    resolution: int | None = None
    lowres: int | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    trainer: dict[str, Any] = Field(default_factory=dict)
    sampling: dict[str, Any] = Field(default_factory=dict)


class Params(BaseModel):
    """The whole of params.yaml, resolved: ``params.stages["base64"]`` is a StageConfig."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig]
    evaluate: EvaluateConfig = EvaluateConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    sample: SampleConfig = SampleConfig()
    mlflow: MlflowConfig = MlflowConfig()
    models_dir: str = "models"
    # the own_data keys applied (dotted key -> value; data.source is not the embedded demo's),
    # and what they held in params.yaml before own_data replaced them
    _own_data: dict[str, Any] = PrivateAttr(default_factory=dict)
    _own_replaced: dict[str, Any] = PrivateAttr(default_factory=dict)

    def own_data_note(self, stage: str | None = None) -> str | None:
        """A line saying which own_data keys replaced the demo's (with ``stage``: those that
        reach that stage)."""
        keys = {
            k: v
            for k, v in self._own_data.items()
            if stage is None or not k.startswith("stages.") or k.startswith(f"stages.{stage}.")
        }
        if not keys:
            return None
        r = self._own_replaced
        told = ", ".join(f"{k}={v}" + (f" (not {r[k]})" if k in r else "") for k, v in keys.items())
        return (f"data.source is {self.data.source!r}, so params.yaml's own_data recipe replaces "
                f"the demo's values: {told}; change them for your data as own_data.<key> "
                "(`dvc exp run -S own_data.stages...`; docs/own_data.md)")  # fmt: skip

    @property
    def conditioning(self) -> ConditioningConfig:
        """Text conditioning shared by all stages (precache writes one set of embeddings)."""
        return next(iter(self.stages.values())).model.conditioning

    @property
    def evaluator_dir(self) -> str:
        """Where the offline evaluator (``imagen evaluator``) is written and read."""
        return self.evaluator.out_dir or f"{self.models_dir}/evaluator"

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ConfigError(f"stages.{name}: unknown stage; allowed: {sorted(self.stages)}")
        return self.stages[name]
