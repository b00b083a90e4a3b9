"""Train one cascade stage (``imagen train --stage base64|sr256|sr1024``) with Lightning.

The stage reads the encoded shards, trains the UNet of ``stages.<stage>.model`` inside its
diffusion preconditioning with AdamW + warm-up, clipping and an EMA of the weights, and writes
``model.pt``, ``checkpoints/``, ``metrics.json``, ``loss.csv`` and ``samples/`` to ``--out``
(default ``models/<stage>``). docs/training.md is the runbook: outputs, optimisation flags,
checkpoints and resuming, fine-tuning, preemption, multi-GPU and multi-node launches.

- :mod:`~imagen.train.module`: the LightningModule (:class:`ImagenStage`)
- :mod:`~imagen.train.trainer`: the Lightning Trainer of a stage
- :mod:`~imagen.train.checkpoints`: atomic checkpoint IO and the resume decision
- :mod:`~imagen.train.callbacks`, :mod:`~imagen.train.grids`, :mod:`~imagen.train.logger`
- :mod:`~imagen.train.stage`: :func:`train_stage` and the CLI entry (``add_arguments``, ``main``)
"""

from __future__ import annotations

from imagen.train.callbacks import KeyRecorder, Progress, weights_digest
from imagen.train.checkpoints import LAST_CKPT, AtomicCheckpointIO, resume_path
from imagen.train.grids import SampleGrid, grid_image
from imagen.train.logger import StageRunLogger
from imagen.train.module import ImagenStage, NonFiniteLossError, ema_with_warmup
from imagen.train.stage import add_arguments, main, train_stage, write_loss_csv
from imagen.train.trainer import build_trainer, lightning_precision

__all__ = [
    "LAST_CKPT",
    "AtomicCheckpointIO",
    "ImagenStage",
    "KeyRecorder",
    "NonFiniteLossError",
    "Progress",
    "SampleGrid",
    "StageRunLogger",
    "add_arguments",
    "build_trainer",
    "ema_with_warmup",
    "grid_image",
    "lightning_precision",
    "main",
    "resume_path",
    "train_stage",
    "weights_digest",
    "write_loss_csv",
]
