"""Train one cascade stage (``imagen train --stage base64|sr256|sr1024``) with Lightning.

The stage reads the encoded shards, trains the UNet of ``stages.<stage>.model`` inside its
diffusion preconditioning with AdamW + warm-up, clipping and an EMA of the weights, and writes
``model.pt``, ``checkpoints/``, ``metrics.json``, ``loss.csv`` and ``samples/`` to ``--out``
(default ``models/<stage>``). docs/training.md is the runbook: outputs, optimisation flags,
checkpoints and resuming, fine-tuning, preemption, multi-GPU and multi-node launches.

- :mod:`~imagen.train.module`: the LightningModule (:class:`ImagenStage`)
- :mod:`~imagen.train.trainer`: the Lightning Trainer of a stage
- :mod:`~imagen.train.checkpoints`: atomic checkpoint IO, names, what a file holds
- :mod:`~imagen.train.settings`: the state-relevant keys and the settings hash
- :mod:`~imagen.train.resume`: which checkpoint a re-run continues from
- :mod:`~imagen.train.keep`: the keeping rule as Lightning ModelCheckpoint callbacks
- :mod:`~imagen.train.finetune`: ``trainer.init_from`` (fine-tuning from other weights)
- :mod:`~imagen.train.preempt`: SIGTERM -> checkpoint -> exit 143
- :mod:`~imagen.train.callbacks`, :mod:`~imagen.train.grids`, :mod:`~imagen.train.logger`
- :mod:`~imagen.train.stage`: :func:`train_stage` and the CLI entry (``add_arguments``, ``main``)
"""

from __future__ import annotations

from imagen.train.callbacks import KeyRecorder, Progress, weights_digest
from imagen.train.checkpoints import LAST_CKPT, AtomicCheckpointIO, CheckpointWriteError
from imagen.train.grids import SampleGrid, grid_image
from imagen.train.logger import StageRunLogger
from imagen.train.module import (
    ImagenStage,
    NonFiniteLossError,
    ema_with_warmup,
    unused_parameters,
    update_ema,
)
from imagen.train.preempt import EXIT_PREEMPTED, Preempted
from imagen.train.resume import choose_resume
from imagen.train.settings import STATE_KEYS, settings_hash
from imagen.train.stage import add_arguments, main, train_stage, write_loss_csv
from imagen.train.trainer import build_trainer, lightning_precision

__all__ = [
    "LAST_CKPT",
    "EXIT_PREEMPTED",
    "STATE_KEYS",
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "ImagenStage",
    "KeyRecorder",
    "NonFiniteLossError",
    "Preempted",
    "Progress",
    "SampleGrid",
    "StageRunLogger",
    "add_arguments",
    "build_trainer",
    "choose_resume",
    "ema_with_warmup",
    "grid_image",
    "lightning_precision",
    "main",
    "settings_hash",
    "train_stage",
    "unused_parameters",
    "update_ema",
    "weights_digest",
    "write_loss_csv",
]
