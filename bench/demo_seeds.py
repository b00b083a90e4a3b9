"""Demo seeds: the base stage's quality as a median and range over training seeds.

One training run is one draw: another seed, or another CPU model (whose kernels sum in another
order), lands elsewhere. In a project where `make demo` (or `dvc repro`) has run, this script
runs one DVC experiment per extra seed (``dvc exp run`` with
``-S ++stages.<stage>.trainer.seed=N``, named ``<stage>-seed-N``; only the stage and what reads it
re-run, every MLflow run lands in the project's store under the experiment's parent), then
reads every seed's ``reports/metrics.json`` from ``dvc exp show`` and prints, per guidance scale
and at each run's best scale, every measure's value per seed, median and range.

    python bench/demo_seeds.py                 # seeds 1 and 2 beside the workspace's seed
    python bench/demo_seeds.py --jobs 2        # both at once, through DVC's queue
    python bench/demo_seeds.py --no-run        # only the table, from experiments that exist

Appends the table's numbers to ``bench/results/demo_seeds.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from imagen.config import load_params
from imagen.mlops.experiments import by_name as experiments

METRICS = "reports/metrics.json"
# measures shown when present, in this order; the sweep's own axes are always shown
EXTRA = ["sharpness", "fd_dual", "caption_auc_dual"]


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def run_seeds(stage: str, seeds: list[int], jobs: int, existing: set[str]) -> None:
    """One DVC experiment per seed not yet run; ``jobs`` > 1 runs them through DVC's queue."""
    todo = [s for s in seeds if f"{stage}-seed-{s}" not in existing]
    for s in todo:
        name = f"{stage}-seed-{s}"
        # ++: set the key, adding it where params.yaml leaves it at its default
        args = ["exp", "run", "-n", name, "-S", f"++stages.{stage}.trainer.seed={s}"]
        t0 = time.monotonic()
        if jobs == 1:
            print(f"== {name}: dvc {' '.join(args)} --temp", flush=True)
            _dvc(*args, "--temp")
            print(f"== {name}: {time.monotonic() - t0:.0f} s", flush=True)
        else:
            _dvc(*args, "--queue")
    if jobs > 1 and todo:
        t0 = time.monotonic()
        _dvc("queue", "start", "-j", str(jobs))
        while True:
            status = _dvc("queue", "status").stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(10)
        print(status, f"\n== {len(todo)} experiments: {time.monotonic() - t0:.0f} s", flush=True)
        if "Failed" in status:
            raise SystemExit("an experiment failed: `dvc queue logs <name>` says why")


def _rows(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """'guidance w' / 'best' -> measure -> value, for the sweep's axes and the extras."""
    axes = [metrics["fidelity_metric"], metrics["alignment_metric"]]
    keys = axes + sorted(k for k in metrics["best"] if k.startswith("agreement_")) + EXTRA

    def pick(d: dict[str, Any]) -> dict[str, float]:
        return {k: float(d[k]) for k in dict.fromkeys(keys) if isinstance(d.get(k), int | float)}

    out = {f"guidance {s['guidance_scale']:g}": pick(s) for s in metrics["scales"]}
    best = metrics["best"]
    out["best"] = {"guidance_scale": float(best["guidance_scale"]), **pick(best)}
    return out


def table(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scale, measure): the value of each seed, their median, min and max."""
    rows: dict[tuple[str, str], dict[int, float]] = {}
    for seed, metrics in per_seed.items():
        for where, values in _rows(metrics).items():
            for key, value in values.items():
                rows.setdefault((where, key), {})[seed] = value
    out = []
    for (where, key), values in rows.items():
        v = list(values.values())
        out.append({"at": where, "measure": key, "seeds": values, "median": statistics.median(v),
                    "min": min(v), "max": max(v)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="base64", help="the stage whose trainer.seed varies")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="extra seeds to run")
    ap.add_argument("--jobs", type=int, default=1, help="experiments at once (DVC's queue)")
    ap.add_argument("--no-run", action="store_true", help="only read experiments that exist")
    args = ap.parse_args(argv)

    base_seed = load_params("params.yaml").stages[args.stage].trainer.seed
    if base_seed in args.seeds:
        raise SystemExit(f"seed {base_seed} is the workspace's own (params.yaml); drop it")
    if not Path(METRICS).exists():
        raise SystemExit(f"{METRICS} is missing: run `make demo` (or `dvc repro`) first")
    shown = json.loads(_dvc("exp", "show", "--json").stdout)
    if not args.no_run:
        run_seeds(args.stage, args.seeds, args.jobs, set(experiments(shown)))
        shown = json.loads(_dvc("exp", "show", "--json").stdout)
    found = experiments(shown)
    per_seed = {base_seed: json.loads(Path(METRICS).read_text())}
    import dvc.api

    for s in args.seeds:
        rev = found.get(f"{args.stage}-seed-{s}", {}).get("rev")
        if rev is None:
            raise SystemExit(f"no experiment {args.stage}-seed-{s} in `dvc exp show`")
        # the whole file (dvc exp show keeps only its scalars, not the per-scale rows)
        per_seed[s] = json.loads(dvc.api.read(METRICS, rev=rev))

    rows = table(per_seed)
    seeds = list(per_seed)
    print(f"\n{args.stage}, training seeds {seeds} (the first is the workspace's)\n")
    print("| at | measure | " + " | ".join(f"seed {s}" for s in seeds) + " | median | range |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for r in rows:
        vals = " | ".join(f"{r['seeds'].get(s, float('nan')):.3g}" for s in seeds)
        print(f"| {r['at']} | {r['measure']} | {vals} | {r['median']:.3g} "
              f"| {r['min']:.3g} - {r['max']:.3g} |")  # fmt: skip
    out = Path("bench/results/demo_seeds.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "stage": args.stage,
                            "seeds": seeds, "rows": rows}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
