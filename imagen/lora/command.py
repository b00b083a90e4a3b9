"""``imagen finetune``: teach a trained stage a few captioned pictures with LoRA adapters.

    imagen finetune --stage base64 --images my-stars/ [--prior 16] [--from MODEL]

Everything the command needs is checked first (the folder and each picture's caption, the
source model, the prior captions), then it trains (:mod:`imagen.lora.tune`) and writes
``--out`` (default ``<models_dir>/lora-<folder name>``):

- ``<stage>/model.pt``: the stage model with the adapters merged into its weights, the same
  self-describing file ``imagen train`` writes, so ``imagen sample --models OUT`` and the pyfunc
  load it; the later stages' model files are copied beside it from the source's models folder,
  so the whole cascade samples from OUT;
- ``adapter/``: the LoRA adapters alone (``peft``'s ``adapter_model.safetensors`` and config);
- ``metrics.json`` (the loss on the pictures before and after, time, sizes), ``loss.csv`` and
  ``compare.png`` (each picture, the model's sample of its caption before and after).

It runs as an MLflow run ``finetune@<stage>`` (params, metrics, the files above) and registers
the merged model as a new version of ``imagen-<stage>`` with the alias ``--alias`` (``lora``);
the ``champion`` alias does not move.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from imagen.checkpoint import MODEL_FILE, read_stage, save_stage
from imagen.config import STAGES, ConfigError, Params, StageConfig
from imagen.lora.images import TeachImages, read_images
from imagen.lora.tune import TuneResult, TuneSettings, encode, finetune, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", default="base64", choices=["base64"], help="stage to adapt")
    parser.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="folder of pictures with captions (captions.csv / captions.jsonl / metadata.csv /"
        " metadata.jsonl / .txt beside each image), as ingest reads",
    )
    parser.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="MODEL",
        help="the trained stage: a model.pt, its folder or a registered model "
        "(models:/imagen-base64@champion); default <models_dir>/<stage>",
    )
    parser.add_argument("--out", default=None, help="default: <models_dir>/lora-<folder name>")
    d = TuneSettings()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (adapters)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument(
        "--prior",
        type=int,
        default=0,
        metavar="N",
        help="prior preservation: N samples the model draws from other captions "
        "(--prior-prompts, default the held-out captions) train beside the "
        "pictures",
    )
    parser.add_argument(
        "--prior-prompts",
        default=None,
        metavar="FILE",
        help="one caption a line for the prior samples",
    )
    parser.add_argument("--prior-weight", type=float, default=d.prior_weight)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--alias", default="lora", help="registry alias of the new version")
    parser.add_argument("--no-register", action="store_true", help="skip the model registry")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run")


def _say(text: str) -> None:
    print(f"imagen finetune: {text}", file=sys.stderr, flush=True)


def resolve_model(spec: str, stage: str, params: Params) -> tuple[Path, Path | None]:
    """(the stage's model.pt, the encoder folder that came with it or None) for ``--from``."""
    if spec.startswith(("models:/", "runs:/")):
        from imagen.mlops.client import tracking_uri
        from imagen.train.finetune import resolve_source

        file = resolve_source(spec, stage, tracking_uri(params))
        encoder = file.parent.parent / "encoder"  # a registered pyfunc: artifacts/encoder
        return file, encoder if (encoder / "config.json").is_file() else None
    path = Path(spec)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"--from {spec}: no stage model file ({file} not found; train the "
            f"stage first with `imagen train --stage {stage}`)"
        )
    return file, None


def prior_captions(args: argparse.Namespace, params: Params, teach: TeachImages) -> list[str]:
    """``--prior`` captions that are not the taught ones: the file's, else the held-out ones."""
    if not args.prior:
        return []
    taught = set(teach.captions)
    if args.prior_prompts:
        path = Path(args.prior_prompts)
        if not path.is_file():
            raise ConfigError(f"--prior-prompts {path}: not found")
        found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        where = str(path)
    else:
        from imagen.data.holdout import load_holdout

        found = load_holdout(params, args.prior + len(taught), 16).captions
        where = "the held-out captions"
    found = [c for c in found if c not in taught][: args.prior]
    if len(found) < args.prior:
        raise ConfigError(f"--prior {args.prior}: {where} give only {len(found)} other captions")
    return found


def _copy_later_stages(source_file: Path, stage: str, out: Path) -> list[str]:
    """The later stages' model files of the source's models folder, copied into ``out``."""
    copied = []
    for later in STAGES[STAGES.index(stage) + 1 :]:
        src = source_file.parent.parent / later / MODEL_FILE
        if source_file.name != MODEL_FILE or not src.is_file():
            break
        (out / later).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / later / MODEL_FILE)
        copied.append(later)
    return copied


def compare_grid(
    stage: StageConfig, source_file: Path, result: TuneResult, teach: TeachImages, encoder: Any
) -> Any:
    """Each picture beside the samples of its caption before and after (the same seed)."""
    from imagen.checkpoint import load_stage
    from imagen.diffusion import build_denoiser
    from imagen.images import image_grid, to_pil
    from imagen.nn import build_unet

    embeds, mask = encode(encoder, teach.captions)
    base, _ = load_stage(source_file)
    adapted = build_unet(stage.model)
    adapted.load_state_dict(result.merged)
    before = generate(build_denoiser(stage.model, base), stage, embeds, mask)
    after = generate(build_denoiser(stage.model, adapted.eval()), stage, embeds, mask)
    tiles, captions = [], []
    for i, caption in enumerate(teach.captions):
        tiles += [to_pil(teach.images[i]), to_pil(before[i]), to_pil(after[i])]
        captions += [f"taught: {caption}", "before", "after"]
    return image_grid(tiles, captions, cols=3, cell=128)


def write_outputs(
    out: Path,
    stage: StageConfig,
    result: TuneResult,
    metrics: dict[str, Any],
    source_step: int,
) -> Path:
    """model.pt (merged), adapter/, metrics.json, loss.csv under ``out``; the model file."""
    out.mkdir(parents=True, exist_ok=True)
    extra = {"metrics": metrics, "lora": {k: v for k, v in metrics.items() if k != "stage"}}
    file = save_stage(out / stage.name, stage, result.merged, step=source_step, extra=extra)
    result.model.save_pretrained(str(out / "adapter"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = "".join(f"{s},{v:.6f}\n" for s, v in result.history)
    (out / "loss.csv").write_text("step,loss\n" + rows)
    return file


def run(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    """Check everything, fine-tune, write and log; returns the metrics."""
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.tracking import stage_run
    from imagen.sample.cascade import load_encoder
    from imagen.text import resolve_encoder_path

    settings = TuneSettings(
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        batch_size=args.batch_size,
        prior=args.prior,
        prior_weight=args.prior_weight,
        seed=args.seed,
    )
    try:
        settings.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not Path(args.images).is_dir():
        raise ConfigError(
            f"--images {args.images}: not a folder (give a folder of captioned images)"
        )
    spec = args.source or str(Path(params.models_dir) / args.stage)
    source_file, shipped_encoder = resolve_model(spec, args.stage, params)
    stage, state, meta = read_stage(source_file)
    if stage.name != args.stage:
        raise ConfigError(f"--from {spec}: holds stage {stage.name!r}, not {args.stage!r}")
    teach = read_images(args.images, stage.resolution)
    priors = prior_captions(args, params, teach)
    out = Path(args.out or Path(params.models_dir) / f"lora-{Path(args.images).resolve().name}")
    cond = stage.model.conditioning
    encoder_dir = str(shipped_encoder) if shipped_encoder else resolve_encoder_path(cond)
    encoder = load_encoder(cond, encoder_dir)
    _say(
        f"{len(teach)} picture(s) from {args.images} at {stage.resolution} px; adapting "
        f"{spec} ({source_file}, step {meta['step']}) -> {out}"
    )
    from imagen.nn import build_unet

    net = build_unet(stage.model)
    net.load_state_dict(state)
    tags = {"imagen.lora.images": str(Path(args.images).resolve()), "imagen.lora.source": spec}
    with stage_run(
        params, f"finetune@{stage.name}", parent_run_id=args.parent_run_id, tags=tags
    ) as mlrun:
        mlrun.log_params({f"lora.{k}": v for k, v in vars(settings).items()})
        result = finetune(net, stage, teach, encoder, settings, priors, say=_say)
        metrics = {
            "stage": stage.name,
            "images": len(teach),
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "steps": settings.steps,
            "rank": settings.rank,
            "prior": len(result.prior_captions),
            "trainable_parameters": result.trainable,
            "adapted_layers": len(result.targets),
            "seconds": result.seconds,
            "source": spec,
        }
        file = write_outputs(out, stage, result, metrics, int(meta["step"]))
        copied = _copy_later_stages(source_file, stage.name, out)
        grid = compare_grid(stage, source_file, result, teach, encoder)
        grid.save(out / "compare.png")
        numbers = {f"lora/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        mlrun.log_metrics(numbers, step=settings.steps)
        for path in ("metrics.json", "loss.csv", "compare.png"):
            mlrun.log_artifact(out / path)
        mlrun.log_artifact(out / "adapter", "adapter")
        _say(
            f"loss on the pictures {result.loss_before:.4f} -> {result.loss_after:.4f} in "
            f"{result.seconds:.0f} s; wrote {file}"
            + (f" (and {', '.join(copied)} copied beside it)" if copied else "")
        )
        if not args.no_register and mlrun.active:
            from imagen.mlops.registry import register_stage_models

            versions = register_stage_models(
                mlrun.run_id,
                {stage.name: file},
                encoder_dir,
                tracking_uri=tracking_uri(params),
                alias=args.alias or None,
                tags={
                    "imagen.lora.images": tags["imagen.lora.images"],
                    "imagen.lora.source": spec,
                    "imagen.lora.loss_before": f"{result.loss_before:.5f}",
                    "imagen.lora.loss_after": f"{result.loss_after:.5f}",
                },
            )
            metrics["registered"] = {f"imagen-{s}": v for s, v in versions.items()}
            alias = f"@{args.alias}" if args.alias else ""
            _say(f"registered imagen-{stage.name} version {versions[stage.name]}{alias}")
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(args: argparse.Namespace, params: Params) -> int:
    try:
        metrics = run(args, params)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    print(json.dumps(metrics, indent=2))
    return 0
