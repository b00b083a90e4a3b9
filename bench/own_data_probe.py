"""Own-data probe: did the base stage learn a user's images, and does it follow their captions?

Measured without any trained evaluator, on plain pixels, so it can check the evaluator too:

- ``fd_pix16``: the Frechet distance of 16x16 pixel vectors (768 numbers an image) between the
  base stage's samples for ``--n`` training captions and all the real training images, beside
  the same distance for ``--n`` real images (the real-vs-real floor) and for uniform noise;
- ``rank``: for each caption, the rank of its own real image among all training images by the
  16x16 pixel distance to what was generated from it (1 = nearest; chance ~ half the images);
  the median, and the share of captions whose own image is in the nearest 10%;
- the trained dual evaluator's alignment scores on the same samples, when it exists.

    python bench/own_data_probe.py                       # in a project that ran `dvc repro`
    python bench/own_data_probe.py --guidance 1 2 3 --n 64 --params params.yaml
    python bench/own_data_probe.py --guidance 2 --grid own.png   # generated | real, 16 captions

Prints one table row per guidance scale; appends them to ``bench/results/own_data.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imagen.config import load_params
from imagen.data.holdout import read_split
from imagen.images import to_uint8


def pix16(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, 768) float64 in [0, 1]."""
    x = F.interpolate(images.float() / 255.0, size=(16, 16), mode="area")
    return x.flatten(1).double()


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance of two (N, D) samples' Gaussians (the FID formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) = sum of the square roots of the eigenvalues of ca cb (real, >= 0)
    eig = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * eig)


def own_image_ranks(fake: torch.Tensor, real: torch.Tensor, own: list[int]) -> torch.Tensor:
    """Rank (1 = nearest) of each fake's own real image among all real images."""
    d = torch.cdist(fake, real)  # (n, N)
    mine = d[torch.arange(len(own)), torch.tensor(own)]
    return (d < mine[:, None]).sum(1) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default=None, help="models folder (default: models_dir)")
    ap.add_argument("--n", type=int, default=64, help="training captions to generate")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", "-S", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--grid",
        default=None,
        help="write a picture of the first 16 captions: generated (at the first --guidance) "
        "beside the caption's real image",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from imagen.evaluate.dual import alignment_scores, load_dual, similarities
    from imagen.sample.cascade import Cascade

    params = load_params(args.params, args.overrides)
    captions, _, images, source = read_split(params, "train", None, 64)
    real = torch.stack(images)  # (N, 3, 64, 64) uint8
    pick = random.Random(args.seed).sample(range(len(captions)), min(args.n, len(captions)))
    prompts = [captions[i] for i in pick]
    real16 = pix16(real)
    floor = frechet(pix16(real[pick]), real16)
    noise = frechet(pix16(torch.randint(0, 256, (len(pick), 3, 64, 64))), real16)
    print(f"{len(captions)} training images from {source}; {len(pick)} captions")
    print(f"fd_pix16 floor (real {len(pick)} vs all real) {floor:.2f}, uniform noise {noise:.1f}")
    dual_path = Path(params.evaluator_dir) / "evaluator.pt"
    dual = load_dual(dual_path) if dual_path.exists() else None
    cascade = Cascade.from_models_dir(args.models or params.models_dir, depth="base64")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    print("| guidance | fd_pix16 | / floor | median rank | nearest 10% | caption AUC (dual) |")
    print("|---|---|---|---|---|---|")
    for w in args.guidance:
        t0 = time.perf_counter()
        gen = cascade.generate(
            prompts,
            depth="base64",
            steps=args.steps,
            sampler=args.sampler,
            guidance={"base64": w},
            seed=args.seed,
            batch_size=32,
        )["base64"]
        fake = to_uint8(gen)
        if args.grid and w == args.guidance[0]:
            from imagen.train.grids import grid_image

            k = min(16, len(pick))
            reals = real[pick[:k]].float() / 127.5 - 1  # uint8 -> [-1, 1]
            grid_image([gen[:k].float(), reals], prompts[:k], cols=4).save(args.grid)
        f16 = pix16(fake)
        ranks = own_image_ranks(f16, real16, pick)
        row = {
            "guidance": w,
            "fd_pix16": frechet(f16, real16),
            "floor": floor,
            "noise": noise,
            "median_rank": float(ranks.float().median()),
            "images": len(captions),
            "nearest_10pct": float((ranks <= 0.1 * len(captions)).float().mean()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if dual is not None:
            row["dual"] = alignment_scores(similarities(dual, fake, prompts), prompts)
        auc = f"{row['dual']['auc']:.3f}" if dual is not None else "-"
        print(
            f"| {w:g} | {row['fd_pix16']:.2f} | {row['fd_pix16'] / floor:.1f}x | "
            f"{row['median_rank']:.0f} of {len(captions)} | {row['nearest_10pct']:.2f} | {auc} |"
        )
        with (out / "own_data.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
