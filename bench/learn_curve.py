"""Caption agreement against training time, from the agreement.csv that ``imagen train`` writes.

The base stage scores every training sample grid with the embedded evaluator and appends one row
per grid to ``models/base64/agreement.csv`` (step, agreement, then one column per attribute).
This script turns it into a table (markdown) and a picture with one panel per attribute, each
with its chance level and the one-sided 95% significance line for the number of captions scored
(an attribute is "above chance" when it clears that line, not just chance itself).

Time is the images seen (step x batch) divided by an images/s rate you pass, normally the rate
``imagen train`` logged (``train/images_per_s`` in MLflow) on an otherwise idle machine, so a run
that shared its cores with other jobs is still placed at the time it would have taken alone.

    python bench/learn_curve.py models/base64/agreement.csv --batch 32 --images-per-s 46 \
        --captions 64 --png docs/learn_curve.png

Several runs of the same batch and rate compare as ``LABEL=PATH`` arguments (one table each, one
line per run in every panel), e.g. two noise-level distributions:

    python bench/learn_curve.py "p_mean -1.2=old/agreement.csv" "p_mean 0.5=new/agreement.csv" ...
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagen.embedded.dataset import ATTRIBUTES  # noqa: E402

Z95 = 1.645  # one-sided 95%


def read_rows(path: Path) -> list[dict[str, float]]:
    """The rows of an agreement.csv as floats, one per step (a repeated step keeps the last)."""
    with path.open() as f:
        rows = {int(r["step"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}
    if not rows:
        raise SystemExit(f"{path}: no rows (has training written a sample grid yet?)")
    missing = [a for a in ATTRIBUTES if a not in next(iter(rows.values()))]
    if missing:
        raise SystemExit(f"{path}: columns {missing} missing; is this an agreement.csv?")
    return [rows[s] for s in sorted(rows)]


def significance_line(chance: float, n: int) -> float:
    """Accuracy a chance-level guesser exceeds with probability 5% over ``n`` captions."""
    return chance + Z95 * math.sqrt(chance * (1 - chance) / n)


def table(rows: list[dict[str, float]], batch: int, rate: float, n: int) -> str:
    chance = {a: 1 / len(v) for a, v in ATTRIBUTES.items()}
    line = {a: significance_line(c, n) for a, c in chance.items()}
    head = "| step | images seen | minutes | " + " | ".join(ATTRIBUTES) + " | agreement |"
    out = [head, "|" + "---|" * (4 + len(ATTRIBUTES))]
    out.append(
        "| chance (95% line) | | | "
        + " | ".join(f"{chance[a]:.2f} ({line[a]:.2f})" for a in ATTRIBUTES)
        + f" | {sum(chance.values()) / len(chance):.2f} |"
    )
    for r in rows:
        images = r["step"] * batch
        cells = [f"**{r[a]:.2f}**" if r[a] > line[a] else f"{r[a]:.2f}" for a in ATTRIBUTES]
        out.append(
            f"| {int(r['step'])} | {images / 1000:.0f}k | {images / rate / 60:.1f} | "
            + " | ".join(cells)
            + f" | {r['agreement']:.2f} |"
        )
    return "\n".join(out)


def parse_run(arg: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (labelled by its folder) -> (label, path)."""
    label, sep, path = arg.rpartition("=")
    return (label, Path(path)) if sep else (Path(arg).parent.name or arg, Path(arg))


def plot(
    runs: dict[str, list[dict[str, float]]], batch: int, rate: float, n: int, png: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*ATTRIBUTES, "agreement"]
    fig, grid = plt.subplots(2, 3, figsize=(9.0, 5.6), sharex=True)
    axes = list(grid.flat)
    for ax, name in zip(axes, names, strict=True):
        if name == "agreement":
            chance = sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES)
        else:
            chance = 1 / len(ATTRIBUTES[name])
            ax.axhline(significance_line(chance, n), color="tab:red", ls="--", lw=0.8)
        ax.axhline(chance, color="grey", ls=":", lw=1)
        for label, rows in runs.items():
            minutes = [r["step"] * batch / rate / 60 for r in rows]
            ax.plot(minutes, [r[name] for r in rows], "o-", ms=3, label=label)
        ax.set_title(name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[-1].legend(fontsize=8, loc="lower right")
    for ax in grid[1]:
        ax.set_xlabel("training minutes (idle 2-core CPU)")
    for ax in grid[:, 0]:
        ax.set_ylabel(f"correct, {n} held-out captions")
    fig.suptitle("base64 caption following (grey: chance, red dashes: 95% above chance)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs", nargs="+", help="agreement.csv written by imagen train, or LABEL=PATH per run"
    )
    ap.add_argument("--batch", type=int, required=True, help="training batch size")
    ap.add_argument("--images-per-s", type=float, required=True, help="unloaded training rate")
    ap.add_argument("--captions", type=int, default=64, help="captions scored per grid")
    ap.add_argument("--png", type=Path, help="write the picture here")
    args = ap.parse_args()
    runs = {label: read_rows(path) for label, path in map(parse_run, args.runs)}
    for label, rows in runs.items():
        if len(runs) > 1:
            print(f"\n### {label}\n")
        print(table(rows, args.batch, args.images_per_s, args.captions))
    if args.png:
        plot(runs, args.batch, args.images_per_s, args.captions, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
