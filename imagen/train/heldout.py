"""The held-out denoising loss: the training loss on held-out samples at fixed noise levels.

The training loss draws a new noise level and new noise for every sample of every step, so it
is the noisiest number there is. :class:`HeldoutLoss` fixes all of it: ``trainer.heldout_loss
.num`` samples of the holdout split ingest wrote (the stage's own crops and low-res inputs, the
precached text features), one fixed noise draw per level in ``trainer.heldout_loss.sigmas``
(a seeded generator of its own), the EMA weights, no text dropped and, for SR stages, the fixed
sampling augmentation level. Between two measurements only the weights change, so the curve
shows what training learned; ``keep.monitor: heldout/loss`` ranks the kept checkpoints by it.

:meth:`HeldoutLoss.measure` returns the losses per level as a device tensor: it reads nothing
back to the host (the caller reads it at a log step), and it draws nothing from the training
random streams.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from imagen.config import ConfigError, Params, StageConfig

SEED = 1234  # the fixed noise of the held-out loss: the same at every measurement and run


def metric_names(sigmas: list[float]) -> list[str]:
    """``heldout/loss_sigma_<s>`` per level, in order."""
    return [f"heldout/loss_sigma_{s:g}" for s in sigmas]


class HeldoutLoss:
    """The held-out denoising loss of one stage (see the module docstring)."""

    def __init__(self, params: Params, stage: StageConfig) -> None:
        self.params, self.stage = params, stage
        self.cfg = stage.trainer.heldout_loss
        self.sigmas = list(self.cfg.sigmas)
        self.names = metric_names(self.sigmas)
        self._batch: dict[str, Any] | None = None
        self._noise: torch.Tensor | None = None
        self.available = self.cfg.num > 0

    def _load(self, device: torch.device) -> None:
        from imagen.data.loader import OnlineEncoding, collate, finish_batch, make_dataset

        try:
            data = make_dataset(self.params, self.stage, "holdout", epochs=1, train=False)
            examples = []
            for example in data:
                examples.append(example)
                if len(examples) == self.cfg.num:
                    break
        except ConfigError as e:
            examples, why = [], str(e)
        else:
            why = "the holdout split is empty"
        if not examples:
            self.available = False
            if self.stage.trainer.keep.monitor == "heldout/loss":
                raise ConfigError(f"keep.monitor heldout/loss: no held-out samples ({why})")
            warnings.warn(f"held-out loss off: {why}", RuntimeWarning, stacklevel=3)
            return
        # as the training step reads a batch: images in [-1, 1], text padded to token_length
        batch = finish_batch(collate(examples), self.stage.model.conditioning.token_length)
        if "text_embed" not in batch:
            batch = OnlineEncoding(self.params)(batch, device="cpu")
        keep = ("image", "lowres", "text_embed", "text_mask")
        self._batch = {k: v.to(device) for k, v in batch.items() if k in keep}
        image = self._batch["image"]
        gen = torch.Generator(device="cpu").manual_seed(SEED)
        noise = torch.randn((len(self.sigmas), *image.shape), generator=gen)
        self._noise = noise.to(device=device, dtype=image.dtype)

    @torch.no_grad()
    def measure(self, module: Any) -> torch.Tensor | None:
        """Losses per level (len(sigmas),) on the module's device, by its EMA weights; None
        when off or there is no held-out data."""
        from imagen.diffusion.noise_aug import sr_condition

        if not self.available:
            return None
        device = module.device
        if self._batch is None:
            with torch.random.fork_rng(devices=[]):
                self._load(device)
            if self._batch is None:
                return None
        assert self._noise is not None
        batch, model = self._batch, self.stage.model
        x0 = batch["image"]
        cond: dict[str, Any] = {
            "text_embed": batch["text_embed"].float(),
            "text_mask": batch["text_mask"].bool(),
            "drop_text": torch.zeros(x0.shape[0], dtype=torch.bool, device=device),
        }
        cuda = [device] if device.type == "cuda" else []
        # the training random streams are left as they were; the augmentation noise is fixed
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(SEED)
            if model.is_sr:
                cond.update(sr_condition(batch["lowres"], model, training=False))
            denoiser = module.ema_denoiser()
            losses = []
            for i, s in enumerate(self.sigmas):
                sigma = torch.full((x0.shape[0],), float(s), device=device)
                per, _ = denoiser.per_sample_loss(x0, cond, sigma=sigma, noise=self._noise[i])
                losses.append(per.mean())
        return torch.stack(losses).detach().float()
