"""Super-resolution stages measured alone: given the real low-res image, how close is the output?

For each trained SR stage, held-out images are downsampled to the stage's input size, the stage
super-resolves them (text-conditioned, its own sampling settings), and the output is compared
with the real high-res image beside the bicubic upsampling of the same input:

- PSNR against the real image (torchmetrics, on [0, 1]; higher is better);
- the Frechet distance of the evaluator's features (:class:`~imagen.evaluate.metrics.Fidelity`;
  lower is better);
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
    """(N, 3, H, W) -> (N, 3, size, size), antialiased as the training low-res inputs are."""
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)


def bicubic_up(images: Tensor, size: int) -> Tensor:
    """The no-learning baseline: bicubic upsampling of the low-res input."""
    return F.interpolate(images, size=(size, size), mode="bicubic").clamp(-1, 1)


def measure(fake: Tensor, real: Tensor, fidelity: Fidelity, batch_size: int) -> dict[str, float]:
    """PSNR, Frechet distance and sharpness of ``fake`` against ``real`` (both in [-1, 1])."""
    sharp_real = mean_abs_laplacian(real)
    return {
        "psnr": psnr(fake, real),
        fidelity.name: fidelity.compute(to_uint8(fake), batch_size),
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
) -> dict[str, Any]:
    """SR vs bicubic on ``pairs`` held-out images for stage ``name``; writes sr_<name>.png."""
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
    fidelity = Fidelity(inception_path)
    fidelity.set_real(to_uint8(real), batch_size)
    result = {
        "pairs": len(real),
        "input_resolution": low,
        "resolution": res,
        "sr": measure(sr, real, fidelity, batch_size),
        "bicubic": measure(bicubic, real, fidelity, batch_size),
        "fidelity_metric": fidelity.name,
    }
    result["sr_beats_bicubic"] = {
        "psnr": result["sr"]["psnr"] > result["bicubic"]["psnr"],
        fidelity.name: result["sr"][fidelity.name] < result["bicubic"][fidelity.name],
    }
    rows = [
        side_by_side([to_pil(lowres[k]), to_pil(bicubic[k]), to_pil(sr[k]), to_pil(real[k])], 256)
        for k in range(min(4, len(real)))
    ]
    labels = [f"{c}  [input {low} px | bicubic | {name} | real]" for c in captions[: len(rows)]]
    image_grid(rows, labels, cols=1, cell=256).save(out_dir / f"sr_{name}.png")
    return result
