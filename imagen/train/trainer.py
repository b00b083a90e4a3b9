"""The Lightning Trainer of a stage: precision, clipping, DDP, checkpointing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.strategies import ModelParallelStrategy, Strategy

from imagen.config import StageConfig
from imagen.train.callbacks import StepBar
from imagen.train.checkpoints import LAST_CKPT, AtomicCheckpointIO
from imagen.train.keep import keeping_callbacks
from imagen.train.preempt import Preemption
from imagen.train.quiet import quiet_lightning


def lightning_precision(precision: str) -> str:
    """NeMo's ``trainer.precision`` -> Lightning's: bf16 trains in bf16 autocast."""
    return {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}.get(precision, precision)


@contextmanager
def tf32(allow: bool | None) -> Iterator[None]:
    """``trainer.allow_tf32`` (NeMo's ``allow_tf32``): TF32 in CUDA matmuls and cuDNN
    convolutions while the block runs, PyTorch's settings restored after; None changes nothing.
    TF32 keeps fp32's range with a 10-bit mantissa; the CPU has no TF32 and is unaffected."""
    if allow is None:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


class ShardedDataParallel(ModelParallelStrategy):
    """``trainer.strategy: fsdp``: FSDP2 (``fully_shard``) over every rank, no tensor
    parallelism; the module shards itself in ``configure_model``. Checkpoints are whole
    (gathered on rank zero into one file, like DDP's), so resume checks, the keeping rule and
    a resume under another strategy or number of ranks work as they do unsharded."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def build_trainer(
    stage: StageConfig,
    out: Path,
    callbacks: list[Callback],
    logger: Logger | bool = False,
    *,
    terminal: bool | None = None,
) -> pl.Trainer:
    """The Lightning Trainer of a stage: precision, clipping, DDP, the keeping rule's atomic
    checkpoints in ``out/checkpoints``, SIGTERM -> checkpoint; a step bar on a terminal."""
    quiet_lightning()
    t = stage.trainer
    distributed = (t.devices == "auto" or int(t.devices) > 1) or t.num_nodes > 1
    strategy: str | Strategy = t.strategy
    if strategy == "auto" and distributed:
        strategy = "ddp"
    elif strategy == "fsdp":
        strategy = ShardedDataParallel()
    folder = out / "checkpoints"
    terminal = sys.stderr.isatty() if terminal is None else terminal
    bar: list[Callback] = [StepBar()] if terminal else []
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=lightning_precision(t.precision),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        benchmark=t.benchmark,  # NeMo's trainer.benchmark (cudnn.benchmark); None: unchanged
        callbacks=[
            *keeping_callbacks(stage, folder),
            *callbacks,
            *bar,
            Preemption(folder / LAST_CKPT, every=t.log_every_n_steps),
        ],
        plugins=[AtomicCheckpointIO()],
        logger=logger,
        enable_progress_bar=terminal,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        use_distributed_sampler=False,  # webdataset splits shards by node and worker itself
    )
