"""``imagen evaluator``: train the offline image-text evaluator on the training split.

Reads ingest's ``train-*.tar`` shards (the 64 px copies), trains :class:`DualEncoder`
contrastively, measures its own quality on the held-out real pairs (``holdout-*.tar``) and writes
``<models_dir>/evaluator/evaluator.pt`` and ``metrics.json``. The run is logged to MLflow as the
stage ``evaluator``. ``imagen evaluate`` then uses it for every data set's Frechet distance and
alignment scores (``*_dual``) beside whatever else it can measure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imagen.config import ConfigError, Params
from imagen.evaluate.dual import DualConfig, DualEncoder, pair_quality, save_dual

MODEL_FILE = "evaluator.pt"
SHIFT = 4  # random translation of the training images, in pixels


def _shifted(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by up to SHIFT pixels (edge pixels repeated): a cheap augmentation."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (SHIFT,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_dual(
    images: torch.Tensor,
    captions: list[str],
    cfg: Any,
    *,
    log: Callable[[str], None] = print,
    every_s: float = 30.0,
) -> tuple[DualEncoder, list[float]]:
    """Train on uint8 (N, 3, R, R) images and their captions; returns the model and losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DualEncoder(
            DualConfig(resolution=cfg.resolution, width=cfg.width, embed_dim=cfg.embed_dim)
        )
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    x = DualEncoder.prepare(images)
    n, bs = len(captions), min(cfg.batch_size, len(captions))
    losses: list[float] = []
    t0 = last = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for step in range(cfg.steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        loss = model.loss(_shifted(x[idx], gen), [captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if now - last >= every_s or step + 1 == cfg.steps:
            rate = (step + 1) * bs / (now - t0)
            left = (cfg.steps - step - 1) * bs / max(rate, 1e-9)
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(
                f"imagen evaluator: step {step + 1}/{cfg.steps}, loss {recent:.3f}, "
                f"{rate:.0f} pairs/s, {left:.0f} s left"
            )
            last = now
    return model.eval(), losses


def train_evaluator(
    params: Params,
    *,
    parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole stage; returns what metrics.json holds."""
    from imagen.data.holdout import read_split
    from imagen.mlops.tracking import stage_run

    cfg = params.evaluator
    out = Path(params.evaluator_dir)
    t0 = time.perf_counter()
    captions, _, images, source = read_split(params, "train", cfg.max_images, cfg.resolution)
    if len(captions) < 2:
        raise ConfigError(
            f"evaluator: {source} hold {len(captions)} captioned images; run `imagen ingest` "
            "first (the evaluator trains on the training split)"
        )
    held, _, held_images, held_source = read_split(
        params, "holdout", cfg.quality_pairs, cfg.resolution
    )
    if len(held) < 2:
        raise ConfigError(
            f"evaluator: {held_source} hold {len(held)} pairs; its quality needs held-out pairs "
            "(data.num_holdout)"
        )
    log(
        f"imagen evaluator: {len(captions)} training pairs from {source} "
        f"({len(set(captions))} distinct captions), {len(held)} held-out pairs, {cfg.steps} steps"
    )
    with stage_run(params, "evaluator", parent_run_id=parent_run_id) as run:
        model, losses = train_dual(torch.stack(images), captions, cfg, log=log)
        held_x = torch.stack(held_images)
        quality = pair_quality(model, held_x, held)
        seen = min(len(captions), cfg.quality_pairs)
        train_quality = pair_quality(model, torch.stack(images[:seen]), captions[:seen])
        metrics = {
            "training_pairs": len(captions),
            "distinct_captions": len(set(captions)),
            "steps": cfg.steps,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "heldout": quality,
            "train": train_quality,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        save_dual(model, out / MODEL_FILE, extra={"metrics": metrics})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for i in range(0, len(losses), 10):
            run.log_metrics({"evaluator/loss": losses[i]}, step=i)
        run.log_metrics({f"heldout_{k}": v for k, v in quality.items()})
        run.log_metrics({f"train_{k}": v for k, v in train_quality.items()})
        run.log_artifact(out, "evaluator")
    log(
        f"imagen evaluator: held-out real pairs: AUC {quality['auc']:.3f} (chance .5), "
        f"top-1 {quality.get('top1', float('nan')):.3f} "
        f"(chance {quality.get('top1_chance', float('nan')):.3f}), "
        f"top-5 {quality.get('top5', float('nan')):.3f} "
        f"(chance {quality.get('top5_chance', float('nan')):.3f}); {out / MODEL_FILE} "
        f"in {metrics['seconds']:.0f} s"
    )
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run of the pipeline")
    parser.add_argument("--no-progress", action="store_true", help="(accepted; lines only)")


def main(args: argparse.Namespace, params: Params) -> int:
    try:
        train_evaluator(params, parent_run_id=args.parent_run_id)
    except FileNotFoundError as e:
        print(f"imagen evaluator: {e}", file=sys.stderr)
        return 2
    return 0
