"""Negative prompts on a trained demo: does naming the caption's colour as the negative prompt
lower the colour agreement of the base stage's images, against the same seeds without it?

Reads a trained project (``make demo``; nothing in it is written): its params.yaml, held-out
captions and ``models/base64/model.pt``. For each of ``--n`` held-out captions it samples the
base stage twice with the same seed, once with plain classifier-free guidance (the null text in
the unconditional branch) and once with the caption's colour word as the negative prompt, and
scores both with the embedded evaluator (imagen.embedded: per-attribute agreement with the
caption). Prints a table per guidance scale; appends it to bench/results/negative_prompts.jsonl.

    python bench/negative_prompts.py --project /path/to/demo --n 32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from imagen.config import load_params
from imagen.data.holdout import load_holdout
from imagen.evaluate.metrics import AGREEMENT, Alignment
from imagen.images import to_uint8
from imagen.sample.cascade import Cascade

RESULTS = Path(__file__).resolve().parent / "results" / "negative_prompts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".", help="a trained project folder (read only)")
    ap.add_argument("--models", default=None, help="models folder (default: the project's)")
    ap.add_argument("--n", type=int, default=32, help="held-out captions")
    ap.add_argument("--scales", default=None, help="guidance scales, e.g. 3,5 (default: stage's)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: stage's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    project = Path(args.project).resolve()
    models = Path(args.models).resolve() if args.models else None
    os.chdir(project)  # the project's relative paths (encoder, shards); nothing is written
    params = load_params(project / "params.yaml")
    cascade = Cascade.from_models_dir(models or params.models_dir, depth="base64")
    stage = cascade.stages["base64"].config.sampling
    scales = [float(s) for s in args.scales.split(",")] if args.scales else [stage.guidance_scale]
    held = load_holdout(params, args.n, 64)
    keep = [i for i, a in enumerate(held.attributes) if "color" in a]
    captions = [held.captions[i] for i in keep]
    attributes = [held.attributes[i] for i in keep]
    negatives = [a["color"] for a in attributes]
    seeds = list(range(len(captions)))
    alignment = Alignment(None, embedded=True)
    print(f"{len(captions)} held-out captions naming a colour; steps {args.steps or stage.steps}")
    head = ("w", "colour agr.", "+negative", "all agr.", "+negative", "s")
    print(" ".join(f"{h:>{n}}" for h, n in zip(head, (5, 12, 10, 9, 10, 6), strict=True)))
    rows = []
    for w in scales:
        t0 = time.perf_counter()
        found = {}
        for name, neg in (("plain", None), ("negative", negatives)):
            images = cascade.generate(
                captions, depth="base64", seeds=seeds, guidance=w, steps=args.steps,
                batch_size=args.batch_size, negative=neg,
            )["base64"]  # fmt: skip
            found[name] = alignment.compute(to_uint8(images), captions, attributes)
        row = {
            "guidance_scale": w,
            "colour_agreement": found["plain"]["agreement_color"],
            "colour_agreement_negative": found["negative"]["agreement_color"],
            "agreement": found["plain"][AGREEMENT],
            "agreement_negative": found["negative"][AGREEMENT],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(
            f"{w:>5g} {row['colour_agreement']:>12.3f} {row['colour_agreement_negative']:>10.3f} "
            f"{row['agreement']:>9.3f} {row['agreement_negative']:>10.3f} {row['seconds']:>6.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        record = {"time": time.strftime("%Y-%m-%d %H:%M"), "project": str(project),
                  "n": len(captions), "steps": args.steps or stage.steps, "rows": rows}  # fmt: skip
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
