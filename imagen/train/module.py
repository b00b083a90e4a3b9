"""The LightningModule of one cascade stage: a UNet inside its diffusion preconditioning, the
EMA of its weights, AdamW with linear warm-up, and the non-finite-loss policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imagen.config import StageConfig


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
        # EMA of the UNet weights (and buffers): w_ema <- d * w_ema + (1 - d) * w; NeMo's fixed
        # decay, or warmed up (trainer.ema_warmup) so a short run's EMA follows the weights early.
        decay = stage.trainer.ema_decay
        average = (
            ema_with_warmup(decay) if stage.trainer.ema_warmup else get_ema_multi_avg_fn(decay)
        )
        self.ema = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
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
        from imagen.diffusion.noise_aug import sr_condition

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
            cond.update(sr_condition(lowres, self.stage.model, training=True))
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
        params = list(self.net.parameters())
        # the fused kernel: the same update in one pass over all tensors (6x faster a step
        # than the per-tensor loop on the CPU, where that loop was ~5% of a base64 step).
        # Lightning refuses it under mixed precision (it cannot clip before the update there).
        fused = self.stage.trainer.precision in ("32", "32-true") and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
        )
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None
        )
        # linear warm-up from lr/warmup to lr over warmup_steps optimiser steps, then constant
        warmup = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from imagen.train.settings import settings_hash

        stage = self.stage.model_dump(mode="json")
        checkpoint["imagen"] = {
            "stage": stage,
            "settings": settings_hash(stage),
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
