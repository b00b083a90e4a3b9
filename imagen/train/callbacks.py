"""Training callbacks: progress metrics and the loss history, sample grids on schedule, and the
per-rank key recorder that checks data parallelism.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from imagen.config import StageConfig
from imagen.mlops.tracking import StageRun
from imagen.train.grids import SampleGrid
from imagen.train.module import ImagenStage


class Progress(Callback):
    """Per-step learning rate, images/s and a loss history; sample grids; the checkpoint path.

    Every ``log_every_n_steps`` optimiser steps it logs ``train/loss_avg`` (the mean since the
    last log), ``train/lr`` and ``train/images_per_s`` (all ranks, sampling time excluded).
    """

    def __init__(
        self, stage: StageConfig, out: Path, grid: SampleGrid | None, run: StageRun
    ) -> None:
        self.stage, self.out, self.grid, self.run = stage, out, grid, run
        self.history: list[tuple[int, float]] = []  # (step, loss)
        self._losses: list[float] = []
        self._images = 0
        self._t_last = 0.0
        self._t_start = 0.0
        self.train_seconds = 0.0
        self.images = 0
        self.start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        self._t_start = self._t_last = time.perf_counter()
        self.start_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """The loss history travels in the checkpoint, so a resumed run's loss.csv is whole."""
        return {"history": [[s, v] for s, v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: ImagenStage, outputs: Any, batch: Any, idx: int
    ) -> None:
        n = batch["image"].shape[0] * trainer.world_size
        self._images += n
        self.images += n
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss.detach()))
        step = trainer.global_step
        every = self.stage.trainer.log_every_n_steps
        if self._losses and (step % every == 0 or step == trainer.max_steps):
            now = time.perf_counter()
            self.train_seconds += now - self._t_last
            avg = sum(self._losses) / len(self._losses)
            metrics = {
                "train/loss_avg": avg,
                "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
                "train/images_per_s": self._images / max(now - self._t_last, 1e-9),
            }
            if trainer.is_global_zero:
                self.history.append((step, avg))
                self.run.log_metrics(metrics, step=step)
            self._losses, self._images, self._t_last = [], 0, now
        if self.grid is not None and step % self.stage.trainer.sample_every_n_steps == 0:
            self.sample(trainer, pl_module)

    def sample(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        t0 = time.perf_counter()
        if trainer.is_global_zero and self.grid is not None:
            self.grid.write(pl_module, trainer.global_step, self.out, self.run)
        self._t_last += time.perf_counter() - t0  # sampling is not training time

    def on_train_end(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._t_last
        self._t_last = now


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (ranks of a DDP run must agree)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class KeyRecorder(Callback):
    """Writes ``ranks/rank<r>.json``: this rank's steps, the sample keys it trained on and a
    digest of its final weights (to check data parallelism: different data, same weights)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.keys: list[str] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: ImagenStage, batch: Any, idx: int
    ) -> None:
        self.keys.extend(str(k) for k in batch.get("key", []))

    def on_train_end(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        path = self.out / "ranks" / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "keys": self.keys,
            "weights": weights_digest(pl_module.net),
            "ema_weights": weights_digest(pl_module.ema.module),
        }
        path.write_text(json.dumps(info, indent=1))


class GridFromFirstBatch(Callback):
    """Takes the sample grid's prompts from the first training batch when no held-out
    examples were found."""

    def __init__(self, grid: SampleGrid) -> None:
        self.grid = grid

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: ImagenStage, batch: Any, idx: int
    ) -> None:
        if not self.grid.ready:
            self.grid.fill_from_batch(batch)
