"""``imagen evaluate``: the FID-CLIP sweep over guidance scales, reports, model registration.

For every classifier-free guidance scale in ``evaluate.guidance_scales`` (NeMo's 1, 1.5, 2, 3,
4, 5, 6, 7 by default) the cascade generates ``evaluate.num_images`` images, up to
``evaluate.depth`` (base64 by default), from held-out captions, and two numbers are measured:

- fidelity, a Frechet distance between generated and held-out real images (lower is better):
  ``fid`` -- torchmetrics' FrechetInceptionDistance with Inception-v3 weights from
  ``evaluate.inception_path`` (needs torch-fidelity) -- or, with no Inception weights,
  ``fd_embedded`` -- the same torchmetrics Frechet distance over the embedded evaluator's
  features (:class:`imagen.embedded.evaluator.EmbeddedEvaluator`). The latter is NOT FID and is
  labelled ``FD-embedded-evaluator`` everywhere.
- alignment of image and caption (higher is better): ``clip_score`` -- torchmetrics' CLIPScore
  with the CLIP model in the local folder ``evaluate.clip_path`` -- or, with no CLIP weights,
  ``caption_agreement_embedded`` -- the embedded evaluator's share of caption attributes
  (shape, color, size, position, background) read back correctly from the image. When captions
  come from the embedded grammar the per-attribute agreements are reported in both cases.

The swept scale is the base64 stage's guidance (Imagen's FID-CLIP curves sweep the base model);
SR stages, when ``depth`` includes them, keep their configured guidance. Every scale uses the
same seed, so the curves compare scales on the same initial noise.

Best trade-off point: the scale with the lowest fidelity distance among the scales whose
alignment is within ``evaluate.tradeoff_tolerance`` (default 10%) of the observed alignment
range below the best alignment, i.e. ``alignment >= max - tol * (max - min)``. With tolerance 0
it is the best-aligned scale; with 1 the lowest-distance one.

Outputs (``evaluate.reports_dir``, default reports/): ``metrics.json`` (every scale, the best
point, the metric names), ``fid_clip.csv`` (columns ``guidance_scale,<fidelity>,<alignment>``
for ``dvc plots``), ``fid_clip.png`` (distance on y against alignment on x, each point labelled
with its scale), ``grids/scale_<w>.png`` (samples with their captions), ``cascade.png`` (a few
prompts through every trained stage, 64 -> 256 -> 1024 side by side). All of it is logged to
the evaluate stage's MLflow run; then the stage models and the ``imagen-cascade`` pyfunc model
are registered (:mod:`imagen.mlops.registry`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.config import STAGES, ConfigError, Params

__all__ = [
    "Alignment",
    "Fidelity",
    "HeldOut",
    "add_arguments",
    "best_tradeoff",
    "clip_model_loader",
    "evaluate",
    "load_holdout",
    "main",
    "plot_fid_clip",
    "sweep",
    "write_reports",
]

FD_EMBEDDED = "fd_embedded"
FD_EMBEDDED_LABEL = (
    "FD-embedded-evaluator (Frechet distance of embedded-evaluator features; not FID)"
)
AGREEMENT = "caption_agreement_embedded"


# --------------------------------------------------------------------------------------------
# Held-out captions and real images
# --------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Held-out captions, the attributes they name ({} when unknown) and real images (uint8)."""

    captions: list[str]
    attributes: list[dict[str, str]]
    images: Tensor  # (N, 3, R, R) uint8
    source: str = ""

    def __len__(self) -> int:
        return len(self.captions)


def _pil_to_uint8(image: Any, size: int) -> Tensor:
    import numpy as np
    from PIL import Image

    img = image.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC if img.width < size else Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _attributes_of(caption: str, given: dict | None) -> dict[str, str]:
    from imagen.embedded.dataset import ATTRIBUTES
    from imagen.embedded.evaluator import parse_caption

    found = dict(given or {})
    if not found:
        found = parse_caption(caption)
    return {k: str(v) for k, v in found.items() if k in ATTRIBUTES and v in ATTRIBUTES[k]}


def load_holdout(params: Params, num: int, resolution: int) -> HeldOut:
    """``num`` held-out samples: from ``<shards_dir>/holdout-*.tar`` when ingest wrote them,
    else from the embedded dataset's holdout split; images resized to ``resolution``."""
    pattern = str(Path(params.data.shards_dir) / "holdout-*.tar")
    shards = sorted(glob.glob(pattern))
    captions: list[str] = []
    attrs: list[dict[str, str]] = []
    images: list[Tensor] = []
    if shards:
        import webdataset as wds
        from PIL import Image

        from imagen.data.loader import pick_image

        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            data = pick_image(sample, resolution)
            if data is None or "txt" not in sample:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = sample["txt"].decode("utf-8").strip()
            captions.append(caption)
            attrs.append(_attributes_of(caption, meta.get("attributes")))
            images.append(_pil_to_uint8(Image.open(io.BytesIO(data)), resolution))
            if len(captions) == num:
                break
        source = f"{len(shards)} holdout shard(s) {pattern}"
        if len(captions) < num:
            warnings.warn(
                f"{pattern}: only {len(captions)} held-out samples (evaluate.num_images={num})",
                stacklevel=2,
            )
    else:
        from imagen.embedded.dataset import EmbeddedDataset

        data = EmbeddedDataset(num, seed=params.data.seed, size=resolution, split="holdout")
        for item in data:
            captions.append(item["caption"])
            attrs.append(_attributes_of(item["caption"], item["attributes"]))
            images.append(_pil_to_uint8(item["image"], resolution))
        source = "embedded dataset (holdout split)"
    if not captions:
        raise ConfigError(f"evaluate: no held-out samples found ({pattern} holds none)")
    return HeldOut(captions, attrs, torch.stack(images), source)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
class Fidelity:
    """A Frechet distance through torchmetrics: FID (Inception) or FD over evaluator features.

    The real images' statistics are computed once; :meth:`compute` takes one scale's images.
    """

    def __init__(self, inception_path: str | None = None, feature: nn.Module | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if inception_path:
            path = Path(inception_path)
            if not path.exists():
                raise ConfigError(f"evaluate.inception_path: {path} does not exist")
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

            if not _TORCH_FIDELITY_AVAILABLE:
                raise ConfigError(
                    "evaluate.inception_path is set, but FID with Inception needs torch-fidelity "
                    "(and torchvision): install the optional extra with "
                    "`pip install 'imagen-cascade[inception]'` (or `pip install torch-fidelity`), "
                    "or set evaluate.inception_path: null to use the embedded evaluator's "
                    "Frechet distance (fd_embedded)"
                )
            self.name, self.label = "fid", "FID (Inception-v3, torchmetrics)"
            self.metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(path),
                reset_real_features=False,
            )
        else:
            if feature is None:
                from imagen.embedded.evaluator import EmbeddedEvaluator

                feature = EmbeddedEvaluator()
            self.name, self.label = FD_EMBEDDED, FD_EMBEDDED_LABEL
            self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)

    def set_real(self, images: Tensor, batch_size: int = 64) -> None:
        """Real images, uint8 (N, 3, H, W)."""
        for i in range(0, len(images), batch_size):
            self.metric.update(images[i : i + batch_size], real=True)

    def compute(self, fake: Tensor, batch_size: int = 64) -> float:
        """Distance of generated uint8 images (N, 3, H, W) to the real ones."""
        self.metric.reset()  # keeps the real statistics (reset_real_features=False)
        for i in range(0, len(fake), batch_size):
            self.metric.update(fake[i : i + batch_size], real=False)
        return float(self.metric.compute())


class _TensorFeatures(nn.Module):
    """A transformers CLIPModel whose ``get_*_features`` return tensors.

    transformers 5 returns output objects (the projected embedding in ``pooler_output``) where
    torchmetrics' CLIPScore expects tensors; this adapter keeps the real model underneath.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )


def clip_model_loader(path: str | Path) -> Callable[[], tuple[nn.Module, Any]]:
    """A loader for torchmetrics' CLIPScore(model_name_or_path=...) from a local CLIP folder
    (``save_pretrained`` of a CLIPModel and its CLIPProcessor)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"evaluate.clip_path: {path} is not a CLIP model folder (no config.json); save one "
            "with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained (e.g. "
            "openai/clip-vit-large-patch14 downloaded elsewhere), or set clip_path: null"
        )

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CLIPModel.from_pretrained(str(path)).eval()
            processor = CLIPProcessor.from_pretrained(str(path))
        return _TensorFeatures(model), processor

    return load


class Alignment:
    """Caption-image alignment: CLIP score (torchmetrics) or the embedded caption agreement.

    The embedded evaluator's per-attribute agreements are added whenever the captions name
    embedded attributes.
    """

    def __init__(self, clip_path: str | None = None) -> None:
        from imagen.embedded.evaluator import EmbeddedEvaluator

        self.evaluator = EmbeddedEvaluator()
        self.clip = None
        if clip_path:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(model_name_or_path=clip_model_loader(clip_path))
            self.name, self.label = "clip_score", "CLIP score (torchmetrics, 100 x cosine)"
        else:
            self.name, self.label = AGREEMENT, "caption agreement (embedded evaluator, 0..1)"

    def compute(
        self,
        images: Tensor,
        captions: Sequence[str],
        attributes: Sequence[dict[str, str]],
        batch_size: int = 64,
    ) -> dict[str, float]:
        """Metrics for uint8 images (N, 3, H, W) against their captions."""
        out: dict[str, float] = {}
        if self.clip is not None:
            self.clip.reset()
            for i in range(0, len(images), batch_size):
                self.clip.update(images[i : i + batch_size], list(captions[i : i + batch_size]))
            out["clip_score"] = float(self.clip.compute())
        if any(attributes):
            scores = self.evaluator.score(images, list(attributes))
            agreement = float(scores.pop("agreement").nanmean())
            out[AGREEMENT] = agreement
            for name, values in scores.items():
                if not torch.isnan(values).all():
                    out[f"agreement_{name}"] = float(values.nanmean())
        elif self.clip is None:
            raise ConfigError(
                "evaluate: the held-out captions name no embedded attributes, so caption "
                "agreement cannot be measured; set evaluate.clip_path to a local CLIP folder"
            )
        return out


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    depth: str
    fidelity: str
    fidelity_label: str
    alignment: str
    alignment_label: str
    rows: list[dict[str, float]] = field(default_factory=list)
    samples: dict[float, Tensor] = field(default_factory=dict)  # first images per scale
    seconds: float = 0.0


def _uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sweep(
    cascade: Any,
    holdout: HeldOut,
    scales: Sequence[float],
    *,
    depth: str,
    fidelity: Fidelity,
    alignment: Alignment,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    keep: int = 16,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Generate ``holdout``'s captions at every guidance scale; fidelity + alignment each."""
    start = time.perf_counter()
    res = cascade.stages[depth].resolution
    real = holdout.images
    if real.shape[-1] != res:
        real = torch.nn.functional.interpolate(real.float(), size=(res, res), mode="area")
        real = real.round().clamp(0, 255).to(torch.uint8)
    fidelity.set_real(real, batch_size)
    result = SweepResult(depth, fidelity.name, fidelity.label, alignment.name, alignment.label)
    for w in scales:
        t0 = time.perf_counter()
        images = cascade.generate(
            holdout.captions,
            depth=depth,
            steps=steps,
            guidance={"base64": float(w)},
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )[depth]
        fake = _uint8(images)
        row = {"guidance_scale": float(w), fidelity.name: fidelity.compute(fake, batch_size)}
        row.update(alignment.compute(fake, holdout.captions, holdout.attributes, batch_size))
        row["seconds"] = time.perf_counter() - t0
        result.rows.append(row)
        result.samples[float(w)] = images[:keep]
        if log:
            log(
                f"guidance {w:g}: {fidelity.name} {row[fidelity.name]:.3f}, "
                f"{alignment.name} {row[alignment.name]:.3f} ({row['seconds']:.1f} s)"
            )
    result.seconds = time.perf_counter() - start
    return result


def best_tradeoff(
    rows: Sequence[dict[str, float]], fidelity: str, alignment: str, tolerance: float = 0.1
) -> dict[str, Any]:
    """The row with the lowest ``fidelity`` among rows with ``alignment`` within ``tolerance``
    of the alignment range below the best: ``alignment >= max - tolerance * (max - min)``."""
    if not rows:
        raise ValueError("no sweep rows")
    values = [r[alignment] for r in rows]
    hi, lo = max(values), min(values)
    threshold = hi - tolerance * (hi - lo)
    eligible = [r for r in rows if r[alignment] >= threshold - 1e-12]
    best = min(eligible, key=lambda r: (r[fidelity], -r[alignment]))
    return {
        **best,
        "rule": (
            f"lowest {fidelity} among guidance scales with {alignment} >= max - "
            f"{tolerance:g} x (max - min) = {threshold:.4f}"
        ),
        "eligible_scales": [r["guidance_scale"] for r in eligible],
    }


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def _scale_name(w: float) -> str:
    return f"{w:g}".replace(".", "_")


def plot_fid_clip(result: SweepResult, best: dict[str, Any], path: str | Path) -> Path:
    """Fidelity distance (y) against alignment (x), each point labelled with its scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r[result.alignment] for r in result.rows]
    y = [r[result.fidelity] for r in result.rows]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.plot(x, y, "-o", color="tab:blue", markersize=5)
    for r, xi, yi in zip(result.rows, x, y, strict=True):
        ax.annotate(
            f"w={r['guidance_scale']:g}",
            (xi, yi),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.plot(
        [best[result.alignment]],
        [best[result.fidelity]],
        "*",
        color="tab:red",
        markersize=14,
        label=f"best trade-off (w={best['guidance_scale']:g})",
    )
    ax.set_xlabel(result.alignment_label)
    ax.set_ylabel(result.fidelity_label if result.fidelity == "fid" else "FD-embedded-evaluator")
    ax.set_title(
        f"{result.fidelity} vs {result.alignment} over guidance scales ({result.depth})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reports(
    result: SweepResult,
    holdout: HeldOut,
    out_dir: str | Path,
    *,
    tolerance: float = 0.1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.json, fid_clip.csv, fid_clip.png and grids/scale_<w>.png; returns the metrics."""
    from imagen.embedded.evaluator import chance_levels
    from imagen.images import image_grid, to_pil

    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    best = best_tradeoff(result.rows, result.fidelity, result.alignment, tolerance)
    metrics: dict[str, Any] = {
        "depth": result.depth,
        "num_images": len(holdout),
        "holdout": holdout.source,
        "fidelity_metric": result.fidelity,
        "fidelity_label": result.fidelity_label,
        "alignment_metric": result.alignment,
        "alignment_label": result.alignment_label,
        "best": best,
        "scales": result.rows,
        "seconds": round(result.seconds, 2),
    }
    if result.alignment == AGREEMENT or any(AGREEMENT in r for r in result.rows):
        metrics["chance_agreement"] = chance_levels()
    metrics.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    with (out / "fid_clip.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["guidance_scale", result.fidelity, result.alignment])
        for r in result.rows:
            writer.writerow([r["guidance_scale"], r[result.fidelity], r[result.alignment]])
    plot_fid_clip(result, best, out / "fid_clip.png")
    for w, images in result.samples.items():
        if len(images) == 0:
            continue
        pil = [to_pil(x) for x in images]
        grid = image_grid(pil, holdout.captions[: len(pil)], cell=128)
        grid.save(out / "grids" / f"scale_{_scale_name(w)}.png")
    return metrics


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def untrained_reference(
    cascade: Any,
    holdout: HeldOut,
    fidelity: Fidelity,
    alignment: Alignment,
    *,
    steps: int | None,
    seed: int,
    batch_size: int,
) -> dict[str, float]:
    """The same metrics for a freshly initialised base UNet of the same config: the yardstick
    that says how much training moved the fidelity and alignment numbers."""
    from imagen.nn import build_unet
    from imagen.sample.cascade import Cascade

    config = cascade.stages["base64"].config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_unet(config.model).eval()
    fresh = Cascade({"base64": (net, config)}, cascade.encoder, cascade.device)
    result = sweep(
        fresh,
        holdout,
        [1.0],
        depth="base64",
        fidelity=fidelity,
        alignment=alignment,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        keep=0,
    )
    row = result.rows[0]
    return {k: float(v) for k, v in row.items() if k not in ("guidance_scale", "seconds")}


def evaluate(
    params: Params,
    *,
    models_dir: str | Path | None = None,
    progress: bool = False,
    register: bool | None = None,
    parent_run_id: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the whole evaluate stage; returns the metrics written to metrics.json."""
    from imagen.checkpoint import MODEL_FILE
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.tracking import stage_run
    from imagen.sample.cascade import Cascade, cascade_grid, stages_to

    cfg = params.evaluate
    models_dir = Path(models_dir or params.models_dir)
    out = Path(cfg.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)

    # The sweep needs every stage up to depth; the cascade grid uses every trained stage.
    trained: list[str] = []
    for name in STAGES:
        if not (models_dir / name / MODEL_FILE).exists():
            break
        trained.append(name)
    last = trained[-1] if len(trained) >= len(stages_to(cfg.depth)) else cfg.depth
    cascade = Cascade.from_models_dir(models_dir, depth=last)  # clear error when missing
    fidelity = Fidelity(cfg.inception_path)
    alignment = Alignment(cfg.clip_path)
    holdout = load_holdout(params, cfg.num_images, cascade.stages[cfg.depth].resolution)
    say(
        f"imagen evaluate: {len(cfg.guidance_scales)} guidance scales x {len(holdout)} images "
        f"at {cfg.depth} from {holdout.source}; {fidelity.name} / {alignment.name}"
    )
    if register is None:
        register = params.mlflow.register_models
    with stage_run(params, "evaluate", parent_run_id=parent_run_id) as run:
        result = sweep(
            cascade,
            holdout,
            cfg.guidance_scales,
            depth=cfg.depth,
            fidelity=fidelity,
            alignment=alignment,
            steps=cfg.steps,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            keep=cfg.grid_images,
            progress=progress,
            log=say,
        )
        extra: dict[str, Any] = {"steps": cfg.steps, "seed": cfg.seed}
        if cfg.depth == "base64":
            extra["untrained"] = untrained_reference(
                cascade,
                holdout,
                fidelity,
                alignment,
                steps=cfg.steps,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
            )
            say(f"imagen evaluate: untrained base64 (guidance 1): {extra['untrained']}")
            run.log_metrics({f"untrained_{k}": v for k, v in extra["untrained"].items()})
        # The full cascade, a few prompts side by side at every trained stage.
        if cfg.cascade_prompts > 0:
            t0 = time.perf_counter()
            prompts = holdout.captions[: cfg.cascade_prompts]
            images = cascade.generate(
                prompts,
                depth=cascade.depth,
                steps=cfg.cascade_steps,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                progress=progress,
            )
            cascade_grid(images, prompts, cell=256).save(out / "cascade.png")
            extra["cascade"] = {
                "stages": list(images),
                "prompts": prompts,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            say(f"imagen evaluate: cascade grid {list(images)} in {extra['cascade']['seconds']} s")
        metrics = write_reports(result, holdout, out, tolerance=cfg.tradeoff_tolerance, extra=extra)
        best = metrics["best"]
        for i, row in enumerate(result.rows):
            run.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=i)
        run.log_metrics(
            {
                f"best_{result.fidelity}": best[result.fidelity],
                f"best_{result.alignment}": best[result.alignment],
                "best_guidance_scale": best["guidance_scale"],
            }
        )
        run.set_tags(
            {"imagen.fidelity_metric": result.fidelity, "imagen.alignment_metric": result.alignment}
        )
        run.log_artifact(out, "reports")
        if register and run.active:
            from imagen.mlops.registry import register_models
            from imagen.text import resolve_encoder_path

            encoder = resolve_encoder_path(cascade.stages["base64"].config.model.conditioning)
            versions = register_models(
                run.run_id,
                models_dir,
                encoder,
                tracking_uri=tracking_uri(params),
                alias=params.mlflow.model_alias,
                tags={
                    "imagen.best_guidance_scale": best["guidance_scale"],
                    f"imagen.best_{result.fidelity}": f"{best[result.fidelity]:.4f}",
                    f"imagen.best_{result.alignment}": f"{best[result.alignment]:.4f}",
                },
            )
            metrics["registered"] = versions
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            say(f"imagen evaluate: registered {versions} (alias {params.mlflow.model_alias!r})")
    say(
        f"imagen evaluate: best guidance {best['guidance_scale']:g} "
        f"({result.fidelity} {best[result.fidelity]:.3f}, "
        f"{result.alignment} {best[result.alignment]:.3f}); reports in {out}/"
    )
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help="models folder (default: models_dir)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run of the pipeline")
    parser.add_argument("--no-register", action="store_true", help="skip the model registry")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace, params: Params) -> int:
    try:
        evaluate(
            params,
            models_dir=args.models,
            progress=not args.no_progress,
            register=False if args.no_register else None,
            parent_run_id=args.parent_run_id,
        )
    except FileNotFoundError as e:
        print(f"imagen evaluate: {e}", file=sys.stderr)
        return 2
    return 0
