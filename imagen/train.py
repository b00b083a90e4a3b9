"""Train one cascade stage (``imagen train --stage base64|sr256|sr1024``) with Lightning.

The stage reads the encoded webdataset shards (:class:`imagen.data.loader.ImagenDataModule`),
trains the UNet of ``stages.<stage>.model`` inside its diffusion preconditioning
(:func:`imagen.diffusion.build_denoiser`) with AdamW + linear warm-up, gradient clipping and an
EMA of the weights (``torch.optim.swa_utils.AveragedModel``), and writes to ``--out``
(default ``models/<stage>``)::

    model.pt              final EMA weights + stage config (imagen.checkpoint.save_stage)
    checkpoints/last.ckpt training state (weights, EMA, optimiser, schedule, loops), atomic
    metrics.json          final loss, steps, images/s, wall time (for `dvc metrics`)
    samples/step_*.png    sample grids of fixed prompts with the EMA weights
    mlflow_run.json       the MLflow run id (a restarted run continues it)

Training optimisations (NeMo's table), each by its own key:

- data parallelism: ``trainer.devices`` / ``trainer.num_nodes`` > 1 use Lightning's "ddp"
  strategy; every rank reads different shards (webdataset split by node and worker).
- activation checkpointing: ``model.unet.gradient_checkpointing=true``.
- bfloat16: ``trainer.precision=bf16`` (Lightning "bf16-mixed"; also works on the CPU).
- flash attention: ``model.unet.flash_attention=true`` (inside the UNet's attention).
- channels last: ``model.channels_last=true`` (the UNet and the image batches).
- inductor: ``model.inductor=true`` (``torch.compile`` of the UNet).

Fault tolerance: a checkpoint is written every ``trainer.checkpoint_every_n_steps`` and at the
end, to a temporary file renamed over the old one, so a killed run never leaves a half-written
checkpoint to resume from. Re-running the same command resumes from ``checkpoints/last.ckpt``
(step counter, optimiser, EMA, learning-rate schedule) and continues the same MLflow run.
Checkpoints hold only tensors and plain types and are loaded with ``weights_only=True``. A
non-finite loss stops the run naming the step and the last good checkpoint
(``trainer.nan_policy=stop``) or skips the batch and counts it (``nan_policy=skip``).

Multi-GPU and multi-node runs use Lightning's own launchers. On one node with 8 GPUs::

    imagen train --stage base64 -S trainer.devices=8 -S trainer.precision=bf16

Across nodes with torchrun (run on every node; node 0's address as the rendezvous)::

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK \\
        --master-addr=$MASTER_ADDR --master-port=29500 -m imagen.cli train --stage base64 \\
        -S trainer.devices=8 -S trainer.num_nodes=2 -S trainer.precision=bf16

Under SLURM (Lightning reads the SLURM environment; one task per GPU)::

    #SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
    srun python -m imagen.cli train --stage base64 \\
        -S trainer.devices=8 -S trainer.num_nodes=2 -S trainer.precision=bf16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.optim.swa_utils import AveragedModel

from imagen.checkpoint import atomic_torch_save, save_stage
from imagen.config import ConfigError, Params, StageConfig
from imagen.images import image_grid, side_by_side, to_pil
from imagen.mlops.tracking import StageRun, stage_run

LAST_CKPT = "last.ckpt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite and ``trainer.nan_policy`` is ``stop``."""


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------
def ema_with_warmup(decay: float):
    """An ``AveragedModel`` averaging function: EMA with decay ``min(decay, (1+n)/(10+n))``.

    After n updates a fixed decay d still holds d^n of the initial weights (0.995^300 = 22%),
    so a short run's EMA would look half-untrained; the warm-up (as in many diffusion codebases)
    lets the EMA follow the weights early and reach ``decay`` after ~10/(1-decay) steps.
    """

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


class ImagenStage(pl.LightningModule):
    """One cascade stage: UNet inside its diffusion preconditioning, plus an EMA of the UNet.

    ``training_step`` draws the classifier-free-guidance text drop (``drop_rate``) and, for SR
    stages, noise-augments the low-res input at a random level passed as ``aug_level``.
    """

    def __init__(self, stage: StageConfig) -> None:
        super().__init__()
        from imagen.diffusion.denoiser import build_denoiser
        from imagen.nn import build_unet

        self.stage = stage
        net = build_unet(stage.model)
        self.denoiser = build_denoiser(stage.model, net)
        # EMA of the UNet weights (and buffers): w_ema <- d_n * w_ema + (1 - d_n) * w, with the
        # decay warmed up so a short run's EMA is not dominated by its random initialisation.
        self.ema = AveragedModel(
            net, multi_avg_fn=ema_with_warmup(stage.trainer.ema_decay), use_buffers=True
        )
        self.ema.requires_grad_(False)
        if stage.model.inductor:
            net.compile()  # in place: the state dict keeps its keys
        self.skipped_nonfinite = 0
        self._skipped = False

    @property
    def net(self) -> torch.nn.Module:
        return self.denoiser.net

    # ----------------------------------------------------------------------------- training
    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The network's conditioning for a training batch (text drop, augmented low-res)."""
        from imagen.diffusion.guidance import drop_mask
        from imagen.diffusion.noise_aug import lowres_condition

        image = batch["image"]
        cond: dict[str, Any] = {
            "text_embed": batch["text_embed"].float(),
            "text_mask": batch["text_mask"].bool(),
            "drop_text": drop_mask(
                image.shape[0], self.stage.model.conditioning.drop_rate, device=image.device
            ),
        }
        if self.stage.model.is_sr:
            lowres = batch["lowres"]
            if self.stage.model.channels_last:
                lowres = lowres.contiguous(memory_format=torch.channels_last)
            cond["lowres"], cond["aug_level"] = lowres_condition(
                lowres, self.stage.model.noise_cond_aug, training=True
            )
        return cond

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        x0 = batch["image"]
        if self.stage.model.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = self.denoiser.loss(x0, self.condition(batch))
        bad = not bool(torch.isfinite(loss.detach()).all())
        # every rank must take the same decision, or DDP would wait forever
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            step = self.trainer.global_step
            if self.stage.trainer.nan_policy == "stop":
                where = self.last_good_checkpoint() or "none (no checkpoint was written yet)"
                raise NonFiniteLossError(
                    f"step {step}: the training loss is {loss.item()} (not finite); stopping "
                    f"(trainer.nan_policy=stop). Last good checkpoint: {where}"
                )
            self.skipped_nonfinite += 1
            self._skipped = True
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), logger=True)
            # no backward: no weight or EMA update (Lightning still counts the step)
            return None
        self._skipped = False
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA after every optimiser step, before any callback (a checkpoint) sees the step
        if not self._skipped:
            self.ema.update_parameters(self.net)

    def last_good_checkpoint(self) -> str | None:
        """The newest checkpoint written by this run, else the one it resumed from."""
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and ckpt.last_model_path and Path(ckpt.last_model_path).is_file():
            return ckpt.last_model_path
        return self.trainer.ckpt_path

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.stage.trainer.optim
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
        )
        # linear warm-up from lr/warmup to lr over warmup_steps optimiser steps, then constant
        warmup = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["imagen"] = {
            "stage": self.stage.model_dump(mode="json"),
            "skipped_nonfinite": int(self.skipped_nonfinite),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(checkpoint.get("imagen", {}).get("skipped_nonfinite", 0))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA UNet's weights, keyed like the UNet itself."""
        return {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def ema_denoiser(self) -> torch.nn.Module:
        from imagen.diffusion.denoiser import build_denoiser

        return build_denoiser(self.stage.model, self.ema.module).eval()


# --------------------------------------------------------------------------------------------
# Checkpoint IO, logging, sample grids
# --------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through a temporary file + ``os.replace``; reads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class StageRunLogger(Logger):
    """Lightning logger that forwards metrics to the stage's MLflow run (rank zero only)."""

    def __init__(self, run: StageRun) -> None:
        super().__init__()
        self.run = run

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run.run_id or "local"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the whole resolved config is logged when the run starts

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


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


class SampleGrid:
    """Fixed prompts (and, for SR stages, fixed low-res inputs) sampled with the EMA weights.

    Prompts and images are the first ``trainer.sample_grid_size`` held-out examples (center
    crops, the SR stages' low-res input downsampled from the real held-out image), or
    ``trainer.sample_prompts`` for the base stage; without held-out shards, the first training
    batch. Samples have the UNet's training size (the crop size for SR stages).
    """

    def __init__(self, params: Params, stage: StageConfig) -> None:
        self.params, self.stage = params, stage
        self.captions: list[str] = []
        self.text_embed: torch.Tensor | None = None
        self.text_mask: torch.Tensor | None = None
        self.lowres: torch.Tensor | None = None
        self.real: torch.Tensor | None = None
        self._evaluator: Any = None
        self._scored_step = -1
        n = stage.trainer.sample_grid_size
        prompts = list(stage.trainer.sample_prompts)
        if prompts and not stage.model.is_sr:
            from imagen.text import load_text_encoder

            self.captions = prompts[:n]
            encoder = load_text_encoder(stage.model.conditioning)
            self.text_embed, self.text_mask = encoder.encode(self.captions)
            return
        from imagen.data.loader import holdout_batches

        try:
            batches = holdout_batches(params, n, stage)
        except ConfigError:  # no held-out shards: the first training batch is used
            batches = []
        if batches:
            self.fill_from_batch(batches[0])

    @property
    def ready(self) -> bool:
        return self.text_embed is not None and (
            not self.stage.model.is_sr or self.lowres is not None
        )

    def fill_from_batch(self, batch: dict[str, Any]) -> None:
        """Take the grid's prompts (and low-res inputs) from a batch."""
        n = self.stage.trainer.sample_grid_size
        self.captions = list(batch["caption"][:n])
        self.text_embed = batch["text_embed"][:n].detach().float().cpu()
        self.text_mask = batch["text_mask"][:n].detach().bool().cpu()
        if self.stage.model.is_sr:
            self.lowres = batch["lowres"][:n].detach().float().cpu()
            self.real = batch["image"][:n].detach().float().cpu()

    @torch.no_grad()
    def images(self, module: ImagenStage, seed: int = 0) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1], sampled with the EMA weights (S = the UNet's image_size)."""
        from imagen.diffusion import sample
        from imagen.diffusion.noise_aug import lowres_condition

        assert self.text_embed is not None and self.text_mask is not None
        device = module.device
        cond: dict[str, Any] = {
            "text_embed": self.text_embed.to(device),
            "text_mask": self.text_mask.to(device),
        }
        if self.stage.model.is_sr:
            assert self.lowres is not None
            g = torch.Generator().manual_seed(seed)
            lowres, level = lowres_condition(
                self.lowres, self.stage.model.noise_cond_aug, training=False, generator=g
            )
            cond["lowres"], cond["aug_level"] = lowres.to(device), level.to(device)
        size = self.stage.model.unet.image_size
        shape = (len(self.captions), self.stage.model.unet.channels, size, size)
        return (
            sample(module.ema_denoiser(), shape, cond, self.stage.sampling, seed=seed).float().cpu()
        )

    def write(self, module: ImagenStage, step: int, out: Path, run: StageRun) -> Path | None:
        """Sample, save ``samples/step_<step>.png`` (captions under the images), log it."""
        if not self.ready:
            return None
        was_training = module.training
        module.eval()
        try:
            x = self.images(module)
        finally:
            module.train(was_training)
        path = out / "samples" / f"step_{step:07d}.png"
        show = 16  # the picture shows the first 16; all of them are scored
        columns = [self.lowres, x, self.real] if self.stage.model.is_sr else [x]
        columns = [c[:show] if c is not None else None for c in columns]
        grid = grid_image(columns, self.captions[:show])
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        run.log_artifact(path, "samples")
        if not self.stage.model.is_sr:
            self.score(x, step, out, run)
        return path

    def score(self, x: torch.Tensor, step: int, out: Path, run: StageRun) -> dict[str, float]:
        """Caption agreement of the base stage's samples, attribute by attribute, when the
        prompts speak the embedded dataset's grammar (logged as ``samples/<attribute>`` and
        appended to ``agreement.csv``): how well the model follows its captions, over time."""
        from imagen.embedded.evaluator import EmbeddedEvaluator, parse_caption

        attrs = [parse_caption(c) for c in self.captions]
        if not any(attrs) or step == self._scored_step:  # the end grid may repeat a step
            return {}
        self._scored_step = step
        if self._evaluator is None:
            self._evaluator = EmbeddedEvaluator()
        scores = self._evaluator.score(x, attrs)
        metrics = {
            f"samples/{k}": float(torch.nanmean(v.float())) for k, v in scores.items() if v.numel()
        }
        metrics = {k: v for k, v in metrics.items() if v == v}  # attributes no caption names
        run.log_metrics(metrics, step)
        table = out / "agreement.csv"
        keys = sorted(metrics)
        if not table.exists():
            table.write_text(",".join(["step", *(k.split("/")[1] for k in keys)]) + "\n")
        with table.open("a") as f:
            f.write(",".join([str(step), *(f"{metrics[k]:.4f}" for k in keys)]) + "\n")
        return metrics


def grid_image(images: list[torch.Tensor | None], captions: list[str], cols: int = 4) -> Any:
    """A sheet of cells with the caption under each; a cell shows the i-th image of every
    tensor in ``images`` side by side (SR: low-res input, sample, real image)."""
    parts = [t for t in images if t is not None]
    cell = max(max(t.shape[-1] for t in parts), 96)
    cells = [side_by_side([to_pil(t[i]) for t in parts], cell) for i in range(parts[0].shape[0])]
    return image_grid(cells, captions, cols=max(1, min(cols, len(cells))), cell=cell)


# --------------------------------------------------------------------------------------------
# Trainer setup and the stage entry point
# --------------------------------------------------------------------------------------------
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


# Keys that may change between a checkpoint and its resumption: how long and how often, not what.
_RESUMABLE_CHANGES = {
    "trainer.max_steps",
    "trainer.checkpoint_every_n_steps",
    "trainer.sample_every_n_steps",
    "trainer.log_every_n_steps",
}


def resume_path(out: Path, stage: StageConfig | None = None) -> Path | None:
    """The checkpoint a re-run continues from (``checkpoints/last.ckpt``), if any.

    With ``stage``, a checkpoint written under another stage config (a DVC param change, say a
    new learning rate or UNet preset; only the keys in ``_RESUMABLE_CHANGES`` and ``sampling``
    may differ) is set aside as ``last.ckpt.stale`` and training starts from scratch.
    """
    last = out / "checkpoints" / LAST_CKPT
    if not last.is_file():
        return None
    if stage is None:
        return last
    from contextlib import suppress

    from imagen.config import flatten

    saved = torch.load(last, map_location="cpu", weights_only=True).get("imagen", {}).get("stage")
    now = flatten(stage.model_dump(mode="json"))
    then = flatten(saved or {})
    changed = {
        k
        for k in now.keys() | then.keys()
        if now.get(k) != then.get(k)
        and k not in _RESUMABLE_CHANGES
        and not k.startswith("sampling.")
    }
    if not changed:
        return last
    print(
        f"imagen train: not resuming {last}: written with other settings "
        f"({', '.join(sorted(changed)[:5])}); starting from scratch",
        file=sys.stderr,
        flush=True,
    )
    with suppress(FileNotFoundError):  # another rank moved it first
        last.replace(last.with_name(LAST_CKPT + ".stale"))
    return None


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


class _GridFromFirstBatch(Callback):
    """Takes the sample grid's prompts from the first training batch when no held-out
    examples were found."""

    def __init__(self, grid: SampleGrid) -> None:
        self.grid = grid

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: ImagenStage, batch: Any, idx: int
    ) -> None:
        if not self.grid.ready:
            self.grid.fill_from_batch(batch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage", required=True, choices=["base64", "sr256", "sr1024"], help="stage to train"
    )
    parser.add_argument(
        "--parent-run-id",
        default=None,
        help="MLflow parent run (default: $IMAGEN_PARENT_RUN_ID, else .imagen/parent_run)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <models_dir>/<stage>)")
    parser.add_argument(
        "--record-keys",
        action="store_true",
        help="write ranks/rank<r>.json: the sample keys each rank trained on, its weights' hash",
    )


def train_stage(
    params: Params,
    stage_name: str,
    out: Path,
    *,
    parent_run_id: str | None = None,
    record_keys: bool = False,
) -> dict[str, Any]:
    """Train (or resume) one stage into ``out``; returns the metrics written to metrics.json."""
    from imagen.data.loader import ImagenDataModule

    stage = params.stage(stage_name)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(stage.trainer.seed + rank_zero_only.rank, workers=True, verbose=False)
    is_zero = rank_zero_only.rank == 0
    wall0 = time.perf_counter()
    ctx = (
        stage_run(
            params,
            stage_name,
            parent_run_id=parent_run_id,
            resume_file=out / "mlflow_run.json",
            tags={"imagen.out": str(out)},
        )
        if is_zero
        else _NullRun()
    )
    with ctx as run:
        module = ImagenStage(stage)
        grid = SampleGrid(params, stage) if is_zero else None
        progress = Progress(stage, out, grid, run)
        callbacks: list[Callback] = [progress]
        if grid is not None:
            callbacks.append(_GridFromFirstBatch(grid))
        if record_keys:
            callbacks.append(KeyRecorder(out))
        trainer = build_trainer(stage, out, callbacks, logger=StageRunLogger(run))
        data = ImagenDataModule(params, stage, split="train")
        ckpt = resume_path(out, stage)
        if ckpt is not None and is_zero:
            print(f"imagen train: resuming {stage_name} from {ckpt}", file=sys.stderr, flush=True)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
        final = out / "checkpoints" / LAST_CKPT
        # the final state, also when max_steps was already reached before this run
        trainer.save_checkpoint(final, weights_only=False)
        if not trainer.is_global_zero:
            return {}
        if grid is not None and progress.start_step < trainer.global_step:
            progress.sample(trainer, module)
        from imagen.nn import count_parameters

        wall = time.perf_counter() - wall0
        losses = [v for _, v in progress.history[-5:]]
        metrics = {
            "stage": stage_name,
            "steps": int(trainer.global_step),
            "final_loss": float(sum(losses) / len(losses)) if losses else None,
            "first_loss": float(progress.history[0][1]) if progress.history else None,
            "images_per_s": progress.images / max(progress.train_seconds, 1e-9),
            "train_seconds": progress.train_seconds,
            "wall_seconds": wall,
            "parameters": count_parameters(module.net),
            "skipped_nonfinite": int(module.skipped_nonfinite),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }
        save_stage(
            out,
            stage,
            module.ema_state_dict(),
            step=trainer.global_step,
            extra={"metrics": metrics, "mlflow_run_id": run.run_id},
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_loss_csv(out / "loss.csv", progress.history)
        run.log_metrics(
            {f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
            step=int(trainer.global_step),
        )
        run.log_artifact(out / "metrics.json")
        run.log_artifact(out / "model.pt")
        run.log_artifact(final, "checkpoints")
        return metrics


def write_loss_csv(path: Path, history: list[tuple[int, float]]) -> None:
    """``step,loss`` rows for `dvc plots` (after a resume, the history came from the ckpt)."""
    path.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in history))


class _NullRun:
    """Stand-in for :func:`stage_run` on ranks other than zero."""

    def __enter__(self) -> StageRun:
        return StageRun()

    def __exit__(self, *exc: Any) -> None:
        return None


def main(args: argparse.Namespace, params: Params) -> int:
    stage_name = args.stage
    params.stage(stage_name)  # a clear error for a stage missing from params.yaml
    out = Path(args.out) if args.out else Path(params.models_dir) / stage_name
    try:
        metrics = train_stage(
            params,
            stage_name,
            out,
            parent_run_id=args.parent_run_id,
            record_keys=getattr(args, "record_keys", False),
        )
    except NonFiniteLossError as e:
        print(f"imagen train --stage {stage_name}: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
