"""Preemption: SIGTERM (SLURM, Kubernetes, torchrun) writes a checkpoint and stops the run.

The handler only raises a flag. At the end of the step in progress every rank learns whether
any rank was signalled (one boolean all-reduce per step), all ranks call
``trainer.save_checkpoint`` together (rank zero writes ``last.ckpt``, the others wait at its
barrier, so nobody runs into a collective while the file is written) and raise
:class:`Preempted`. The command then exits with :data:`EXIT_PREEMPTED` (143 = 128 + SIGTERM,
what a process killed by SIGTERM reports), which schedulers count as a failed attempt to retry:
Kubernetes restarts the pod (a ``podFailurePolicy`` rule on exit code 143 can mark it as a
disruption), torchrun restarts the worker group, SLURM requeues a ``--requeue`` job. The re-run
resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

EXIT_PREEMPTED = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM); its state is in ``path`` at ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class Preemption(Callback):
    """Turns SIGTERM into a checkpoint at the end of the current step (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # replaces Lightning's own SIGTERM handler (set just before) for the training loop
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        step = trainer.global_step
        if trainer.is_global_zero:
            print(
                f"imagen train: SIGTERM: writing {self.path} at step {step}",
                file=sys.stderr,
                flush=True,
            )
        trainer.save_checkpoint(self.path)
        raise Preempted(step, self.path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before Lightning restores the handlers it found (after an exception, it alone does)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
