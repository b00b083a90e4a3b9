"""The LightningModule of one cascade stage: a UNet inside its diffusion preconditioning, the
EMA of its weights, AdamW with linear warm-up, and the non-finite policy.

A training step reads nothing from the device: whether a step is non-finite is decided on the
device from the gradient norm that every rank shares after the all-reduce (and, on one device,
the loss); a non-finite step's update is dropped on the device (the fused AdamW's ``found_inf``,
as a gradient scaler does; the EMA's weight is zero). The count is read at log steps, before
every checkpoint and at the end, where ``nan_policy: stop`` raises :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imagen.config import StageConfig


class NonFiniteLossError(RuntimeError):
    """The training loss or gradients became NaN or infinite and ``trainer.nan_policy`` is
    ``stop``."""


# --------------------------------------------------------------------------------------------
# EMA and unused parameters
# --------------------------------------------------------------------------------------------
def ema_with_warmup(decay: float):
    """An ``AveragedModel`` averaging function: EMA with decay ``min(decay, (1+n)/(10+n))``
    (what :func:`update_ema` does with ``warmup``, for ``AveragedModel.update_parameters``)."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        nd = n.double()
        w = (1.0 - torch.clamp((1.0 + nd) / (10.0 + nd), max=decay)).to(ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, [w.expand_as(e) for e in ema_params])

    return update


@torch.no_grad()
def update_ema(
    ema: AveragedModel,
    net: torch.nn.Module,
    decay: float,
    warmup: bool = False,
    skip: torch.Tensor | None = None,
) -> None:
    """``w_ema <- d * w_ema + (1 - d) * w`` over parameters and buffers, on the device.

    ``d`` is ``decay`` (NeMo), or ``min(decay, (1+n)/(10+n))`` after n updates with ``warmup``:
    after n updates a fixed decay d still holds d^n of the initial weights (0.995^300 = 22%), so
    a short run's EMA would look half-untrained; the warm-up lets it follow the weights early.
    The first update copies the weights; a step where ``skip`` (a device bool) is true changes
    nothing (``n_averaged`` counts the others). No host read: ``AveragedModel.update_parameters``
    reads ``n_averaged`` twice a step.
    """
    n = ema.n_averaged
    if warmup:
        nd = n.double()
        d = torch.clamp((1.0 + nd) / (10.0 + nd), max=decay)
        weight = torch.where(n == 0, 1.0, 1.0 - d).float()
    else:
        weight = torch.where(n == 0, 1.0, 1.0 - decay)
    if skip is not None:
        weight = torch.where(skip, 0.0, weight)
    pairs = zip([*ema.module.parameters(), *ema.module.buffers()],
                [*net.parameters(), *net.buffers()], strict=True)  # fmt: skip
    floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for e, p in pairs:
        # sharded (trainer.strategy fsdp): the EMA of this rank's shard, shard by shard
        e, p = local_shard(e), local_shard(p.detach())
        p = p.to(e.device)
        if e.is_floating_point() and e.dtype == p.dtype:
            floats[0].append(e.detach())
            floats[1].append(p)
        else:  # integer buffers: copied when the step counts
            e.copy_(torch.where(weight > 0, p.to(e.dtype), e))
    by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for e, p in zip(*floats, strict=True):
        group = by_dtype.setdefault(e.dtype, ([], []))
        group[0].append(e)
        group[1].append(p)
    for dtype, (es, ps) in by_dtype.items():
        # a weight tensor per parameter (expanded, no copy): the one-tensor-weight overload
        # reads the weight on the host
        w = weight.to(dtype)
        torch._foreach_lerp_(es, ps, [w.expand_as(e) for e in es])
    n.add_(1 if skip is None else (~skip).to(n.dtype))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (``DTensor``) tensor, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (``DTensor``) tensor, gathered from every rank (a collective:
    every rank calls it), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def broadcast_from_zero(*modules: torch.nn.Module, device: torch.device) -> None:
    """Give every rank rank zero's parameters and buffers, one tensor at a time through
    ``device`` (NCCL broadcasts device tensors only)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(device)
            dist.broadcast(buf, src=0)
            t.detach().copy_(buf)


def shard_unet(net: torch.nn.Module, mesh: Any) -> None:
    """FSDP2 (``fully_shard``) over ``mesh``: each block of the UNet's block lists is a unit
    (its weights gathered for its forward and backward, freed after), the UNet the root unit.
    Parameters become ``DTensor`` shards; state-dict keys do not change."""
    from torch.distributed.fsdp import fully_shard

    blocks = [
        block
        for lst in net.modules()
        if isinstance(lst, torch.nn.ModuleList)
        for block in lst
        if not isinstance(block, torch.nn.ModuleList) and any(True for _ in block.parameters())
    ]
    for block in reversed(blocks):  # inner units before the units holding them
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def unused_parameters(net: torch.nn.Module) -> list[str]:
    """Names of the UNet's parameters that no training step reaches (DDP rejects them).

    The projected text tokens (``cond.text_to_cond``, plus ``cond.null_token``) feed only
    text-attending blocks. With none (``attention_type: self``, or no attention layer) the null
    token is never used, and the projection neither under attention pooling (it pools the raw
    text embeddings; mean pooling pools the projected tokens).
    """
    from imagen.nn.attention import CrossAttention, FusedAttention

    cond = getattr(net, "cond", None)
    if cond is None or any(isinstance(m, CrossAttention | FusedAttention) for m in net.modules()):
        return []
    names = ["cond.null_token"] if getattr(cond, "use_null_token", False) else []
    if getattr(cond, "pooling", None) == "attention":
        names += [f"cond.text_to_cond.{k}" for k, _ in cond.text_to_cond.named_parameters()]
    return names


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------
class ImagenStage(pl.LightningModule):
    """One cascade stage: UNet inside its diffusion preconditioning, plus an EMA of the UNet.

    ``training_step`` draws the classifier-free-guidance text drop (``drop_rate``) and, for SR
    stages, noise-augments the low-res input at a random level passed as ``aug_level``.
    ``step_loss`` is the last optimiser step's loss (the mean over its micro-batches), a device
    tensor for the callbacks to accumulate.
    """

    def __init__(self, stage: StageConfig) -> None:
        super().__init__()
        from imagen.diffusion.denoiser import build_denoiser
        from imagen.nn import build_unet

        self.stage = stage
        net = build_unet(stage.model)
        # parameters no step reaches stay out of DDP's gradient reduction (still in the state
        # dict, so NeMo checkpoints and older ones load; AdamW skips a parameter without grad)
        frozen = set(unused_parameters(net))
        for name, p in net.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self.denoiser = build_denoiser(stage.model, net)
        # EMA of the UNet weights (and buffers): update_ema after every step (update_parameters
        # computes the same: NeMo's fixed decay, or warmed up with trainer.ema_warmup)
        decay = stage.trainer.ema_decay
        average = (
            ema_with_warmup(decay) if stage.trainer.ema_warmup else get_ema_multi_avg_fn(decay)
        )
        self.ema = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
        self.ema.requires_grad_(False)
        if stage.model.inductor:
            net.compile()  # in place: the state dict keeps its keys
        self.skipped_nonfinite = 0  # as of the last read (log steps, checkpoints, the end)
        self._skipped_before = 0  # from the checkpoint this run resumed
        self._micro = 0  # micro-batches of the optimiser step in progress
        self._loss_sum: torch.Tensor | None = None
        self.step_loss: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None
        # on the device: [skipped steps, first skipped step, its loss, its gradient norm]
        self._nonfinite: torch.Tensor | None = None
        self._step: torch.Tensor | None = None
        self._read_at = -1  # the step of the last check_nonfinite read
        self.sharded = False  # trainer.strategy fsdp: UNet and EMA sharded (configure_model)
        self._ema_full: torch.nn.Module | None = None  # a gathered EMA UNet (rank zero)

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

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp`` shard the UNet and its EMA alike (FSDP2 over the
        data-parallel ranks): each rank keeps and averages its own shard of both."""
        if self.sharded or self.stage.trainer.strategy != "fsdp":
            return
        mesh = self.device_mesh["data_parallel"]
        # every rank built its own random initialisation (seeded by its rank): rank zero's is
        # the one (DDP broadcasts it when it wraps the model; fully_shard does not)
        broadcast_from_zero(self.net, self.ema.module, device=self.trainer.strategy.root_device)
        shard_unet(self.net, mesh)
        shard_unet(self.ema.module, mesh)
        self.sharded = True

    def on_train_start(self) -> None:
        self._nonfinite = torch.tensor([0.0, -1.0, 0.0, 0.0], device=self.device)
        self._step = torch.full((), float(self.trainer.global_step), device=self.device)
        self._micro = 0
        self._read_at = -1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        from imagen.data.loader import finish_batch

        # the data module finishes its batches after the device copy; any other loader's
        # uint8 images / unpadded text are finished here (a finished batch passes unchanged)
        batch = finish_batch(batch, self.stage.model.conditioning.token_length)
        x0 = batch["image"]
        if self.stage.model.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = self.denoiser.loss(x0, self.condition(batch))
        value = loss.detach().float()
        self._loss_sum = (
            value if self._micro == 0 or self._loss_sum is None else self._loss_sum + value
        )
        self._micro += 1
        # no prog_bar: Lightning would read a bar value from the device after every batch
        self.log("train/loss", loss.detach())
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global gradient norm (NeMo's ``gradient_clip_val``) and decide on the
        device whether the step is non-finite; a fused AdamW then drops it (``found_inf``)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if gradient_clip_algorithm == "value" and gradient_clip_val:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            gradient_clip_val = None
        if gradient_clip_val:
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self._norm = full_tensor(norm.detach()).float()  # sharded: all-reduced
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if scaler is None:  # fp16's loss scaler skips non-finite gradients itself
            bad = bad | ~torch.isfinite(self._norm)  # the same on every rank (all-reduced)
        if self.trainer.world_size == 1 and self._loss_sum is not None:
            bad = bad | ~torch.isfinite(self._loss_sum)
        self._bad = bad
        if scaler is not None:
            return
        if all(g.get("fused") for g in optimizer.param_groups):
            optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        elif bool(bad):  # an unfused AdamW (an old checkpoint's state): one read a step
            for p in params:
                p.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self._bad = None
        super().optimizer_step(*args, **kwargs)
        opt = self.optimizers(use_pl_optimizer=False)
        if hasattr(opt, "found_inf"):
            del opt.found_inf  # type: ignore[union-attr]
        # EMA after every optimiser step, before any callback (a checkpoint) sees the step
        t = self.stage.trainer
        update_ema(self.ema, self.net, t.ema_decay, t.ema_warmup, self._bad)
        loss = self._loss_sum / max(self._micro, 1) if self._loss_sum is not None else None
        self.step_loss, self._micro = loss, 0
        if self._bad is not None and self._nonfinite is not None and self._step is not None:
            first = self._bad & (self._nonfinite[1] < 0)
            what = torch.stack([self._step, loss if loss is not None else self._norm, self._norm])
            self._nonfinite[1:] = torch.where(first, what, self._nonfinite[1:])
            self._nonfinite[0] += self._bad.float()
        if self._step is not None:
            self._step += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, every = self.trainer.global_step, self.stage.trainer.log_every_n_steps
        if self._micro == 0 and step % every == 0:
            self.check_nonfinite(log=True)

    def on_train_end(self) -> None:
        self.check_nonfinite()

    def check_nonfinite(self, log: bool = False) -> int:
        """Read the count of non-finite steps from the device (a host read: log steps,
        checkpoints, the end). Under ``nan_policy: stop`` the first one raises
        :class:`NonFiniteLossError`; under ``skip`` each new one is reported."""
        step = self.trainer.global_step
        if self._nonfinite is not None and self._read_at != step:
            self._read_at = step
            total = self._skipped_before + int(self._nonfinite[0].item())
            if total != self.skipped_nonfinite:
                self._report_nonfinite(total)
        if log:
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
        return self.skipped_nonfinite

    def _report_nonfinite(self, total: int) -> None:
        assert self._nonfinite is not None
        _, first, loss, norm = self._nonfinite.tolist()
        if not math.isfinite(loss):
            what = f"the training loss is {loss} (not finite)"
        else:
            what = f"the gradients are not finite (norm {norm}; the loss is {loss:.4g})"
        if self.stage.trainer.nan_policy == "stop":
            where = self.last_good_checkpoint() or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"step {int(first)}: {what}; stopping (trainer.nan_policy=stop). "
                f"Last good checkpoint: {where}"
            )
        if self.trainer.is_global_zero:
            print(
                f"imagen train: skipped {total} non-finite step(s) so far, the first at step "
                f"{int(first)}: {what} (trainer.nan_policy=skip)",
                file=sys.stderr,
                flush=True,
            )
        self.skipped_nonfinite = total

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
        # than the per-tensor loop on the CPU, where that loop was ~5% of a base64 step), and it
        # drops a non-finite step on the device (found_inf). Not under fp16: its loss scaler
        # unscales the gradients before clipping, which a fused AdamW would do itself.
        fused = self.stage.trainer.precision not in ("16", "16-mixed") and all(
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
        if o.decay == "cosine":  # a departure from NeMo's constant rate after warm-up
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, self.stage.trainer.max_steps - warmup), eta_min=o.lr * o.decay_to
            )
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [sched, cosine], [warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from imagen.train.settings import settings_hash

        self.check_nonfinite()  # under nan_policy stop, no checkpoint after a non-finite step
        stage = self.stage.model_dump(mode="json")
        checkpoint["imagen"] = {
            "stage": stage,
            "settings": settings_hash(stage),
            "skipped_nonfinite": int(self.skipped_nonfinite),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = int(checkpoint.get("imagen", {}).get("skipped_nonfinite", 0))
        self.skipped_nonfinite = self._skipped_before = saved

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA UNet's weights, keyed like the UNet itself. Sharded, the whole weights
        gathered on rank zero (a collective: every rank calls it; the others get ``{}``)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.ema.module, options=options)
        return {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def hold_full_ema(self, state: dict[str, torch.Tensor] | None) -> None:
        """Sharded: sample from an unsharded EMA UNet built from ``state`` (gathered by
        :meth:`ema_state_dict`) on this rank alone, until called with None."""
        if not state:
            self._ema_full = None
            return
        from imagen.nn import build_unet

        net = build_unet(self.stage.model)
        net.load_state_dict(state)
        self._ema_full = net.to(self.device).requires_grad_(False)

    def ema_denoiser(self) -> torch.nn.Module:
        """The EMA weights in their preconditioning. Sharded, a collective on every rank
        unless :meth:`hold_full_ema` gave this rank the whole EMA."""
        from imagen.diffusion.denoiser import build_denoiser

        net = self._ema_full if self._ema_full is not None else self.ema.module
        return build_denoiser(self.stage.model, net).eval()
