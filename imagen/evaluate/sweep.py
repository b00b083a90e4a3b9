"""The guidance sweep: generate held-out captions at every scale, measure, pick the trade-off.

Every scale uses the same seed, so the curve compares scales on the same initial noise. The
swept scale is the base64 stage's guidance (Imagen's FID-CLIP curves sweep the base model); SR
stages, when the sweep's depth includes them, keep their configured guidance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from imagen.data.holdout import HeldOut
from imagen.evaluate.metrics import Alignment, Fidelity, mean_abs_laplacian
from imagen.images import to_uint8


@dataclass
class SweepResult:
    depth: str
    fidelity: str
    fidelity_label: str
    alignment: str
    alignment_label: str
    rows: list[dict[str, float]] = field(default_factory=list)
    samples: dict[float, Tensor] = field(default_factory=dict)  # first images per scale
    seconds: float = 0.0
    kind: str = "cfg"  # the base stage's guidance: cfg, or auto (autoguidance)


def sweep(
    cascade: Any,
    holdout: HeldOut,
    scales: Sequence[float],
    *,
    depth: str,
    fidelity: Fidelity,
    alignment: Alignment,
    extra_fidelity: Sequence[Fidelity] = (),
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    keep: int = 16,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_batch: Callable[[int], Any] | None = None,
    kind: str = "cfg",
) -> SweepResult:
    """Generate ``holdout``'s captions at every guidance scale; fidelity + alignment each (and
    every ``extra_fidelity`` distance beside the sweep's own). ``kind`` "auto" sweeps
    autoguidance (the guide set on the cascade's base stage) instead of CFG: the same two
    network evaluations a step at every scale but 1."""
    start = time.perf_counter()
    res = cascade.stages[depth].resolution
    real = holdout.images
    if real.shape[-1] != res:
        real = torch.nn.functional.interpolate(real.float(), size=(res, res), mode="area")
        real = real.round().clamp(0, 255).to(torch.uint8)
    for f in (fidelity, *extra_fidelity):
        f.set_real(real, batch_size)
    real_sharpness = mean_abs_laplacian(real)
    result = SweepResult(depth, fidelity.name, fidelity.label, alignment.name, alignment.label)
    result.kind = kind
    for w in scales:
        t0 = time.perf_counter()
        images = cascade.generate(
            holdout.captions,
            depth=depth,
            steps=steps,
            sampler=sampler,
            guidance={"base64": float(w)},
            guidance_kind={"base64": kind},
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            on_batch=on_batch,
        )[depth]
        fake = to_uint8(images)  # (N, 3, R, R)
        row = {"guidance_scale": float(w), fidelity.name: fidelity.compute(fake, batch_size)}
        row.update({f.name: f.compute(fake, batch_size) for f in extra_fidelity})
        row.update(alignment.compute(fake, holdout.captions, holdout.attributes, batch_size))
        # clean samples ~1; residual sampling noise shows well above (same size as the real)
        row["sharpness"] = mean_abs_laplacian(fake) / max(real_sharpness, 1e-8)
        row["seconds"] = time.perf_counter() - t0
        result.rows.append(row)
        result.samples[float(w)] = images[:keep]
        if log:
            log(
                f"{'autoguidance' if kind == 'auto' else 'guidance'} {w:g}: "
                f"{fidelity.name} {row[fidelity.name]:.3f}, "
                f"{alignment.name} {row[alignment.name]:.3f} ({row['seconds']:.1f} s)"
            )
    result.seconds = time.perf_counter() - start
    return result


def best_tradeoff(
    rows: Sequence[dict[str, float]],
    fidelity: str,
    alignment: str,
    tolerance: float = 0.25,
    margin: float = 0.0,
) -> dict[str, Any]:
    """The point a user would pick: the best-aligned scale among those whose fidelity distance
    is within ``tolerance`` of the lowest, ``distance <= (1 + tolerance) * min``.

    Guidance buys alignment with fidelity; this keeps the fidelity close to the best the sweep
    saw and takes all the alignment that costs. Alignments within ``margin`` of the highest
    eligible one count as equal (a measurement on a few dozen captions moves by a few hundredths
    between seeds), and the lowest distance among them wins.
    """
    if not rows:
        raise ValueError("no sweep rows")
    lowest = min(r[fidelity] for r in rows)
    ceiling = lowest + tolerance * abs(lowest)
    eligible = [r for r in rows if r[fidelity] <= ceiling + 1e-12]
    top = max(r[alignment] for r in eligible)
    tied = [r for r in eligible if r[alignment] >= top - margin - 1e-12]
    best = min(tied, key=lambda r: (r[fidelity], -r[alignment]))
    rule = (
        f"highest {alignment} among guidance scales with {fidelity} <= "
        f"(1 + {tolerance:g}) x lowest = {ceiling:.4g}"
    )
    if margin:
        rule += f"; within {margin:g} of it counts as equal, then the lowest {fidelity}"
    return {
        **best,
        "rule": rule,
        "eligible_scales": [r["guidance_scale"] for r in eligible],
    }


def untrained_reference(
    cascade: Any,
    holdout: HeldOut,
    fidelity: Fidelity,
    alignment: Alignment,
    *,
    extra_fidelity: Sequence[Fidelity] = (),
    steps: int | None,
    sampler: str | None = None,
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """The same metrics for a freshly initialised base UNet of the same config: the yardstick
    that says how much training moved the fidelity and alignment numbers."""
    from imagen.nn import build_unet
    from imagen.sample.cascade import Cascade

    config = cascade.stages["base64"].config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_unet(config.model).eval()
    precision = "bf16" if cascade.bf16 else "32"
    fresh = Cascade({"base64": (net, config)}, cascade.encoder, cascade.device, precision)
    result = sweep(
        fresh,
        holdout,
        [1.0],
        depth="base64",
        fidelity=fidelity,
        alignment=alignment,
        extra_fidelity=extra_fidelity,
        steps=steps,
        sampler=sampler,
        seed=seed,
        batch_size=batch_size,
        keep=0,
        on_batch=on_batch,
    )
    row = result.rows[0]
    return {k: float(v) for k, v in row.items() if k not in ("guidance_scale", "seconds")}
