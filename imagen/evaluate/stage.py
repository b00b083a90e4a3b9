"""``imagen evaluate``: the evaluate stage of the pipeline, step by step.

Load the trained cascade and the held-out set, sweep the guidance scales, add the untrained
reference and the full-cascade grid, write the reports, log everything to the stage's MLflow
run, and register the models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagen.config import STAGES, Params
from imagen.data.holdout import load_holdout
from imagen.evaluate.metrics import FD_DUAL, Alignment, Fidelity
from imagen.evaluate.report import write_reports
from imagen.evaluate.sweep import best_tradeoff, sweep, untrained_reference
from imagen.progress import log_lines


def trained_cascade(params: Params, models_dir: Path) -> Any:
    """Every trained stage, in cascade order (the sweep needs the stages up to its depth; the
    cascade grid shows all of them). A missing stage up to the depth is a clear error."""
    from imagen.checkpoint import MODEL_FILE
    from imagen.sample.cascade import Cascade, stages_to

    trained: list[str] = []
    for name in STAGES:
        if not (models_dir / name / MODEL_FILE).exists():
            break
        trained.append(name)
    depth = params.evaluate.depth
    last = trained[-1] if len(trained) >= len(stages_to(depth)) else depth
    return Cascade.from_models_dir(models_dir, depth=last, precision=params.sample.precision)


def measures(params: Params, holdout: Any) -> tuple[Fidelity, list[Fidelity], Alignment]:
    """The sweep's fidelity axis, the other distances beside it, and its alignment scores.

    Whatever can be measured is: Inception FID / CLIP score when their weights are configured,
    the embedded evaluator's distance and agreement for captions of the embedded grammar, and
    the trained dual encoder (``evaluator.out_dir``) for every data set once it exists.
    """
    from imagen.evaluate.dual import load_dual
    from imagen.evaluate.dual_stage import MODEL_FILE

    cfg = params.evaluate
    path = Path(params.evaluator_dir) / MODEL_FILE
    dual = load_dual(path) if path.exists() else None
    embedded = all(holdout.attributes)
    if dual is None and not embedded and not cfg.clip_path:
        raise FileNotFoundError(
            f"{path}: no trained evaluator, and these held-out captions do not name the embedded "
            "data's attributes, so nothing else can measure them; run `imagen evaluator` first "
            "(`dvc repro` does), or set evaluate.clip_path to a local CLIP folder"
        )
    alignment = Alignment(cfg.clip_path, dual=dual, embedded=embedded)
    if cfg.inception_path or embedded:
        fidelity = Fidelity(cfg.inception_path)
        extra = [Fidelity.dual(dual)] if dual is not None else []
    elif dual is not None:
        fidelity, extra = Fidelity.dual(dual), []
    else:  # CLIP score without Inception: the embedded evaluator's distance is all there is
        fidelity, extra = Fidelity(), []
    return fidelity, extra, alignment


def cascade_grid_report(
    params: Params,
    cascade: Any,
    captions: list[str],
    out: Path,
    progress: bool,
    guidance: float | None = None,
) -> dict[str, Any]:
    """reports/cascade.png: a few held-out prompts through every trained stage, side by side,
    the base stage at ``guidance`` (the sweep's best scale; None: its own)."""
    from imagen.sample.cascade import cascade_grid

    cfg = params.evaluate
    t0 = time.perf_counter()
    prompts = captions[: cfg.cascade_prompts]
    images = cascade.generate(
        prompts,
        depth=cascade.depth,
        steps=cfg.cascade_steps,
        guidance=None if guidance is None else {"base64": guidance},
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=progress,
    )  # stage -> (P, 3, res, res)
    cascade_grid(images, prompts, cell=256).save(out / "cascade.png")
    return {
        "stages": list(images),
        "prompts": prompts,
        "base64_guidance": guidance,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def sr_reports(
    params: Params,
    cascade: Any,
    out: Path,
    run: Any,
    say: Callable[[str], None],
    tile_fidelity: Callable[[], Fidelity] | None = None,
) -> dict[str, Any]:
    """Each trained SR stage against bicubic on held-out pairs (imagen.evaluate.sr): at least
    ``evaluate.sr_pairs`` of them, more where the stage's tiles would fall short of
    ``evaluate.sr_tiles``."""
    from imagen.evaluate.sr import evaluate_sr_stage, pairs_for

    cfg = params.evaluate
    found: dict[str, Any] = {}
    for name in [n for n in cascade.stages if n != "base64"] if cfg.sr_pairs else []:
        res = cascade.stages[name].resolution
        n = pairs_for(res, cfg.sr_pairs, cfg.sr_tiles)
        pairs = load_holdout(params, n, res)
        found[name] = r = evaluate_sr_stage(
            cascade,
            name,
            pairs,
            out,
            pairs=n,
            seed=cfg.seed,
            batch_size=min(cfg.batch_size, 4),
            inception_path=cfg.inception_path,
            fidelity=tile_fidelity() if tile_fidelity else None,
        )
        for kind in ("sr", "bicubic"):
            run.log_metrics({f"{name}/{kind}_{k}": v for k, v in r[kind].items()})
        run.log_artifact(out / f"sr_{name}.png", "reports")
        say(f"imagen evaluate: {name}, {r['pairs']} held-out pairs: SR {r['sr']}")
        say(f"imagen evaluate: {name}, bicubic upsampling of the same inputs: {r['bicubic']}")
    return found


def beyond_the_sweep(
    params: Params,
    cascade: Any,
    captions: list[str],
    out: Path,
    run: Any,
    progress: bool,
    say: Callable[[str], None],
    *,
    guidance: float | None = None,
    tile_fidelity: Callable[[], Fidelity] | None = None,
) -> dict[str, Any]:
    """The full-cascade grid (the base stage at ``guidance``) and each SR stage against
    bicubic, its tiles measured by ``tile_fidelity()`` (metrics.json entries)."""
    extra: dict[str, Any] = {}
    if params.evaluate.cascade_prompts > 0:
        extra["cascade"] = grid = cascade_grid_report(
            params, cascade, captions, out, progress, guidance
        )
        say(f"imagen evaluate: cascade grid {grid['stages']} in {grid['seconds']} s")
    extra.update(sr_reports(params, cascade, out, run, say, tile_fidelity))
    return extra


def evaluator_quality(params: Params) -> dict[str, Any]:
    """The dual encoder's own held-out quality, as its stage measured it (metrics.json)."""
    path = Path(params.evaluator_dir) / "metrics.json"
    if not path.exists():
        return {}
    found = json.loads(path.read_text())
    return {"heldout": found.get("heldout", {}), "training_pairs": found.get("training_pairs")}


def log_sweep(run: Any, result: Any, best: dict[str, Any], out: Path) -> None:
    """Every scale as one step of the run's metrics, the best point, and the reports folder."""
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


def register(
    params: Params, run: Any, cascade: Any, models_dir: Path, metrics: dict[str, Any]
) -> tuple[dict[str, str], str]:
    """Register the stage models and the imagen-cascade pyfunc as ``challenger``; the champion
    alias moves on evidence (:mod:`imagen.mlops.promote`). Returns (versions, the decision)."""
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.promote import evidence, promote_on_evidence, version_tags
    from imagen.mlops.registry import register_models
    from imagen.text import resolve_encoder_path

    encoder = resolve_encoder_path(cascade.stages["base64"].config.model.conditioning)
    uri = tracking_uri(params)
    ev = evidence(params, metrics)
    versions = register_models(
        run.run_id,
        models_dir,
        encoder,
        tracking_uri=uri,
        alias=None,
        tags={
            "imagen.best_guidance_scale": metrics["best"]["guidance_scale"],
            **version_tags(params, metrics, ev),
        },
    )
    _, decision = promote_on_evidence(params, versions, ev, uri=uri)
    return versions, decision


def evaluate(
    params: Params,
    *,
    models_dir: str | Path | None = None,
    progress: bool = False,
    register_models: bool | None = None,
    parent_run_id: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the whole evaluate stage; returns the metrics written to metrics.json."""
    from imagen.mlops.tracking import stage_run

    cfg = params.evaluate
    models_dir = Path(models_dir or params.models_dir)
    out = Path(cfg.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    cascade = trained_cascade(params, models_dir)
    holdout = load_holdout(params, cfg.num_images, cascade.stages[cfg.depth].resolution)
    fidelity, extra_fidelity, alignment = measures(params, holdout)
    also = ", ".join(f.name for f in extra_fidelity)
    say(
        f"imagen evaluate: {len(cfg.guidance_scales)} guidance scales x {len(holdout)} images "
        f"at {cfg.depth} from {holdout.source}; {fidelity.name} / {alignment.name}"
        + (f" (also {also})" if also else "")
    )
    if register_models is None:
        register_models = params.mlflow.register_models
    auto_scales = (cfg.guide_scales or cfg.guidance_scales) if cfg.guide else []
    if cfg.guide:  # a missing or unfit guide fails here, before any sampling
        from imagen.mlops.client import tracking_uri

        uri = tracking_uri(params)
        cascade.set_guide(cfg.guide, stage="base64", key="evaluate.guide", tracking_uri=uri)
    # + the untrained reference, + the autoguidance sweep
    sweeps = len(cfg.guidance_scales) + (cfg.depth == "base64") + len(auto_scales)
    lines = log_lines("imagen evaluate", sweeps * len(holdout), "image")
    with stage_run(params, "evaluate", parent_run_id=parent_run_id) as run:
        common = dict(
            steps=cfg.steps,
            sampler=cfg.sampler,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            extra_fidelity=extra_fidelity,
            on_batch=lines.update if lines else None,
        )
        swept = dict(
            common,
            depth=cfg.depth,
            fidelity=fidelity,
            alignment=alignment,
            keep=cfg.grid_images,
            progress=progress,
            log=say,
        )
        result = sweep(cascade, holdout, cfg.guidance_scales, **swept)
        also = None
        if auto_scales:
            also = sweep(cascade, holdout, auto_scales, kind="auto", **swept)
            for i, row in enumerate(also.rows):
                run.log_metrics({f"auto_{k}": v for k, v in row.items()}, step=i)
        extra = {"steps": cfg.steps, "seed": cfg.seed}
        if cfg.guide:
            extra["guide"] = cfg.guide
        if alignment.dual is not None:
            extra["chance_dual"] = alignment.chance(holdout.captions)
            extra["evaluator_quality"] = evaluator_quality(params)
        if cfg.depth == "base64":
            extra["untrained"] = untrained_reference(
                cascade, holdout, fidelity, alignment, **common
            )
            say(f"imagen evaluate: untrained base64 (guidance 1): {extra['untrained']}")
            run.log_metrics({f"untrained_{k}": v for k, v in extra["untrained"].items()})
        # the cascade grid at the sweep's best scale (write_reports picks the same point)
        chosen = best_tradeoff(
            result.rows,
            result.fidelity,
            result.alignment,
            cfg.tradeoff_tolerance,
            cfg.tradeoff_margin,
        )
        dual = alignment.dual
        tiles = (lambda: Fidelity.dual(dual)) if fidelity.name == FD_DUAL else None
        extra.update(
            beyond_the_sweep(
                params,
                cascade,
                holdout.captions,
                out,
                run,
                progress,
                say,
                guidance=chosen["guidance_scale"],
                tile_fidelity=tiles,
            )
        )
        metrics = write_reports(
            result,
            holdout,
            out,
            tolerance=cfg.tradeoff_tolerance,
            margin=cfg.tradeoff_margin,
            extra=extra,
            also=also,
        )
        best = metrics["best"]
        log_sweep(run, result, best, out)
        if register_models and run.active:
            versions, decision = register(params, run, cascade, models_dir, metrics)
            metrics["registered"] = versions
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            say(f"imagen evaluate: registered {versions}; {decision}")
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
            register_models=False if args.no_register else None,
            parent_run_id=args.parent_run_id,
        )
    except FileNotFoundError as e:
        print(f"imagen evaluate: {e}", file=sys.stderr)
        return 2
    return 0
