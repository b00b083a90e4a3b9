"""Sample grids during training: fixed prompts (and SR low-res inputs) sampled with the EMA
weights, saved as ``samples/step_*.png`` and, for the base stage, scored for caption agreement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagen.config import ConfigError, Params, StageConfig
from imagen.images import image_grid, side_by_side, to_pil
from imagen.mlops.tracking import StageRun
from imagen.train.module import ImagenStage


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
        from imagen.data.holdout import holdout_batches

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
        from imagen.diffusion.noise_aug import sr_condition

        assert self.text_embed is not None and self.text_mask is not None
        device = module.device
        cond: dict[str, Any] = {
            "text_embed": self.text_embed.to(device),
            "text_mask": self.text_mask.to(device),
        }
        if self.stage.model.is_sr:
            assert self.lowres is not None
            g = torch.Generator(device).manual_seed(seed)  # noise drawn where the net runs
            sr = sr_condition(self.lowres.to(device), self.stage.model, training=False, generator=g)
            cond.update(sr)
        size = self.stage.model.unet.image_size
        shape = (len(self.captions), self.stage.model.unet.channels, size, size)
        # sample.precision: bf16 autocast on CUDA (auto), fp32 on the CPU, like `imagen sample`
        bf16 = self.params.sample.bf16_on(device.type)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = sample(module.ema_denoiser(), shape, cond, self.stage.sampling, seed=seed)
        return x.float().cpu()

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
