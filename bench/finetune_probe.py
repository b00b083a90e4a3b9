"""LoRA fine-tuning probe: does `imagen finetune` teach a new concept and keep the old ones?

A trained demo project's base stage (copied, never written to) is taught 8 pictures of a shape
the embedded data never draws (a five-pointed star, four colours on both backgrounds, captions
in the embedded grammar, e.g. "a large red star in the center, dark background"), once without
and once with prior preservation (``--prior`` samples from held-out captions). For each model:

- ``nn_taught``: for the 8 taught captions, the mean over generated images of the distance to
  the nearest taught picture (mean absolute pixel difference, 0..1); ``nn_new``: the same for
  8 star captions that were not taught (other colours, sizes or positions);
- ``agreement``: the embedded evaluator's caption agreement (imagen/evaluate/metrics.py) on
  ``--heldout`` held-out embedded captions (none of them used for the prior), and per attribute;
- ``loss``: the diffusion loss on the 8 pictures (seeded noise), as `imagen finetune` reports.

    python bench/finetune_probe.py --project /work/demo0            # the demo's trained model
    python bench/finetune_probe.py --project . --steps 300 --prior 16 --heldout 32

Prints a table; appends the rows to ``bench/results/finetune.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from imagen.checkpoint import load_stage, read_stage
from imagen.data.loader import to_tensor
from imagen.diffusion import build_denoiser
from imagen.embedded.dataset import ATTRIBUTES, BACKGROUND_RGB, COLOR_RGB, EmbeddedDataset
from imagen.evaluate.metrics import AGREEMENT, Alignment
from imagen.images import to_uint8
from imagen.lora.images import TeachImages
from imagen.lora.tune import TuneSettings, encode, finetune, fixed_loss, generate
from imagen.sample.cascade import load_encoder

TAUGHT = [
    ("red", "dark"),
    ("blue", "light"),
    ("yellow", "dark"),
    ("green", "light"),
    ("red", "light"),
    ("blue", "dark"),
    ("yellow", "light"),
    ("green", "dark"),
]
NEW = [
    "a large orange star in the center, dark background",
    "a large purple star in the center, light background",
    "a small red star in the center, light background",
    "a small blue star in the center, dark background",
    "a large green star on the left, dark background",
    "a large yellow star on the right, light background",
    "a large red star at the top, light background",
    "a large blue star at the bottom, dark background",
]


def star(colour: str, background: str, size: int, turn: float) -> Image.Image:
    """A large five-pointed star in the centre, in the embedded data's colours."""
    bg = tuple(round(255 * c) for c in BACKGROUND_RGB[background])
    img = Image.new("RGB", (size, size), bg)
    c, r = size / 2, 0.24 * size
    pts = [
        (
            c + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5 + turn),
            c - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5 + turn),
        )
        for k in range(10)
    ]
    ImageDraw.Draw(img).polygon(pts, fill=tuple(round(255 * v) for v in COLOR_RGB[colour]))
    return img


def star_pictures(folder: Path, size: int) -> TeachImages:
    """The 8 taught pictures, also written to ``folder`` with a captions.csv (what a user
    would give `imagen finetune --images`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, caps, images = ["file,caption"], [], []
    for i, (colour, bg) in enumerate(TAUGHT):
        img = star(colour, bg, size, turn=0.08 * (i % 3))
        img.save(folder / f"star{i}.png")
        cap = f"a large {colour} star in the center, {bg} background"
        rows.append(f"star{i}.png,{cap}")
        caps.append(cap)
        images.append(to_tensor(img))
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return TeachImages(caps, torch.stack(images), [f"star{i}.png" for i in range(len(caps))])


def nearest(generated: torch.Tensor, taught: torch.Tensor) -> float:
    """Mean over generated images of the mean absolute pixel distance (0..1) to the nearest
    taught picture."""
    g = (generated.float().clamp(-1, 1) + 1) / 2
    t = (taught.float() + 1) / 2
    d = (g[:, None] - t[None]).abs().flatten(2).mean(-1)  # (G, T)
    return float(d.min(1).values.mean())


def measure(name, net, stage, encoder, teach, heldout, alignment, seed) -> dict:
    den = build_denoiser(stage.model, net.eval())
    out = {"model": name}
    for key, caps in (("nn_taught", teach.captions), ("nn_new", NEW)):
        e, m = encode(encoder, caps)
        out[key] = nearest(generate(den, stage, e, m, seed=seed), teach.images)
    e, m = encode(encoder, heldout["captions"])
    imgs = to_uint8(generate(den, stage, e, m, seed=seed))
    scores = alignment.compute(imgs, heldout["captions"], heldout["attributes"])
    out["agreement"] = scores[AGREEMENT]
    out |= {a: scores.get(f"agreement_{a}", float("nan")) for a in ATTRIBUTES}
    e, m = encode(encoder, teach.captions)
    out["loss"] = fixed_loss(den, teach.images, e, m, draws=8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", default=".", help="a project whose base64 stage is trained")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prior", type=int, default=16)
    ap.add_argument("--skip-plain", action="store_true", help="only the run with --prior")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--sample-steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    project = Path(args.project).resolve()
    work = Path(tempfile.mkdtemp(prefix="finetune-probe-"))
    model = work / "base64" / "model.pt"  # a copy: the project is only read
    model.parent.mkdir(parents=True)
    shutil.copy2(project / "models" / "base64" / "model.pt", model)
    stage, _, meta = read_stage(model)
    update = {"sampler": args.sampler, "steps": args.sample_steps, "guidance_scale": args.guidance}
    stage = stage.model_copy(update={"sampling": stage.sampling.model_copy(update=update)})
    cond = stage.model.conditioning
    enc_dir = Path(cond.encoder_path)
    encoder = load_encoder(cond, enc_dir if enc_dir.is_absolute() else project / enc_dir)
    teach = star_pictures(work / "stars", stage.resolution)
    held = EmbeddedDataset(args.heldout + args.prior, seed=0, size=64, split="holdout")
    items = [held[i] for i in range(len(held))]
    heldout = {
        "captions": [it["caption"] for it in items[: args.heldout]],
        "attributes": [it["attributes"] for it in items[: args.heldout]],
    }
    prior_caps = [it["caption"] for it in items[args.heldout :]]
    alignment = Alignment(embedded=True)
    rows = []
    t0 = time.perf_counter()
    base, _ = load_stage(model)
    rows.append(measure("base", base, stage, encoder, teach, heldout, alignment, args.seed))
    for prior in (args.prior,) if args.skip_plain else (0, args.prior):
        net, _ = load_stage(model)
        s = TuneSettings(steps=args.steps, lr=args.lr, rank=args.rank, prior=prior, seed=args.seed)
        t1 = time.perf_counter()
        res = finetune(net, stage, teach, encoder, s, prior_caps, say=print)
        tuned, _ = load_stage(model)
        tuned.load_state_dict(res.merged)
        row = measure(
            f"lora prior={prior}", tuned, stage, encoder, teach, heldout, alignment, args.seed
        )
        row["train_s"] = time.perf_counter() - t1
        rows.append(row)
    cols = ["model", "nn_taught", "nn_new", "agreement", *ATTRIBUTES, "loss", "train_s"]
    print(
        f"\n{args.project} base64 step {meta['step']}; {len(teach)} star pictures, "
        f"{args.steps} steps rank {args.rank} lr {args.lr}; sampling {args.sampler} "
        f"{args.sample_steps} steps guidance {args.guidance}; {args.heldout} held-out "
        f"captions; {time.perf_counter() - t0:.0f} s in all"
    )
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print(
            "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |"
        )
    out = Path(__file__).parent / "results" / "finetune.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {
                        **r,
                        "project": str(project),
                        "steps": args.steps,
                        "prior_n": args.prior,
                        "heldout": args.heldout,
                    }
                )
                + "\n"
            )
    print(f"pictures and copy under {work}")


if __name__ == "__main__":
    main()
