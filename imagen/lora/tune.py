"""The LoRA training loop: the stage's diffusion loss on a few captioned pictures.

Each step draws a batch of the pictures (with replacement, so four pictures fill a batch of
eight), drops their text at the stage's ``drop_rate`` as training does (so guidance keeps
working), and takes one AdamW step on the adapters only. With ``prior`` (DreamBooth's prior
preservation, Ruiz et al. 2023) the frozen model first draws that many samples from other
captions; each step then adds ``prior_weight`` x the loss on a batch of them, so the model keeps
drawing what it drew before for captions that are not being taught.

The loss before and after is measured the same way both times: the mean diffusion loss over
``eval_draws`` seeded noise levels and noises per picture, text not dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from imagen.config import StageConfig
from imagen.lora.adapters import add_lora, lora_parameters, lora_targets, merged_state
from imagen.lora.images import TeachImages


@dataclass
class TuneSettings:
    """What ``imagen finetune`` trains with (its options)."""

    steps: int = 300
    lr: float = 1.0e-3
    rank: int = 8
    alpha: float | None = None  # None: = rank (scale 1)
    batch_size: int = 8
    prior: int = 0  # samples the model draws from other captions (0: no prior preservation)
    prior_weight: float = 1.0
    seed: int = 0
    eval_draws: int = 8
    log_every: int = 25

    def check(self) -> None:
        """A clear error naming the option before any work."""
        for name, low in (("steps", 1), ("rank", 1), ("batch_size", 1), ("eval_draws", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}")
        if self.prior < 0 or self.prior_weight < 0 or self.lr <= 0:
            raise ValueError("--prior and --prior-weight must be >= 0, --lr > 0")


@dataclass
class TuneResult:
    """The adapted model (adapters separate), its merged weights and what was measured."""

    model: Any  # the peft model: base weights frozen, adapters trained
    merged: dict[str, Tensor]  # the UNet's state dict with the adapters merged in
    loss_before: float
    loss_after: float
    targets: list[str]
    trainable: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)
    prior_captions: list[str] = field(default_factory=list)
    prior_images: Tensor | None = None


def encode(encoder: Any, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Captions -> (embeds (N, L, D) float32, mask (N, L) bool) on the CPU."""
    with torch.no_grad():
        embeds, mask = encoder.encode(list(captions))
    return embeds.float().cpu(), mask.bool().cpu()


@torch.no_grad()
def fixed_loss(
    denoiser: nn.Module, images: Tensor, embeds: Tensor, mask: Tensor, draws: int, seed: int = 0
) -> float:
    """The mean diffusion loss over ``draws`` seeded (noise level, noise) pairs per image."""
    was = denoiser.training
    denoiser.eval()
    gen = torch.Generator().manual_seed(seed)
    x0 = images.repeat(draws, 1, 1, 1)  # (draws*N, 3, R, R)
    cond = {"text_embed": embeds.repeat(draws, 1, 1), "text_mask": mask.repeat(draws, 1)}
    loss = float(denoiser.per_sample_loss(x0, cond, gen)[0].mean())
    denoiser.train(was)
    return loss


@torch.no_grad()
def generate(
    denoiser: nn.Module,
    stage: StageConfig,
    embeds: Tensor,
    mask: Tensor,
    seed: int = 0,
    batch_size: int = 8,
) -> Tensor:
    """Samples (N, 3, R, R) in [-1, 1] with the stage's own sampling settings, seeded."""
    from imagen.diffusion import sample

    denoiser.eval()
    out = []
    res, channels = stage.resolution, stage.model.unet.channels
    for bi, i in enumerate(range(0, len(embeds), batch_size)):
        e, m = embeds[i : i + batch_size], mask[i : i + batch_size]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + bi)
        x = sample(
            denoiser,
            (len(e), channels, res, res),
            {"text_embed": e, "text_mask": m},
            stage.sampling,
            generator=gen,
        )
        out.append(x.float().clamp(-1, 1))
    return torch.cat(out)


def _batch(
    images: Tensor, embeds: Tensor, mask: Tensor, n: int, drop_rate: float, gen: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    from imagen.diffusion import drop_mask

    idx = torch.randint(len(images), (n,), generator=gen)
    cond = {
        "text_embed": embeds[idx],
        "text_mask": mask[idx],
        "drop_text": drop_mask(n, drop_rate, generator=gen),
    }
    return images[idx], cond


def finetune(
    net: nn.Module,
    stage: StageConfig,
    teach: TeachImages,
    encoder: Any,
    settings: TuneSettings,
    prior_captions: Sequence[str] = (),
    say: Callable[[str], None] = lambda _: None,
) -> TuneResult:
    """Train LoRA adapters on ``net`` (a stage UNet with its trained weights) on ``teach``.

    ``net`` is wrapped in place (peft injects the adapters); its own weights do not change.
    """
    from imagen.diffusion import build_denoiser

    settings.check()
    if stage.model.is_sr:
        raise ValueError(f"--stage {stage.name}: LoRA fine-tuning covers the base stage only")
    if settings.prior and len(prior_captions) < settings.prior:
        raise ValueError(f"--prior {settings.prior}: only {len(prior_captions)} other captions")
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    embeds, mask = encode(encoder, teach.captions)
    base = build_denoiser(stage.model, net)
    before = fixed_loss(base, teach.images, embeds, mask, settings.eval_draws, settings.seed)
    prior_caps = list(prior_captions[: settings.prior])
    prior_images, p_embeds, p_mask = None, None, None
    if prior_caps:
        say(f"drawing {len(prior_caps)} prior samples from other captions with the frozen model")
        p_embeds, p_mask = encode(encoder, prior_caps)
        prior_images = generate(base, stage, p_embeds, p_mask, seed=settings.seed + 1)
    targets = lora_targets(net)
    model = add_lora(net, settings.rank, settings.alpha)
    denoiser = build_denoiser(stage.model, model)
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    drop = stage.model.conditioning.drop_rate
    denoiser.train()
    history: list[tuple[int, float]] = []
    for step in range(1, settings.steps + 1):
        x0, cond = _batch(teach.images, embeds, mask, settings.batch_size, drop, gen)
        loss = denoiser.loss(x0, cond, gen)
        if prior_images is not None:
            n = min(settings.batch_size, len(prior_images))
            px, pcond = _batch(prior_images, p_embeds, p_mask, n, drop, gen)
            loss = loss + settings.prior_weight * denoiser.loss(px, pcond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((step, float(loss.detach())))
        if step % settings.log_every == 0 or step == settings.steps:
            recent = [v for _, v in history[-settings.log_every :]]
            say(f"step {step}/{settings.steps} loss {sum(recent) / len(recent):.4f}")
    after = fixed_loss(denoiser, teach.images, embeds, mask, settings.eval_draws, settings.seed)
    model.eval()
    return TuneResult(
        model=model,
        merged=merged_state(model),
        loss_before=before,
        loss_after=after,
        targets=targets,
        trainable=sum(p.numel() for p in params),
        seconds=time.perf_counter() - t0,
        history=history,
        prior_captions=prior_caps,
        prior_images=prior_images,
    )
