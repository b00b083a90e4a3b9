"""Cascade sampling: text -> 64 px (base64) -> 256 px (sr256) -> 1024 px (sr1024).

Imagen generates in three diffusion stages (Saharia et al. 2022, Sec. 2.4): the base model turns
T5 text embeddings into a 64 px image, then two text-conditioned super-resolution models take
the previous stage's output as their low-res input, noised at a small fixed augmentation level,
and produce 256 px and 1024 px images. Each stage samples with its own sampler, step count and
classifier-free guidance scale (``stages.<name>.sampling`` in params.yaml, or overrides here).

:class:`Cascade` holds the stage networks (loaded from the self-describing stage model files
``models/<stage>/model.pt``; :func:`imagen.mlops.registry.load_cascade` also takes a registered
model URI) and the T5 text encoder. ``imagen sample`` (:mod:`imagen.sample.cli`) is its command
line.

The cascade may also start at an SR stage from images the caller has (NeMo's low_res_input):
``generate(prompts, lowres=images)`` super-resolves them through sr256 (and sr1024).

Inpainting: ``generate(prompts, inpaint_image=images, inpaint_mask=masks)`` samples only the
masked region at every stage it runs; the rest of each stage's output is the image resized to
that stage's resolution, exactly (:mod:`imagen.diffusion.inpaint`). An SR stage still takes the
previous stage's output as its low-res input.

Determinism: for a given seed, batch size and set of prompts the images are bit-for-bit the
same on the same machine (every random draw comes from a generator on the sampling device seeded by
``(seed, stage, batch)``). With ``seeds`` (one per image) each image's noise comes from its own
generator, seeded by ``(seed, stage)``: an image depends on its seed, not on its batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagen.checkpoint import MODEL_FILE
from imagen.config import (
    STAGES,
    ConditioningConfig,
    ConfigError,
    SamplingConfig,
    StageConfig,
)
from imagen.images import cascade_grid, image_grid, to_pil
from imagen.sample.options import (
    PerStage,
    batch_generator,
    for_stage,
    image_generators,
    negative_prompts,
    parse_stage_values,
)

__all__ = [
    "Cascade",
    "CascadeStage",
    "cascade_grid",
    "image_grid",
    "missing_stage_message",
    "parse_stage_values",
    "to_pil",
]


def missing_stage_message(path: Path, stage: str) -> str:
    """What to run when a stage model file is missing."""
    return (
        f"{path}: no trained {stage} model. Train it with `imagen train --stage {stage}` "
        f"(or `dvc repro train@{stage}`; `dvc repro` trains the whole cascade), or point "
        "--models at a folder holding <stage>/model.pt files or at a registered model "
        "(models:/imagen-cascade@champion)."
    )


# --------------------------------------------------------------------------------------------
# The cascade
# --------------------------------------------------------------------------------------------
@dataclass
class CascadeStage:
    """One loaded stage: its network wrapped in its preconditioning, and its config."""

    name: str
    config: StageConfig
    net: nn.Module
    denoiser: nn.Module
    guide: nn.Module | None = None  # autoguidance's guide denoiser, once loaded
    guide_source: str | None = None  # where it was read from

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def sampling(
        self,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        kind: str | None = None,
    ) -> SamplingConfig:
        """The stage's SamplingConfig with the given overrides (validated); ``kind`` "auto"
        without a configured ``sampling.guide`` takes the guide set on this stage."""
        update: dict[str, Any] = {
            "steps": steps, "guidance_scale": guidance, "sampler": sampler, "guidance": kind
        }  # fmt: skip
        if kind == "auto" and self.guide_source is not None:
            update["guide"] = self.guide_source
        update = {k: v for k, v in update.items() if v is not None}
        if not update:
            return self.config.sampling
        try:
            return SamplingConfig.model_validate({**self.config.sampling.model_dump(), **update})
        except ValueError as e:
            raise ConfigError(f"sampling override for {self.name}: {e}") from e


class Cascade:
    """The loaded cascade: stage networks (in order base64, sr256, sr1024) + the text encoder.

    Any prefix of the cascade works: base only, base + sr256, or all three; so do the SR stages
    alone (sr256, sr256 + sr1024), which super-resolve images given to :meth:`generate`.
    """

    def __init__(
        self,
        stages: Mapping[str, tuple[nn.Module, StageConfig]],
        encoder: Any,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        from imagen.diffusion import build_denoiser

        names = [s for s in STAGES if s in stages]
        if not names:
            raise ConfigError("a cascade needs at least one stage")
        first = STAGES.index(names[0])
        if names != list(STAGES[first : first + len(names)]):
            raise ConfigError(f"stages {names}: a cascade is a run of {list(STAGES)}")
        self.device = torch.device(device)
        self.encoder = encoder
        self.set_precision(precision)
        self.stages: dict[str, CascadeStage] = {}
        for name in names:
            net, cfg = stages[name]
            net = net.to(self.device).eval().requires_grad_(False)
            self.stages[name] = CascadeStage(name, cfg, net, build_denoiser(cfg.model, net))

    def set_precision(self, precision: str) -> None:
        """``sample.precision``: the networks' matmuls and convolutions in bf16 autocast ("bf16")
        or fp32 ("32"); "auto" is bf16 on CUDA, fp32 elsewhere. The sampler's own arithmetic
        (the noise levels and the updates of x) stays fp32 either way."""
        if precision not in ("auto", "32", "bf16"):
            raise ConfigError(f"sample.precision: {precision!r}; allowed: auto, 32, bf16")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_files(
        cls,
        files: Mapping[str, str | Path],
        *,
        encoder_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> Cascade:
        """Load stage model files (stage -> model.pt or its folder) and the text encoder.

        ``encoder_path`` overrides the encoder folder the base stage was trained with
        (``model.conditioning.encoder_path`` inside its model file).
        """
        from imagen.checkpoint import load_stage

        loaded: dict[str, tuple[nn.Module, StageConfig]] = {}
        for name, path in files.items():
            path = Path(path)
            file = path / MODEL_FILE if path.is_dir() or path.suffix != ".pt" else path
            if not file.exists():
                raise FileNotFoundError(missing_stage_message(file, name))
            net, cfg = load_stage(file, device="cpu")
            if cfg.name != name:
                raise ConfigError(f"{file}: holds stage {cfg.name!r}, expected {name!r}")
            loaded[name] = (net, cfg)
        if not loaded:
            raise ConfigError("a cascade needs at least one stage model")
        cond = loaded[next(s for s in STAGES if s in loaded)][1].model.conditioning
        encoder = load_encoder(cond, encoder_path, device)
        return cls(loaded, encoder, device, precision)

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | Path = "models",
        *,
        depth: str = "sr1024",
        encoder_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        start: str = "base64",
        precision: str = "auto",
    ) -> Cascade:
        """Load ``models_dir/<stage>/model.pt`` for every stage from ``start`` to ``depth``."""
        names = [n for n in stages_to(depth) if STAGES.index(n) >= STAGES.index(start)]
        files = {name: Path(models_dir) / name / MODEL_FILE for name in names}
        for name, file in files.items():  # report the first missing stage before loading any
            if not file.exists():
                raise FileNotFoundError(missing_stage_message(file, name))
        return cls.from_files(files, encoder_path=encoder_path, device=device, precision=precision)

    # ---------------------------------------------------------------- autoguidance
    def set_guide(
        self,
        source: str | Path,
        *,
        stage: str | None = None,
        key: str = "--guide",
        tracking_uri: str | None = None,
    ) -> str:
        """Load an autoguidance guide (:mod:`imagen.sample.guide`) for the stage it holds;
        returns that stage's name. A guide of a stage this cascade did not load, or one that
        does not fit the stage, is a :class:`ConfigError` naming ``key``."""
        from imagen.diffusion import build_denoiser
        from imagen.sample.guide import check_guide_fits, read_guide

        net, config = read_guide(source, stage, key=key, tracking_uri=tracking_uri)
        if config.name not in self.stages:
            raise ConfigError(
                f"{key}={source}: a {config.name} guide, and this cascade has no {config.name} "
                f"stage (loaded: {list(self.stages)})"
            )
        target = self.stages[config.name]
        check_guide_fits(config, target.config, str(source), key)
        net = net.to(self.device)
        target.guide = build_denoiser(config.model, net)
        target.guide_source = str(source)
        return config.name

    def _guide_for(self, name: str, sampling: SamplingConfig) -> nn.Module | None:
        """The guide denoiser ``sampling`` asks for (loaded once from ``sampling.guide``)."""
        if sampling.guidance != "auto":
            return None
        stage = self.stages[name]
        if stage.guide is None or stage.guide_source != sampling.guide:
            self.set_guide(str(sampling.guide), stage=name, key=f"stages.{name}.sampling.guide")
        return stage.guide

    # ---------------------------------------------------------------- sampling
    @property
    def depth(self) -> str:
        """The last stage loaded."""
        return list(self.stages)[-1]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (T5 embeddings (B, L, D), mask (B, L)) on the cascade's device."""
        embeds, mask = self.encoder.encode(list(prompts))
        return embeds.to(self.device, torch.float32), mask.to(self.device)

    @torch.no_grad()
    def sample_stage(
        self,
        name: str,
        text_embed: torch.Tensor,
        text_mask: torch.Tensor,
        lowres: torch.Tensor | None = None,
        *,
        sampling: SamplingConfig | None = None,
        noise_aug: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        negative: Mapping[str, torch.Tensor] | None = None,
        inpaint: Any = None,
    ) -> torch.Tensor:
        """One stage for one batch: (B, 3, res, res) in [-1, 1].

        SR stages take ``lowres`` (the previous stage's output), resize it to the stage's
        ``lowres`` size if needed, and noise it at ``noise_aug`` (default: the stage's sampling
        level, ``model.noise_cond_aug``) -- Imagen's noise conditioning augmentation.
        ``negative`` (text_embed, text_mask, null) conditions CFG's unconditional branch;
        ``sampling.guidance`` auto samples with the stage's guide (loaded when first needed).
        ``inpaint`` (an :class:`imagen.diffusion.Inpaint` at the stage's resolution) keeps its
        known image outside its mask.
        """
        from imagen.diffusion import sample, sr_condition

        stage = self.stages[name]
        cfg = stage.config
        b = text_embed.shape[0]  # text_embed (B, L, D), text_mask (B, L)
        cond: dict[str, Any] = {"text_embed": text_embed, "text_mask": text_mask}
        if stage.net.is_sr:
            if lowres is None:
                raise ValueError(f"{name} is a super-resolution stage: it needs a lowres image")
            size = cfg.lowres or lowres.shape[-1]
            if lowres.shape[-1] != size:
                lowres = F.interpolate(
                    lowres, size=(size, size), mode="bilinear", antialias=True
                )  # (B, C, lowres, lowres)
            cond.update(
                sr_condition(
                    lowres.to(self.device),
                    cfg.model,
                    training=False,
                    generator=generator,
                    level=noise_aug,
                )
            )  # lowres (B, C, lowres, lowres), aug_level (B,) when augmented
        shape = (b, cfg.model.unet.channels, cfg.resolution, cfg.resolution)  # (B, C, R, R)
        sampling = sampling or cfg.sampling
        guide = self._guide_for(name, sampling)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = sample(
                stage.denoiser,
                shape,
                cond,
                sampling,
                generator=generator,
                progress=progress,
                guide=guide,
                negative=negative,
                inpaint=inpaint,
            )
        out = out.float().clamp(-1, 1)
        return out if inpaint is None else inpaint.paste(out)

    def _stage_names(self, depth: str | None, from_lowres: bool) -> list[str]:
        """The stages a generate call runs: from base64 (or the first SR stage) to depth."""
        depth = depth or self.depth
        names = [n for n in stages_to(depth) if not (from_lowres and n == "base64")]
        if not names:
            raise ConfigError(f"depth {depth!r}: given low-res images, an SR stage must follow")
        missing = [n for n in names if n not in self.stages]
        if missing:
            raise ConfigError(
                f"depth {depth!r} needs stages {missing}, which this cascade did not load"
            )
        if names[0] == "base64" or from_lowres:
            return names
        raise ConfigError(f"this cascade starts at {names[0]}: give the low-res images (lowres)")

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        depth: str | None = None,
        steps: PerStage[int] = None,
        guidance: PerStage[float] = None,
        sampler: PerStage[str] = None,
        noise_aug: PerStage[float] = None,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        lowres: torch.Tensor | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
        resample: PerStage[int] = 1,
        batch_size: int = 4,
        progress: bool = False,
        on_batch: Callable[[int], Any] | None = None,
        guidance_kind: PerStage[str] = None,
        negative: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate every prompt through the cascade up to ``depth``.

        Returns stage -> images (N, 3, res, res) in [-1, 1] on the CPU. ``steps``,
        ``guidance``, ``sampler`` and ``noise_aug`` are one value for every stage or a mapping
        stage -> value; what is not given comes from each stage's ``sampling`` config.
        ``seeds`` (one per prompt) gives each image its own noise; ``lowres`` (N, 3, h, w) in
        [-1, 1] starts the cascade at its first SR stage from those images. ``on_batch(n)``
        is called once each batch of n prompts is through every stage. ``guidance_kind``
        ("cfg" or "auto", one or per stage) picks classifier-free guidance or autoguidance
        (the guide from :meth:`set_guide` or ``sampling.guide``); ``negative`` (one per
        prompt, or one for all; "" keeps the null text) conditions CFG's unconditional branch
        on negative prompts instead of the null text.
        is called once each batch of n prompts is through every stage. ``inpaint_image``
        (N, 3, H, W) in [-1, 1] and ``inpaint_mask`` (N, 1, H, W) bool, True where to sample
        new content, inpaint at every stage; ``resample`` is RePaint's r (1: off), one value
        or per stage.
        """
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("no prompts to generate")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (inpaint_image is None) != (inpaint_mask is None):
            raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
        if inpaint_mask is not None and not inpaint_mask.flatten(1).any(1).all():
            raise ValueError("inpaint_mask: a mask with nothing to regenerate (all False)")
        checked = (("seeds", seeds), ("lowres", lowres), ("inpaint_image", inpaint_image))
        for what, given in (*checked, ("inpaint_mask", inpaint_mask)):
            if given is not None and len(given) != len(prompts):
                raise ValueError(f"{len(given)} {what} for {len(prompts)} prompts")
        negatives = negative_prompts(negative, len(prompts))
        names = self._stage_names(depth, lowres is not None)
        per_stage = (steps, guidance, sampler, guidance_kind)
        samplings = {
            n: self.stages[n].sampling(*(for_stage(v, n) for v in per_stage)) for n in names
        }
        auto = [n for n in names if samplings[n].guidance == "auto"]
        if negatives is not None and auto:
            raise ConfigError(
                f"negative prompts condition classifier-free guidance's unconditional branch; "
                f"{auto} sample with autoguidance (sampling.guidance auto), which has none"
            )
        for n in auto:  # a missing or unfit guide fails before any sampling
            self._guide_for(n, samplings[n])
        if inpaint_mask is not None:  # a sampler that cannot resample: refused before any work
            from imagen.diffusion.inpaint import check_resample

            for n in names:
                try:
                    check_resample(for_stage(resample, n) or 1, samplings[n].sampler)
                except ValueError as e:
                    raise ConfigError(f"stage {n}: {e}") from None
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        starts = range(0, len(prompts), batch_size)
        bar = _progress_bar(len(starts) * len(names), progress)
        for bi, i in enumerate(starts):
            text_embed, text_mask = self.encode(prompts[i : i + batch_size])
            neg = None
            if negatives is not None:
                chunk = negatives[i : i + batch_size]
                neg_embed, neg_mask = self.encode(chunk)
                null = torch.tensor([not t for t in chunk], device=self.device)
                neg = {"text_embed": neg_embed, "text_mask": neg_mask, "null": null}
            images = None if lowres is None else lowres[i : i + batch_size].float()
            for name in names:
                if bar is not None:
                    bar.set_description(f"{name} batch {bi + 1}/{len(starts)}")
                k = STAGES.index(name)
                gen = (
                    batch_generator(seed, k, bi, self.device)
                    if seeds is None
                    else image_generators(seeds[i : i + batch_size], k, self.device)
                )
                images = self.sample_stage(
                    name, text_embed, text_mask, images, sampling=samplings[name],
                    noise_aug=for_stage(noise_aug, name), generator=gen, negative=neg,
                    inpaint=self._inpaint(name, inpaint_image, inpaint_mask, i, batch_size,
                                          for_stage(resample, name) or 1),
                )  # fmt: skip
                out[name].append(images.cpu())
                if bar is not None:
                    bar.update(1)
            if on_batch is not None:
                on_batch(len(text_embed))
        if bar is not None:
            bar.close()
        return {n: torch.cat(v) for n, v in out.items()}

    def _inpaint(
        self, name: str, image: Any, mask: Any, start: int, size: int, resample: int
    ) -> Any:
        """The batch's known image and mask at the stage's resolution (None: no inpainting)."""
        if image is None:
            return None
        from imagen.diffusion import Inpaint, fit_image, fit_mask

        res = self.stages[name].resolution
        batch = slice(start, start + size)
        known = fit_image(image[batch].float(), res).to(self.device)
        return Inpaint(known, fit_mask(mask[batch], res).to(self.device), resample)


def stages_to(depth: str) -> list[str]:
    """["base64"], ["base64", "sr256"] or all three, by the last stage named."""
    if depth not in STAGES:
        raise ConfigError(f"depth: unknown stage {depth!r}; allowed: {list(STAGES)}")
    return list(STAGES[: STAGES.index(depth) + 1])


def load_encoder(
    cond: ConditioningConfig, encoder_path: str | Path | None, device: str | torch.device = "cpu"
) -> Any:
    """The T5 encoder of ``cond``, optionally from another folder (e.g. a registry artifact)."""
    from imagen.text import load_text_encoder

    if encoder_path is not None:
        cond = cond.model_copy(update={"encoder_path": str(encoder_path)})
    return load_text_encoder(cond, device=device)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="stage-batch", file=sys.stderr, dynamic_ncols=True)
