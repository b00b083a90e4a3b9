"""Autoguidance against classifier-free guidance on a trained demo, at equal network evaluations.

Reads a trained project (``make demo``; nothing in it is written): its params.yaml, held-out
captions and base stage. The main model is ``models/base64/model.pt`` (or ``--main``, e.g. a
training checkpoint); the guide is an earlier training checkpoint of the same stage
(``--guide``; ``imagen train`` keeps them under models/base64/checkpoints/, copy one away
before it is rotated out). Both sweeps sample the same ``--n`` held-out captions with the same
seed and steps, so every scale but 1 costs the same two network evaluations a step (CFG: the
conditional and unconditional halves of one batch; autoguidance: the main model and the guide).
Steps and sampler default to the project's ``evaluate`` block. The stage's guidance interval
applies to both kinds alike. Each scale is scored as ``imagen evaluate`` scores it
(imagen.evaluate.sweep): the embedded evaluator's Frechet distance to the held-out images,
caption agreement, and sharpness (mean absolute Laplacian over the real images'; 1 = as sharp
as the real ones). Prints both tables; appends them to bench/results/autoguidance.jsonl.

    python bench/autoguidance.py --project /path/to/demo --guide step=0002100-...ckpt
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
from imagen.diffusion.samplers import evaluations
from imagen.evaluate.metrics import AGREEMENT, Alignment, Fidelity
from imagen.evaluate.sweep import sweep
from imagen.sample.cascade import Cascade

RESULTS = Path(__file__).resolve().parent / "results" / "autoguidance.jsonl"


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".", help="a trained project folder (read only)")
    ap.add_argument("--main", default=None, help="main model (default: models/base64/model.pt)")
    ap.add_argument("--guide", required=True, help="the guide: an earlier checkpoint or model")
    ap.add_argument("--n", type=int, default=32, help="held-out captions")
    ap.add_argument("--cfg-scales", type=_floats, default=[1.0, 2.0, 4.0])
    ap.add_argument("--auto-scales", type=_floats, default=[1.5, 2.0, 3.0])
    ap.add_argument("--steps", type=int, default=None, help="steps (default: evaluate.steps)")
    ap.add_argument("--sampler", default=None, help="sampler (default: evaluate.sampler)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    project = Path(args.project).resolve()
    main_file = Path(args.main).resolve() if args.main else None
    guide = str(Path(args.guide).resolve())
    os.chdir(project)  # the project's relative paths (encoder, shards); nothing is written
    params = load_params(project / "params.yaml")
    if main_file is not None and main_file.suffix == ".ckpt":  # a checkpoint as the main model
        from imagen.sample.guide import read_guide

        net, config = read_guide(main_file, key="--main")
        encoder = Cascade.from_models_dir(params.models_dir, depth="base64").encoder
        cascade = Cascade({"base64": (net, config)}, encoder)
    elif main_file is not None:
        cascade = Cascade.from_files({"base64": main_file})
    else:
        cascade = Cascade.from_models_dir(params.models_dir, depth="base64")
    cascade.set_guide(guide, stage="base64", key="--guide")
    sampling = cascade.stages["base64"].config.sampling
    steps = args.steps or params.evaluate.steps or sampling.steps
    sampler = args.sampler or params.evaluate.sampler or sampling.sampler
    sampler = "heun" if sampler == "auto" else sampler
    held = load_holdout(params, args.n, 64)
    fidelity, alignment = Fidelity(), Alignment(None, embedded=True)
    print(f"{len(held)} held-out captions, {sampler} {steps} steps; guide {guide}")
    print(f"{'guidance':>9} {'w':>5} {'NFE/img':>8} {fidelity.name:>12} {AGREEMENT:>27} "
          f"{'sharpness':>9} {'s':>6}")  # fmt: skip
    record = {"time": time.strftime("%Y-%m-%d %H:%M"), "project": str(project), "guide": guide,
              "n": len(held), "steps": steps, "sampler": sampler}  # fmt: skip
    for kind, scales in (("cfg", args.cfg_scales), ("auto", args.auto_scales)):
        result = sweep(
            cascade, held, scales, depth="base64", fidelity=fidelity, alignment=alignment,
            steps=steps, sampler=sampler, seed=params.evaluate.seed, batch_size=args.batch_size,
            keep=0, kind=kind,
        )  # fmt: skip
        for r in result.rows:
            w = r["guidance_scale"]
            r["nfe"] = evaluations(sampler, steps) * (1 if w == 1 else 2)
            print(
                f"{kind:>9} {w:>5g} {r['nfe']:>8d} {r[fidelity.name]:>12.2f} "
                f"{r[AGREEMENT]:>27.3f} {r['sharpness']:>9.2f} {r['seconds']:>6.0f}"
            )
        record[kind] = result.rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
