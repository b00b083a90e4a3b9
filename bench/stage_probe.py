"""Stage probe: how well a small stage learns in a fixed number of steps, and why.

Trains one stage's UNet (imagen.nn) inside its preconditioning (imagen.diffusion) in a plain
PyTorch loop on embedded images rendered in memory (captions encoded once by the demo's word
T5, bench/recipe_search.py), then measures what the demo's reports measure and one thing they
do not:

- ``ratio``: mse(D(x0 + sigma eps; sigma), x0) / sigma^2 on held-out images at fixed noise
  levels: 1 means the denoiser removes none of the noise, 0.1 that it removes 90%. A net whose
  ratio stays near 1 at sigma 0.01-0.1 leaves visible noise in every sample, whatever sampler;
- base: samples of held-out captions at each guidance scale, scored by the embedded
  evaluator (per attribute), the Frechet distance of its features, and sharpness (mean
  absolute Laplacian over the real images');
- sr: held-out images downsampled as training does, super-resolved, against the bicubic
  upsampling of the same inputs: PSNR, the evaluator's Frechet distance over 64 px tiles,
  sharpness.

    python bench/stage_probe.py base --name e16 --unet '{"embed_dim": 16}' --steps 2000
    python bench/stage_probe.py base --name prog --low-steps 2000 --steps 700 --held-out 64
    python bench/stage_probe.py sr --name xres --precond DDPM --residual --steps 400

Results are appended to ``bench/results/stage_probe.jsonl`` (docs/recipe.md quotes them).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import recipe_search as rs
import torch

from imagen.config import ModelConfig, SamplingConfig
from imagen.diffusion import build_denoiser, drop_mask, sample, sr_condition
from imagen.embedded.dataset import EmbeddedDataset, attributes
from imagen.embedded.evaluator import EmbeddedEvaluator
from imagen.evaluate.metrics import mean_abs_laplacian
from imagen.evaluate.sr import bicubic_up, downsample, psnr, tiles
from imagen.nn import build_unet, count_parameters
from imagen.presets import PRESETS

RESULTS = Path(__file__).resolve().parent / "results" / "stage_probe.jsonl"
# the demo's departures from NeMo in the shared model.unet block (params.yaml)
DEMO_UNET = {"noise_cond_scale": 1000.0, "masked_pooling": True, "context_norm": "layer"}
DDPM_X0 = {"loss_type": "l2", "pred_objective": "x_start", "noise_schedule": "cosine"}


def model_config(args: argparse.Namespace, text: Any) -> ModelConfig:
    """The stage's ModelConfig: a preset's UNet block with --unet on top."""
    preset = "small_res_64" if args.kind == "base" else "small_res_256"
    unet = {**PRESETS[preset]["unet"], **DEMO_UNET, **json.loads(args.unet)}
    if args.kind == "sr":
        unet["image_size"] = args.crop
    cfg: dict[str, Any] = {
        "unet_type": PRESETS[preset]["unet_type"],
        "unet": unet,
        "conditioning": text.model_dump(),
        "preconditioning_type": args.precond,
    }
    if args.precond == "EDM":
        cfg["preconditioning"] = {"p_mean": args.p_mean, "p_std": args.p_std}
    else:
        cfg["preconditioning"] = DDPM_X0
    if args.kind == "sr":
        cfg["lowres_residual"] = args.residual
    return ModelConfig.model_validate(cfg)


def train(args: argparse.Namespace, mc: ModelConfig, data: dict[str, torch.Tensor]):
    """Plain AdamW + warm-up + clipping + warmed-up EMA, as the Lightning stage trains."""
    net = build_unet(mc)
    den = build_denoiser(mc, net)
    ema_net = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(args.seed)
    params, losses, t0 = list(net.parameters()), [], time.perf_counter()
    images, n = data["images"], len(data["images"])
    for step in range(args.low_steps + args.steps):
        low = step < args.low_steps  # trainer.progressive: downsampled images first
        batch = args.low_batch if low else args.batch
        idx = torch.randint(0, n, (batch,), generator=gen)
        cond = {
            "text_embed": data["embeds"][idx],
            "text_mask": data["mask"][idx],
            "drop_text": drop_mask(batch, 0.1, gen),
        }
        x0 = images[idx]
        if low:
            x0 = torch.nn.functional.interpolate(x0, size=args.low_res, mode="area")
        if args.kind == "sr":  # aligned crops of the image and of its low-res version
            f, c = args.res // args.low, args.crop
            i, j = torch.randint(0, args.low - c // f + 1, (2,), generator=gen).tolist()
            x0 = x0[:, :, i * f : i * f + c, j * f : j * f + c]
            low = data["lowres"][idx][:, :, i : i + c // f, j : j + c // f]
            cond.update(sr_condition(low, mc, training=True, generator=gen))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = den.loss(x0, cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema_net.parameters()), params, 1 - d)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    return build_denoiser(mc, ema_net).eval(), seconds, float(np.mean(losses[-50:]))


@torch.no_grad()
def ratios(den: torch.nn.Module, x0: torch.Tensor, cond: dict[str, Any]) -> dict[str, float]:
    """mse(D, x0) / sigma^2 at fixed levels (1: no noise removed)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for s in (0.01, 0.03, 0.1, 0.3, 1.0):
        noisy = x0 + s * torch.randn(x0.shape, generator=g)
        err = float(((den(noisy, torch.tensor(s), **cond) - x0) ** 2).mean())
        out[str(s)] = round(err / s**2, 3)
    return out


def probe_base(args: argparse.Namespace, den, held: dict[str, Any]) -> dict[str, Any]:
    ev = EmbeddedEvaluator()
    real, real_f = held["images"], ev.features(held["images"])
    cond = {"text_embed": held["embeds"], "text_mask": held["mask"]}
    out: dict[str, Any] = {"ratio": ratios(den, real, cond)}
    for w in (float(v) for v in args.guidance.split(",")):
        sc = SamplingConfig(sampler="dpmpp_2m", steps=12, guidance_scale=w)
        x = sample(den, tuple(real.shape), cond, sc, seed=1234).clamp(-1, 1)
        row = {k: round(float(v.nanmean()), 3) for k, v in ev.score(x, held["attrs"]).items()}
        row["fd"] = round(rs.frechet(ev.features(x), real_f), 1)
        row["sharpness"] = round(mean_abs_laplacian(x) / mean_abs_laplacian(real), 2)
        out[f"guidance {w:g}"] = row
    return out


def probe_sr(args: argparse.Namespace, den, mc: ModelConfig, held: dict[str, Any]) -> dict:
    ev = EmbeddedEvaluator()
    real, low = held["images"], held["lowres"]
    real_t = ev.features(tiles(real))
    cond = {"text_embed": held["embeds"], "text_mask": held["mask"]}
    cond.update(sr_condition(low, mc, training=False, generator=torch.Generator().manual_seed(5)))
    out: dict[str, Any] = {"ratio": ratios(den, real, cond)}
    steps = SamplingConfig(sampler="euler", steps=args.sr_steps, guidance_scale=1.0)
    sr = sample(den, tuple(real.shape), cond, steps, seed=1234).clamp(-1, 1)
    for name, y in (("sr", sr), ("bicubic", bicubic_up(low, args.res))):
        out[name] = {
            "psnr": round(psnr(y, real), 2),
            "tile_fd": round(rs.frechet(ev.features(tiles(y)), real_t), 1),
            "sharpness": round(mean_abs_laplacian(y) / mean_abs_laplacian(real), 3),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", choices=["base", "sr"])
    p.add_argument("--name", required=True)
    p.add_argument("--unet", default="{}", help="JSON keys over the demo preset's unet block")
    p.add_argument("--precond", choices=["EDM", "DDPM"], default="EDM", help="DDPM: x_start")
    p.add_argument("--residual", action="store_true", help="sr: model.lowres_residual")
    p.add_argument("--p-mean", type=float, default=-0.4)
    p.add_argument("--p-std", type=float, default=1.8)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--low-res", type=int, default=32, help="base: trainer.progressive size")
    p.add_argument("--low-steps", type=int, default=0, help="base: steps at --low-res first")
    p.add_argument("--low-batch", type=int, default=16, help="base: batch of those steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--train-images", type=int, default=768)
    p.add_argument("--held-out", type=int, default=32)
    p.add_argument("--guidance", default="1,2,3", help="base: guidance scales to sample")
    p.add_argument("--crop", type=int, default=64, help="sr: training crop")
    p.add_argument("--sr-steps", type=int, default=3, help="sr: Euler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.res, args.low = (64, 64) if args.kind == "base" else (256, 64)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    r = rs.Recipe(resolution=args.res, tokenizer="word", token_length=24, text_dim=256)
    mc = model_config(args, rs.conditioning(r, "unused"))
    data, held = {}, {}
    for split, n, box in (("train", args.train_images, data), ("holdout", args.held_out, held)):
        ds = EmbeddedDataset(n, seed=0, size=args.res, split=split)
        box["images"] = rs.render(ds)
        box["embeds"], box["mask"] = rs.encode_captions(r, [ds.caption(i) for i in range(n)])
        box["attrs"] = [attributes(ds.scene(i)) for i in range(n)]
        if args.kind == "sr":
            box["lowres"] = downsample(box["images"], args.low)
    den, seconds, loss = train(args, mc, data)
    result = {"name": args.name, "kind": args.kind, "args": vars(args), "train_s": round(seconds)}
    result |= {"loss": round(loss, 4), "params": count_parameters(den.net)}
    result |= probe_base(args, den, held) if args.kind == "base" else probe_sr(args, den, mc, held)
    print(json.dumps(result), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
