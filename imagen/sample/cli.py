"""``imagen sample``: prompts -> PNGs per prompt and stage, and a grid of the stages side by side.

The cascade comes from a models folder (``models/<stage>/model.pt``) or a registered model URI
(``models:/imagen-cascade@champion``); per-stage sampling settings come from params.yaml unless
given here.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from imagen.config import STAGES, ConfigError, Params
from imagen.images import to_pil
from imagen.sample.cascade import cascade_grid, parse_stage_values


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"


def save_images(
    images: Mapping[str, torch.Tensor], prompts: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Write ``out_dir/<stage>/<index>_<slug>.png`` for every prompt and stage + ``grid.png``."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for stage, batch in images.items():
        folder = out_dir / stage
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(prompts):
            path = folder / f"{i:03d}_{slug(prompt)}.png"
            to_pil(batch[i]).save(path)
            written.append(path)
    grid = out_dir / "grid.png"
    cascade_grid(images, prompts, cell=256).save(grid)
    written.append(grid)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="text prompts (one image per prompt)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--out", default="samples", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--depth",
        default="sr1024",
        choices=list(STAGES),
        help="last stage to run: base64 (64 px), sr256 or sr1024 (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--steps", help="sampling steps: one number, or per stage e.g. base64=30,sr256=20"
    )
    parser.add_argument(
        "--guidance", help="classifier-free guidance scale, one or per stage (base64=7.5)"
    )
    parser.add_argument(
        "--sampler", help="heun | euler | ddpm | ddim | dpmpp_2m, one or per stage (base64=heun)"
    )
    parser.add_argument(
        "--noise-aug",
        help="noise augmentation level of the SR stages' low-res input: sigma_aug for NeMo's "
        "kind edm, the level in [0, 1] for cosine_vp (default: each stage's sampling level), "
        "one or per stage",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="folder with <stage>/model.pt (default: params models_dir), or a registered model "
        "URI such as models:/imagen-cascade@champion",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(args: argparse.Namespace, params: Params) -> int:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file: {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        print("imagen sample: give at least one prompt (or --prompts-file)", file=sys.stderr)
        return 2
    steps = parse_stage_values(args.steps, int, "--steps")
    guidance = parse_stage_values(args.guidance, float, "--guidance")
    sampler = parse_stage_values(args.sampler, str, "--sampler")
    noise_aug = parse_stage_values(args.noise_aug, float, "--noise-aug")
    source = args.models or params.models_dir
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.registry import load_cascade

    try:
        cascade = load_cascade(
            source,
            depth=args.depth,
            tracking_uri=tracking_uri(params),
            device=resolve_device(args.device),
        )
    except FileNotFoundError as e:
        print(f"imagen sample: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    images = cascade.generate(
        prompts,
        depth=args.depth,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        noise_aug=noise_aug,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    written = save_images(images, prompts, args.out)
    print(
        f"imagen sample: {len(prompts)} prompt(s) to {args.depth} in {elapsed:.1f} s; "
        f"{len(written)} files in {args.out}/ (grid: {written[-1]})"
    )
    return 0
