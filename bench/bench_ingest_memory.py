"""Peak memory of `imagen ingest` on a folder of many small images (default 20,000).

Generates the folder once (16 px PNGs and a captions.csv, under bench/results/), then runs the
ingest in a fresh subprocess per code tree (``--code DIR``: a checkout whose ``imagen`` is
imported, so two releases compare on the same data) and prints the Python heap peak
(tracemalloc) and the process's peak resident memory (ru_maxrss) above what the imports took.

    python bench/bench_ingest_memory.py --code /path/to/old/checkout --code .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tracemalloc
from imagen.config import DataConfig
from imagen.data.ingest import ingest
src, out = sys.argv[1], sys.argv[2]
cfg = DataConfig(source="folder", source_path=src, shards_dir=out, image_size=16,
                 min_resolution=8, samples_per_shard=1000, pyramid=[], num_holdout=256)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = time.perf_counter()
m = ingest(cfg, workers=1, progress=False, log=lambda s: None)
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"written": m["counts"]["written"], "seconds": round(seconds, 1),
                  "heap_peak_mib": round(peak / 2**20, 1),
                  "rss_after_imports_mib": round(rss0 / 1024, 1),
                  "rss_peak_mib": round(rss1 / 1024, 1)}))
"""


def make_folder(dest: Path, n: int) -> Path:
    from PIL import Image

    if (dest / "captions.csv").exists() and len(list(dest.glob("*.png"))) == n:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rows = ["file,caption"]
    for i in range(n):
        Image.new("RGB", (16, 16), (i % 251, (i // 251) % 251, 90)).save(dest / f"img_{i:06d}.png")
        rows.append(f"img_{i:06d}.png,a square of colour number {i}")
    (dest / "captions.csv").write_text("\n".join(rows) + "\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--code", action="append", default=None, help="checkout(s) to measure")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    src = make_folder(here / "bench/results" / f"ingest_folder_{args.images}", args.images)
    print("| code | images written | s | heap peak MiB | RSS after imports MiB | RSS peak MiB |")
    print("|---|---|---|---|---|---|")
    for code in args.code or [str(here)]:
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), out],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"| {code} | {r['written']} | {r['seconds']} | {r['heap_peak_mib']} | "
            f"{r['rss_after_imports_mib']} | {r['rss_peak_mib']} |"
        )


if __name__ == "__main__":
    main()
