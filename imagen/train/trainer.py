"""The Lightning Trainer of a stage: precision, clipping, DDP, checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger

from imagen.config import StageConfig
from imagen.train.checkpoints import AtomicCheckpointIO


def lightning_precision(precision: str) -> str:
    """NeMo's ``trainer.precision`` -> Lightning's: bf16 trains in bf16 autocast."""
    return {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}.get(precision, precision)


def build_trainer(
    stage: StageConfig,
    out: Path,
    callbacks: list[Callback],
    logger: Logger | bool = False,
) -> pl.Trainer:
    """The Lightning Trainer of a stage: precision, clipping, DDP, atomic checkpoints."""
    t = stage.trainer
    distributed = (t.devices == "auto" or int(t.devices) > 1) or t.num_nodes > 1
    strategy = t.strategy
    if strategy == "auto" and distributed:
        strategy = "ddp"
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        save_on_train_epoch_end=False,
    )
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
        callbacks=[checkpoint, *callbacks],
        plugins=[AtomicCheckpointIO()],
        logger=logger,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        use_distributed_sampler=False,  # webdataset splits shards by node and worker itself
    )
