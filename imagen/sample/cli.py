"""``imagen sample``: prompts -> PNGs per prompt and stage, and a grid of the stages side by side.

The cascade comes from a models folder (``models/<stage>/model.pt``) or a registered model URI
(``models:/imagen-cascade@champion``); per-stage sampling settings come from params.yaml unless
given here, and the ``sample`` block of params.yaml (what ``imagen import-nemo --config
inference_pipeline.yaml`` writes) gives the prompts, images per prompt, output resolution and
folder unless given here. As in NeMo's inference pipeline:

- ``--num-images N`` makes N images of every prompt, image k with seed ``--seed + k``, its own
  noise (``images.json`` lists each file with its prompt and seed);
- ``--lowres IMAGE`` (NeMo's low_res_input) starts at sr256 from the user's picture, resized
  (bicubic, centre square) to that stage's low-res size, and super-resolves it;
- ``--output-res R`` stops the cascade at the stage that makes R px images.

Beyond NeMo (named options, off by default):

- ``--negative TEXT`` (one for all prompts, or repeated once per prompt) conditions classifier-
  free guidance's unconditional branch on the negative prompt instead of the null text;
- ``--guide PATH`` samples the guide's stage with autoguidance (Karras et al. 2024) at
  ``--guide-scale`` (default 2): the guide is a weaker version of that stage, e.g. an earlier
  checkpoint ``models/base64/checkpoints/step=...ckpt``, a model.pt, or a models:/ URI.

Inpainting (beyond NeMo): ``--image PICTURE --mask MASK`` regenerates the mask's white region
of the picture (centre square) at every stage and keeps the rest, exactly: each stage's output
is the picture resized to its resolution outside the mask. The mask is a picture of the same
size (grey levels >= 128 are white); ``--resample R`` takes every step R times (RePaint).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from imagen.config import STAGE_RESOLUTIONS, STAGES, ConfigError, Params
from imagen.images import to_pil
from imagen.sample.cascade import Cascade, cascade_grid, parse_stage_values


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"


def save_images(
    images: Mapping[str, torch.Tensor],
    prompts: Sequence[str],
    out_dir: str | Path,
    seeds: Sequence[int] | None = None,
    negative: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/<stage>/<index>_<slug>.png`` for every image and stage, ``grid.png`` and
    (with ``seeds``) ``images.json``: each image's prompt, negative prompt (or null), seed and
    files. ``negative``: one for all images, or one per image."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    negatives = list(negative or [])
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    records: list[dict[str, Any]] = [
        {
            "index": i,
            "prompt": p,
            "negative": negatives[i] if negatives and negatives[i] else None,
            "seed": None if seeds is None else int(seeds[i]),
            "files": {},
        }
        for i, p in enumerate(prompts)
    ]
    for stage, batch in images.items():
        folder = out_dir / stage
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(prompts):
            path = folder / f"{i:03d}_{slug(prompt)}.png"
            to_pil(batch[i]).save(path)
            records[i]["files"][stage] = str(path)
            written.append(path)
    if seeds is not None:
        (out_dir / "images.json").write_text(json.dumps(records, indent=2) + "\n")
    grid = out_dir / "grid.png"
    cascade_grid(images, prompts, cell=256).save(grid)
    written.append(grid)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="text prompts (default: params sample.prompts)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--out", default=None, help="output folder (default: sample.out_dir)")
    parser.add_argument(
        "--depth",
        default="sr1024",
        choices=list(STAGES),
        help="last stage to run: base64 (64 px), sr256 or sr1024 (default: %(default)s)",
    )
    parser.add_argument(
        "--output-res",
        type=int,
        default=None,
        help="stop at the stage making images of this size (NeMo's target_resolution; "
        "default: sample.output_res, else --depth)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="images per prompt, image k seeded --seed + k (default: sample.num_images)",
    )
    parser.add_argument(
        "--lowres",
        action="append",
        default=[],
        metavar="IMAGE",
        help="super-resolve this picture through sr256 (and sr1024) instead of generating "
        "from text (NeMo's low_res_input); repeat for several, paired with the prompts",
    )
    parser.add_argument(
        "--image",
        metavar="PICTURE",
        help="inpaint this picture (its centre square): regenerate the --mask's white region "
        "at every stage, keep the rest exactly",
    )
    parser.add_argument(
        "--mask",
        metavar="MASK",
        help="with --image: a picture of the same size, white = regenerate, black = keep",
    )
    parser.add_argument(
        "--resample",
        default=None,
        metavar="R",
        help="with --image: take every sampling step R times, jumping back between takes "
        "(RePaint; R times the network evaluations; not with dpmpp_2m); one number or per "
        "stage, e.g. base64=3. Default: 1 (off)",
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
        "--negative",
        action="append",
        default=[],
        metavar="TEXT",
        help="negative prompt: the unconditional branch of classifier-free guidance is "
        "conditioned on it instead of the null text; one for all prompts, or repeat it once "
        'per prompt ("" keeps the null text for that prompt)',
    )
    parser.add_argument(
        "--guide",
        action="append",
        default=[],
        metavar="PATH",
        help="autoguidance: a weaker version of a stage (an earlier checkpoint .ckpt, a "
        "model.pt, or a models:/ URI) that guides that stage instead of classifier-free "
        "guidance; repeat for several stages",
    )
    parser.add_argument(
        "--guide-scale",
        default=None,
        help="autoguidance scale w, D_guide + w (D - D_guide): one or per stage "
        "(base64=2.5; default 2)",
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


def read_prompts(args: argparse.Namespace, params: Params) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file: {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts and not args.lowres:
        prompts = list(params.sample.prompts)
    return prompts or ([""] if args.lowres else [])


def read_lowres(paths: Sequence[str], size: int) -> torch.Tensor:
    """Pictures -> (N, 3, size, size) in [-1, 1]: centre square, bicubic to ``size``."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"--lowres {p}: not a readable image ({e})") from None
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        out.append(arr.float().div(127.5).sub(1.0))
    return torch.stack(out)


def _open_rgb(path: str, option: str, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ConfigError(f"{option} {path}: no such file")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"{option} {path}: not a readable image ({e})") from None


def read_inpaint(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``--image`` / ``--mask`` -> the picture's centre square (1, 3, S, S) in [-1, 1] and the
    mask's (1, 1, S, S) bool (True = regenerate), checked before any model is loaded."""
    import numpy as np

    if args.image is None and args.mask is None:
        if args.resample is not None:
            raise ConfigError("--resample: only with --image and --mask (inpainting)")
        return None
    if args.image is None or args.mask is None:
        given, missing = ("--image", "--mask") if args.mask is None else ("--mask", "--image")
        raise ConfigError(f"{given} needs {missing} (white = regenerate, black = keep)")
    if args.lowres:
        raise ConfigError("--image (inpainting) and --lowres (super-resolution) exclude each other")
    resample = parse_stage_values(args.resample, int, "--resample")
    values = resample.values() if isinstance(resample, dict) else [resample]
    if any(v is not None and v < 1 for v in values):
        raise ConfigError(f"--resample: got {args.resample}; it must be >= 1 (1 = off)")
    img = _open_rgb(args.image, "--image", "RGB")
    mask = _open_rgb(args.mask, "--mask", "L")
    if mask.size != img.size:
        raise ConfigError(
            f"--mask {args.mask}: {mask.width}x{mask.height} px, but --image {args.image} is "
            f"{img.width}x{img.height} px: the mask must be the picture's size"
        )
    s = min(img.size)
    box = ((img.width - s) // 2, (img.height - s) // 2)
    box = (*box, box[0] + s, box[1] + s)
    pixels = torch.from_numpy(np.asarray(img.crop(box), dtype=np.uint8).copy())
    regenerate = torch.from_numpy(np.asarray(mask.crop(box), dtype=np.uint8) >= 128)
    if not regenerate.any():
        raise ConfigError(
            f"--mask {args.mask}: all black (in the centre square): nothing to regenerate; "
            "white marks the region to regenerate"
        )
    image = pixels.permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    return image, regenerate[None, None]


def pair_up(prompts: list[str], images: list[str]) -> tuple[list[str], list[str]]:
    """One image for every prompt, one prompt for every image, or as many of each."""
    if not images or len(images) == len(prompts):
        return prompts, images
    if len(images) == 1:
        return prompts, images * len(prompts)
    if len(prompts) == 1:
        return prompts * len(images), images
    raise ConfigError(
        f"{len(images)} --lowres images for {len(prompts)} prompts: give one or as many"
    )


def load(args: argparse.Namespace, params: Params, depth: str) -> Cascade:
    """The cascade up to ``depth`` (from sr256 with --lowres, when a models folder)."""
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.registry import load_cascade

    source = args.models or params.models_dir
    device = resolve_device(args.device)
    if args.lowres and not str(source).startswith(("models:/", "runs:/")):
        cascade = Cascade.from_models_dir(source, depth=depth, start="sr256", device=device)
    else:
        cascade = load_cascade(
            source, depth=depth, tracking_uri=tracking_uri(params), device=device
        )
    cascade.set_precision(params.sample.precision)
    return cascade


def stage_for_resolution(cascade: Cascade, res: int) -> str:
    """The loaded stage whose images are ``res`` px (``--output-res``)."""
    found = [n for n, st in cascade.stages.items() if st.resolution == res]
    if not found:
        sizes = {n: st.resolution for n, st in cascade.stages.items()}
        raise ConfigError(f"--output-res {res}: no loaded stage makes {res} px images: {sizes}")
    return found[0]


def set_guides(
    cascade: Cascade, args: argparse.Namespace, params: Params, per_stage: dict[str, Any]
) -> list[str]:
    """Load every ``--guide`` into the cascade; their stages sample with autoguidance at
    ``--guide-scale`` (2 unless given). Returns the guided stages."""
    from imagen.mlops.client import tracking_uri

    scales = parse_stage_values(args.guide_scale, float, "--guide-scale")
    if scales is not None and not args.guide:
        raise ConfigError("--guide-scale: give the guide model with --guide PATH")
    guided = []
    for source in args.guide:
        guided.append(cascade.set_guide(source, key="--guide", tracking_uri=tracking_uri(params)))
    given = per_stage["guidance"]
    guidance = dict(given) if isinstance(given, Mapping) else dict.fromkeys(STAGES, given)
    for stage in guided:
        scale = scales.get(stage) if isinstance(scales, Mapping) else scales
        guidance[stage] = 2.0 if scale is None else scale
    if guided:
        per_stage["guidance"] = {k: v for k, v in guidance.items() if v is not None}
    return guided


def main(args: argparse.Namespace, params: Params) -> int:
    prompts = read_prompts(args, params)
    if not prompts:
        print("imagen sample: give at least one prompt (or --prompts-file)", file=sys.stderr)
        return 2
    prompts, pictures = pair_up(prompts, args.lowres)
    if len(args.negative) not in (0, 1, len(prompts)):
        raise ConfigError(
            f"--negative: {len(args.negative)} negative prompts for {len(prompts)} prompts; "
            "give one for all, or one per prompt"
        )
    inpaint = read_inpaint(args)
    per_stage = {
        "steps": parse_stage_values(args.steps, int, "--steps"),
        "guidance": parse_stage_values(args.guidance, float, "--guidance"),
        "sampler": parse_stage_values(args.sampler, str, "--sampler"),
        "noise_aug": parse_stage_values(args.noise_aug, float, "--noise-aug"),
    }
    res = args.output_res or params.sample.output_res
    nemo_stage = {r: n for n, (r, _) in STAGE_RESOLUTIONS.items()}
    depth = nemo_stage.get(res, args.depth) if res else args.depth
    try:
        cascade = load(args, params, depth)
    except FileNotFoundError as e:
        print(f"imagen sample: {e}", file=sys.stderr)
        return 2
    depth = stage_for_resolution(cascade, res) if res else depth
    guided = set_guides(cascade, args, params, per_stage)
    n = args.num_images or params.sample.num_images
    negative = [t for t in args.negative for _ in range(n)] if len(args.negative) > 1 else None
    negative = negative or (args.negative or None)
    prompts = [p for p in prompts for _ in range(n)]
    seeds = [args.seed + k for k in range(len(prompts))]
    images: dict[str, torch.Tensor] = {}
    lowres = None
    if pictures:
        first = next(st for st in cascade.stages.values() if st.net.is_sr)
        lowres = read_lowres([p for p in pictures for _ in range(n)], first.config.lowres or 64)
        images["input"] = lowres
    extra: dict[str, Any] = {}
    if inpaint is not None:
        from imagen.diffusion import fit_image, fit_mask

        image, mask = (t.expand(len(prompts), *t.shape[1:]) for t in inpaint)
        resample = parse_stage_values(args.resample, int, "--resample")
        extra = dict(inpaint_image=image, inpaint_mask=mask, resample=resample or 1)
        res0 = next(iter(cascade.stages.values())).resolution  # the input, masked region grey
        images["input"] = fit_image(image, res0).masked_fill(fit_mask(mask, res0), 0.0)
    start = time.perf_counter()
    images |= cascade.generate(
        prompts,
        depth=depth,
        seeds=seeds,
        lowres=lowres,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        guidance_kind=dict.fromkeys(guided, "auto") or None,
        negative=negative,
        **per_stage,
        **extra,
    )
    elapsed = time.perf_counter() - start
    out = args.out or params.sample.out_dir
    written = save_images(images, prompts, out, seeds, negative)
    print(
        f"imagen sample: {len(prompts)} image(s) ({len(prompts) // n} prompt(s) x {n}, seeds "
        f"{seeds[0]}..{seeds[-1]}) to {depth} in {elapsed:.1f} s; {len(written)} files in "
        f"{out}/ (grid: {written[-1]})"
    )
    return 0
