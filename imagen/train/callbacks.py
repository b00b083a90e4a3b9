"""Training callbacks: progress metrics and the loss history, the monitored loss of the keeping
rule, sample grids on schedule, progress lines for logs, and the per-rank key recorder that
checks data parallelism.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar

from imagen.config import StageConfig
from imagen.mlops.tracking import StageRun
from imagen.train.grids import SampleGrid
from imagen.train.heldout import HeldoutLoss
from imagen.train.module import ImagenStage, full_tensor, local_shard


class DeviceMean:
    """A running mean of device scalars (non-finite ones left out), read from the device once
    by :meth:`read`: adding reads nothing."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, value: torch.Tensor) -> None:
        ok = torch.isfinite(value)
        v = torch.where(ok, value, 0.0)
        if self.sum is None or self.count is None:
            self.sum, self.count = v.clone(), ok.float()
        else:
            self.sum += v
            self.count += ok

    def read(self) -> float | None:
        """The mean (one host read; NaN when no value was finite), None when nothing was added;
        starts over."""
        if self.sum is None or self.count is None:
            return None
        value = (self.sum / self.count).item()
        self.sum = self.count = None
        return value


class Progress(Callback):
    """Per-step learning rate, images/s and a loss history; sample grids; the checkpoint path.

    Every ``log_every_n_steps`` optimiser steps it logs ``train/loss_avg`` (the mean loss since
    the last log), ``train/lr`` and ``train/images_per_s`` (all ranks, sampling time excluded).
    Every ``monitor_every`` steps it puts ``train/loss_avg`` (the mean of the last
    ``log_every_n_steps`` steps' losses, averaged over the ranks) where Lightning's checkpoint
    callbacks read their monitored metric. A step's loss is the mean over its micro-batches
    (``accumulate_grad_batches``), so neither depends on the accumulation. Losses stay on the
    device until a log step reads their mean.
    """

    def __init__(
        self,
        stage: StageConfig,
        out: Path,
        grid: SampleGrid | None,
        run: StageRun,
        monitor_every: int = 0,
        heldout: HeldoutLoss | None = None,
    ) -> None:
        self.stage, self.out, self.grid, self.run = stage, out, grid, run
        self.monitor_every = monitor_every
        self.heldout = heldout
        self._heldout_pending: list[tuple[int, torch.Tensor]] = []  # measured, not yet read
        self.heldout_last: dict[str, float] = {}  # the last held-out losses read
        self.history: list[tuple[int, float]] = []  # (step, loss)
        self._mean = DeviceMean()
        self._window: torch.Tensor | None = None  # (2, log_every_n_steps): losses, finite
        self._steps = 0
        self._seen = 0
        self._images = 0
        self._t_last = 0.0
        self._t_start = 0.0
        self.train_seconds = 0.0
        self.images = 0
        self.start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        self._t_start = self._t_last = time.perf_counter()
        self.start_step = self._seen = trainer.global_step
        every = self.stage.trainer.log_every_n_steps
        self._window = torch.zeros(2, every, device=pl_module.device)
        self._steps = 0

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
        step = trainer.global_step
        if step == self._seen:  # a micro-batch that did not end an optimiser step
            return
        self._seen = step
        loss = pl_module.step_loss
        if loss is not None:
            self._mean.add(loss)
            if self._window is not None:
                i = self._steps % self._window.shape[1]
                self._window[0, i] = torch.where(torch.isfinite(loss), loss, 0.0)
                self._window[1, i] = torch.isfinite(loss).float()
            self._steps += 1
        if self.monitor_every and step % self.monitor_every == 0:
            self.measure_heldout(trainer, pl_module, step)
            self.publish_monitor(trainer)
        every = self.stage.trainer.log_every_n_steps
        if step % every == 0 or step == trainer.max_steps:
            now = time.perf_counter()
            self.train_seconds += now - self._t_last
            avg = self._mean.read()  # the one host read of the losses
            metrics = {
                "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
                "train/images_per_s": self._images / max(now - self._t_last, 1e-9),
            }
            if avg is not None and math.isfinite(avg):
                metrics["train/loss_avg"] = avg
            if trainer.is_global_zero:
                if "train/loss_avg" in metrics:
                    self.history.append((step, avg))
                self.run.log_metrics(metrics, step=step)
            self.log_heldout(trainer)
            self._images, self._t_last = 0, now
        grid_every = self.stage.trainer.sample_every_n_steps
        sharded = getattr(pl_module, "sharded", False)  # every rank gathers rank zero's EMA
        if (self.grid is not None or sharded) and step % grid_every == 0:
            self.sample(trainer, pl_module)

    def measure_heldout(self, trainer: pl.Trainer, pl_module: ImagenStage, step: int) -> None:
        """The held-out loss per noise level, kept on the device until the next log step; as
        ``heldout/loss`` (its mean) where the checkpoint callbacks read their monitor."""
        if self.heldout is None:
            return
        t0 = time.perf_counter()
        losses = self.heldout.measure(pl_module)
        self._t_last += time.perf_counter() - t0  # measuring is not training time
        if losses is None:
            return
        self._heldout_pending.append((step, losses))
        trainer.callback_metrics["heldout/loss"] = losses.mean()

    def log_heldout(self, trainer: pl.Trainer) -> None:
        """Read the pending held-out losses (one host read each) and log them to the run."""
        if self.heldout is None:
            return
        for step, losses in self._heldout_pending:
            values = losses.tolist()
            metrics = dict(zip(self.heldout.names, values, strict=True))
            metrics["heldout/loss"] = sum(values) / len(values)
            self.heldout_last = {"step": step, **metrics}
            if trainer.is_global_zero:
                self.run.log_metrics(metrics, step=step)
        self._heldout_pending = []

    def publish_monitor(self, trainer: pl.Trainer) -> None:
        """``train/loss_avg`` for the best-k rule: the same value on every rank (a collective,
        so every rank calls it at the same steps)."""
        device = trainer.strategy.root_device  # NCCL reduces CUDA tensors only
        if self._window is None:
            local = torch.tensor(float("inf"), device=device)
        else:
            total, finite = self._window.sum(dim=1)
            local = torch.where(finite > 0, total / finite.clamp(min=1), float("inf"))
        value = trainer.strategy.reduce(local.to(device), reduce_op="mean")
        trainer.callback_metrics["train/loss_avg"] = torch.as_tensor(value).detach().cpu()

    def sample(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        t0 = time.perf_counter()
        held = getattr(pl_module, "sharded", False) and pl_module._ema_full is None
        if held:  # a collective: every rank comes here at the same steps
            pl_module.hold_full_ema(pl_module.ema_state_dict())
        try:
            if trainer.is_global_zero and self.grid is not None:
                self.grid.write(pl_module, trainer.global_step, self.out, self.run)
        finally:
            if held:
                pl_module.hold_full_ema(None)
        self._t_last += time.perf_counter() - t0  # sampling is not training time

    def on_train_end(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._t_last
        self._t_last = now
        self.log_heldout(trainer)


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (ranks of a DDP run must agree)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())  # sharded: the whole tensor (a collective: every rank calls it)
        h.update(full_tensor(v.detach()).float().cpu().numpy().tobytes())
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
            # the parameters this rank holds: all of them, or its shard (trainer.strategy fsdp)
            "parameters_held": sum(local_shard(p).numel() for p in pl_module.net.parameters()),
            "ema_parameters_held": sum(
                local_shard(p).numel() for p in pl_module.ema.module.parameters()
            ),
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


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LogLines(Callback):
    """One line every ``trainer.progress_seconds`` (rank zero) for logs that are not a terminal
    (``dvc repro``, Prefect, SLURM): step, mean loss, images/s and the time left."""

    def __init__(self, stage: StageConfig, stream: Any = None) -> None:
        self.stage, self.stream = stage, stream or sys.stderr
        self.every = stage.trainer.progress_seconds
        self._t = self._step = self._images = 0
        self._seen = 0
        self._mean = DeviceMean()

    def on_train_start(self, trainer: pl.Trainer, pl_module: ImagenStage) -> None:
        self._t, self._step, self._images = time.perf_counter(), trainer.global_step, 0
        self._seen = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: ImagenStage, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._images += batch["image"].shape[0] * trainer.world_size
        step = trainer.global_step
        if step == self._seen:  # a micro-batch that did not end an optimiser step
            return
        self._seen = step
        if pl_module.step_loss is not None:
            self._mean.add(pl_module.step_loss)
        now = time.perf_counter()
        if now - self._t >= self.every or step == trainer.max_steps:
            self.line(trainer, now, step)

    def line(self, trainer: pl.Trainer, now: float, step: int) -> None:
        dt, steps = max(now - self._t, 1e-9), max(step - self._step, 1)
        loss = self._mean.read()  # one host read a line
        loss = float("nan") if loss is None else loss
        left = (trainer.max_steps - step) * dt / steps
        low = self.stage.progressive_resolution(max(step - 1, 0))
        size = f" at {low} px" if low else ""
        if trainer.is_global_zero:
            print(
                f"imagen train {self.stage.name}: step {step}/{trainer.max_steps} "
                f"loss {loss:.4f} {self._images / dt:.1f} images/s{size} {_duration(left)} left",
                file=self.stream,
                flush=True,
            )
        self._t, self._step, self._images = now, step, 0


class StepBar(TQDMProgressBar):
    """Lightning's bar on a terminal, counting optimiser steps to max_steps (training is
    step-based: one endless epoch, so the default 'Epoch 0' bar has no total)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step
        bar.set_description(f"{trainer.lightning_module.stage.name} step")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        every = trainer.lightning_module.stage.trainer.log_every_n_steps
        if trainer.global_step % every == 0:  # the values logged there, nothing read between
            metrics = self.get_metrics(trainer, pl_module)
            progress = [c for c in trainer.callbacks if isinstance(c, Progress) and c.history]
            if progress:
                metrics["loss"] = f"{progress[0].history[-1][1]:.4f}"
            bar.set_postfix(metrics)
        bar.refresh()
