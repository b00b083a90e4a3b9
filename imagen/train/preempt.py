"""Preemption: SIGTERM (SLURM, Kubernetes, torchrun) writes a checkpoint and stops the run.

The handler only raises a flag. On one process the flag is looked at after every optimiser step
(no device work); under DDP the ranks agree on it by a boolean all-reduce every
``log_every_n_steps`` steps (a collective and a host read there, none in the steps between;
a signalled run stops within that many steps), then all ranks call
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

    def __init__(self, path: Path, every: int = 1) -> None:
        self.path, self.every = path, max(1, every)
        self.requested = False
        self._previous: Any = None
        self._seen = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # replaces Lightning's own SIGTERM handler (set just before) for the training loop
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        self._seen = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        step = trainer.global_step
        if step == self._seen:  # a micro-batch that did not end an optimiser step
            return
        self._seen = step
        if trainer.world_size == 1:
            if not self.requested:
                return
        elif step % self.every or not trainer.strategy.reduce_boolean_decision(
            self.requested, all=False
        ):
            return
        if trainer.is_global_zero:
            print(
                f"imagen train: SIGTERM: writing {self.path} at step {step}",
                file=sys.stderr,
                flush=True,
            )
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume
        raise Preempted(step, self.path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before Lightning restores the handlers it found (after an exception, it alone does)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
