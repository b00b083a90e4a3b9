"""Super-resolution stages measured alone: given the real low-res image, how close is the output?

For each trained SR stage, held-out images are downsampled to the stage's input size, the stage
super-resolves them (text-conditioned, its own sampling settings), and the output is compared
with the real high-res image beside the bicubic upsampling of the same input:

- PSNR against the real image (torchmetrics, on [0, 1]; higher is better);
- the Frechet distance of the fidelity features (:class:`~imagen.evaluate.metrics.Fidelity`;
  lower is better) over native-resolution tiles of :data:`TILE` px: every image is cut into
  non-overlapping tiles, so the features see the stage's own detail (edges, patterns, hairlines).
  The embedded evaluator works at 64 px, so on whole images it would see an SR output, its
  bicubic baseline and the real image alike downsampled to about the input: a tile of 64 px is
  its working size, at the stage's resolution;
- sharpness: the mean absolute Laplacian of the output over that of the real image (1 is as
  sharp as real; bicubic is below 1, residual sampling noise shows above 1).

A picture per stage shows input | bicubic | SR | real for the first pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from imagen.data.holdout import HeldOut
from imagen.evaluate.metrics import Fidelity, mean_abs_laplacian
from imagen.images import image_grid, side_by_side, to_pil, to_uint8


def psnr(fake: Tensor, real: Tensor) -> float:
    """PSNR (dB) of (N, 3, H, W) images in [-1, 1], on the [0, 1] range."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio((fake + 1) / 2, (real + 1) / 2, data_range=1.0))


def downsample(images: Tensor, size: int) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 3, size, size), resized exactly as the training low-res
    inputs are (the loader's PIL bicubic, on 8-bit images)."""
    from imagen.data.loader import resize_image, to_tensor

    return torch.stack([to_tensor(resize_image(to_pil(x), size)) for x in images])


def bicubic_up(images: Tensor, size: int) -> Tensor:
    """The no-learning baseline: bicubic upsampling of the low-res input."""
    return F.interpolate(images, size=(size, size), mode="bicubic").clamp(-1, 1)


TILE = 64  # the embedded evaluator's working size


def pairs_for(resolution: int, pairs: int, min_tiles: int) -> int:
    """Held-out pairs for a stage: ``pairs``, or more until they give ``min_tiles`` tiles (a
    Frechet distance over a few dozen tiles in the evaluator's 98 dimensions is mostly noise)."""
    per_image = (resolution // min(TILE, resolution)) ** 2
    return max(pairs, -(-min_tiles // per_image))


def tiles(images: Tensor, size: int = TILE) -> Tensor:
    """(N, C, H, W) -> (N * H/size * W/size, C, size, size): non-overlapping tiles, row-major."""
    n, c, h, w = images.shape
    if h % size or w % size:
        raise ValueError(f"tiles: {h}x{w} images do not split into {size} px tiles")
    t = images.unfold(2, size, size).unfold(3, size, size)  # (N, C, H/s, W/s, s, s)
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size)


def measure(
    fake: Tensor, real: Tensor, fidelity: Fidelity, batch_size: int, tile: int = TILE
) -> dict[str, float]:
    """PSNR, tile Frechet distance and sharpness of ``fake`` against ``real`` (in [-1, 1]);
    ``fidelity`` holds the real ``tile`` px tiles' statistics."""
    sharp_real = mean_abs_laplacian(real)
    return {
        "psnr": psnr(fake, real),
        fidelity.name: fidelity.compute(to_uint8(tiles(fake, tile)), batch_size),
        "sharpness": mean_abs_laplacian(fake) / max(sharp_real, 1e-8),
    }


def evaluate_sr_stage(
    cascade: Any,
    name: str,
    holdout: HeldOut,
    out_dir: Path,
    *,
    pairs: int,
    seed: int,
    batch_size: int,
    inception_path: str | None = None,
    fidelity: Fidelity | None = None,
) -> dict[str, Any]:
    """SR vs bicubic on ``pairs`` held-out images for stage ``name``; writes sr_<name>.png.

    ``fidelity`` (a fresh one) measures the tiles; by default FID with ``inception_path``, else
    the embedded evaluator's distance."""
    stage = cascade.stages[name].config
    res, low = stage.resolution, stage.lowres
    real = holdout.images[:pairs].float() / 127.5 - 1  # (P, 3, R, R) in [-1, 1]
    if real.shape[-1] != res:
        real = F.interpolate(real, size=(res, res), mode="bicubic", antialias=True).clamp(-1, 1)
    lowres = downsample(real, low)  # (P, 3, low, low)
    captions = holdout.captions[:pairs]
    outputs = []
    for i in range(0, len(real), batch_size):
        text_embed, text_mask = cascade.encode(captions[i : i + batch_size])
        gen = torch.Generator(cascade.device).manual_seed(seed + i)
        sr = cascade.sample_stage(
            name, text_embed, text_mask, lowres[i : i + batch_size], generator=gen
        )
        outputs.append(sr.cpu())
    sr = torch.cat(outputs)  # (P, 3, R, R)
    bicubic = bicubic_up(lowres, res)
    fidelity = fidelity or Fidelity(inception_path)
    tile = min(TILE, res)
    fidelity.set_real(to_uint8(tiles(real, tile)), batch_size)
    result = {
        "pairs": len(real),
        "input_resolution": low,
        "resolution": res,
        "sr": measure(sr, real, fidelity, batch_size, tile),
        "bicubic": measure(bicubic, real, fidelity, batch_size, tile),
        "fidelity_metric": fidelity.name,
        "fidelity_tiles": f"{len(real) * (res // tile) ** 2} tiles of {tile} px",
    }
    result["sr_beats_bicubic"] = {
        "psnr": result["sr"]["psnr"] > result["bicubic"]["psnr"],
        fidelity.name: result["sr"][fidelity.name] < result["bicubic"][fidelity.name],
    }
    rows = []
    for k in range(min(4, len(real))):
        window = detail_window(real[k], bicubic[k], res // 4)  # at the stage's own pixels
        views = [to_pil(lowres[k]), to_pil(bicubic[k]), to_pil(sr[k]), to_pil(real[k])]
        views += [to_pil(v[k][window]) for v in (bicubic, sr, real)]
        rows.append(side_by_side(views, 256))
    labels = [
        f"{c}  [input {low} px | bicubic | {name} | real | the same three, {res // 4} px zoomed]"
        for c in captions[: len(rows)]
    ]
    image_grid(rows, labels, cols=1, cell=256).save(out_dir / f"sr_{name}.png")
    return result


def detail_window(real: Tensor, baseline: Tensor, size: int) -> tuple[slice, slice, slice]:
    """The (C, H, W) index of the ``size`` px square where ``baseline`` (bicubic) misses the
    most of ``real`` (mean absolute difference), on a grid of half-window steps: where an SR
    picture should zoom."""
    miss = (real.float() - baseline.float()).abs().mean(0)[None, None]  # (1, 1, H, W)
    step = max(1, size // 2)
    energy = F.avg_pool2d(miss, size, stride=step)[0, 0]  # (gh, gw)
    i, j = divmod(int(energy.argmax()), energy.shape[1])
    return slice(None), slice(i * step, i * step + size), slice(j * step, j * step + size)
