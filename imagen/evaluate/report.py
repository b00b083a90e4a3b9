"""What the sweep writes: metrics.json, fid_clip.csv (for `dvc plots`), fid_clip.png, grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from imagen.data.holdout import HeldOut
from imagen.evaluate.metrics import AGREEMENT
from imagen.evaluate.sweep import SweepResult, best_tradeoff


def _scale_name(w: float) -> str:
    return f"{w:g}".replace(".", "_")


def plot_fid_clip(
    result: SweepResult,
    best: dict[str, Any],
    path: str | Path,
    also: SweepResult | None = None,
) -> Path:
    """Fidelity distance (y) against alignment (x), each point labelled with its scale; with
    ``also`` (the autoguidance sweep) its curve beside classifier-free guidance's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r[result.alignment] for r in result.rows]
    y = [r[result.fidelity] for r in result.rows]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.plot(x, y, "-o", color="tab:blue", markersize=5, label="classifier-free guidance")
    if also is not None and also.rows:
        ax_, ay = [r[also.alignment] for r in also.rows], [r[also.fidelity] for r in also.rows]
        ax.plot(ax_, ay, "-s", color="tab:green", markersize=5, label="autoguidance (same NFE)")
        for r, xi, yi in zip(also.rows, ax_, ay, strict=True):
            ax.annotate(
                f"w={r['guidance_scale']:g}",
                (xi, yi),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=8,
                color="tab:green",
            )
    for r, xi, yi in zip(result.rows, x, y, strict=True):
        ax.annotate(
            f"w={r['guidance_scale']:g}",
            (xi, yi),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.plot(
        [best[result.alignment]],
        [best[result.fidelity]],
        "*",
        color="tab:red",
        markersize=14,
        label=f"best trade-off (w={best['guidance_scale']:g})",
    )
    ax.set_xlabel(result.alignment_label)
    ax.set_ylabel(result.fidelity_label.split(" (")[0])
    ax.set_title(
        f"{result.fidelity} vs {result.alignment} over guidance scales ({result.depth})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # the rule that picked the star, under the axes
    fig.text(0.01, 0.01, "best trade-off: " + best["rule"], fontsize=6, color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reports(
    result: SweepResult,
    holdout: HeldOut,
    out_dir: str | Path,
    *,
    tolerance: float = 0.1,
    margin: float = 0.0,
    extra: dict[str, Any] | None = None,
    also: SweepResult | None = None,
) -> dict[str, Any]:
    """metrics.json, fid_clip.csv, fid_clip.png and grids/scale_<w>.png; returns the metrics.
    ``also``, the autoguidance sweep: its rows and best point under metrics.json's
    "autoguidance", its curve in fid_clip.png and its grids as grids/auto_<w>.png."""
    from imagen.embedded.evaluator import chance_levels
    from imagen.images import image_grid, to_pil

    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    best = best_tradeoff(result.rows, result.fidelity, result.alignment, tolerance, margin)
    metrics: dict[str, Any] = {
        "depth": result.depth,
        "num_images": len(holdout),
        "holdout": holdout.source,
        "fidelity_metric": result.fidelity,
        "fidelity_label": result.fidelity_label,
        "alignment_metric": result.alignment,
        "alignment_label": result.alignment_label,
        "best": best,
        "scales": result.rows,
        "seconds": round(result.seconds, 2),
    }
    if result.alignment == AGREEMENT or any(AGREEMENT in r for r in result.rows):
        metrics["chance_agreement"] = chance_levels()
    if also is not None:
        metrics["autoguidance"] = {
            "best": best_tradeoff(also.rows, also.fidelity, also.alignment, tolerance, margin),
            "scales": also.rows,
            "seconds": round(also.seconds, 2),
        }
    metrics.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    with (out / "fid_clip.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        # generic columns for dvc.yaml's plot, whatever measured them; then the named ones
        writer.writerow(
            ["guidance_scale", "fidelity", "alignment", result.fidelity, result.alignment]
        )
        for r in result.rows:
            f, a = r[result.fidelity], r[result.alignment]
            writer.writerow([r["guidance_scale"], f, a, f, a])
    plot_fid_clip(result, best, out / "fid_clip.png", also)
    for prefix, sweep in (("scale", result), ("auto", also)):
        for w, images in (sweep.samples if sweep is not None else {}).items():
            if len(images) == 0:
                continue
            pil = [to_pil(x) for x in images]
            grid = image_grid(pil, holdout.captions[: len(pil)], cell=128)
            grid.save(out / "grids" / f"{prefix}_{_scale_name(w)}.png")
    return metrics
