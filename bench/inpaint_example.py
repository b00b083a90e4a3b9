"""The README's inpainting picture: a held-out image, a mask, and `imagen sample --image --mask`.

Reads one held-out image from a trained project's shards (read-only), writes a mask with a white
box (the region to regenerate), runs the real `imagen sample` command on the project's models and
puts input | mask | output side by side in a small JPEG:

    python bench/inpaint_example.py --project /work/demo0 --index 3 --box 0.22,0.03,0.76,0.56 \\
        --prompt "a huge yellow disk at the top, dark backdrop" --out docs/inpaint_example.jpg
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from imagen.images import side_by_side


def holdout_image(project: Path, index: int) -> Image.Image:
    """Held-out image ``index`` (its full-size PNG) from ``project``'s data/shards."""
    for tar in sorted((project / "data" / "shards").glob("holdout-*.tar")):
        with tarfile.open(tar) as t:
            name = f"holdout-{index:07d}.png"
            if name in t.getnames():
                return Image.open(io.BytesIO(t.extractfile(name).read())).convert("RGB")
    raise SystemExit(f"no held-out image {index} in {project}/data/shards")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, required=True, help="a trained project folder")
    p.add_argument("--index", type=int, default=3, help="held-out image number")
    p.add_argument("--box", default="0.22,0.03,0.76,0.56", help="mask box x0,y0,x1,y1 (0-1)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--resample", default="base64=3", help="--resample of imagen sample")
    p.add_argument("--depth", default="sr256", help="--depth of imagen sample")
    p.add_argument("--seed", default="0")
    p.add_argument("--height", type=int, default=200, help="height of each panel")
    p.add_argument("--out", type=Path, default=Path("docs/inpaint_example.jpg"))
    p.add_argument("--max-kb", type=int, default=60)
    args = p.parse_args()
    image = holdout_image(args.project, args.index)
    x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    w, h = image.size
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=255)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image.save(tmp / "image.png")
        mask.save(tmp / "mask.png")
        cmd = [
            sys.executable, "-P", "-m", "imagen.cli", "sample", args.prompt,
            "--models", str(args.project / "models"),
            "--image", str(tmp / "image.png"), "--mask", str(tmp / "mask.png"),
            "--resample", args.resample, "--depth", args.depth, "--seed", args.seed,
            "--out", str(tmp / "out"),
            "--no-progress",
        ]  # fmt: skip
        print(" ".join(cmd[2:]))
        # in the project folder, as its own commands run (its params' relative paths), with
        # this repository's code (-P: not the project's copy); it writes only its --out folder
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run(cmd, check=True, cwd=args.project, env=env)
        last = [d for d in ("sr1024", "sr256", "base64") if (tmp / "out" / d).is_dir()][0]
        (result,) = sorted((tmp / "out" / last).glob("*.png"))
        sheet = side_by_side([image, mask, Image.open(result)], args.height)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for quality in (85, 75, 65, 55, 45):
        sheet.save(args.out, quality=quality, optimize=True)
        if args.out.stat().st_size <= args.max_kb * 1024:
            break
    print(f"{args.out}: {sheet.width}x{sheet.height}, {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
