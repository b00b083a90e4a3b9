"""Data-path throughput on this machine: ingest images/s, precache captions/s, loader samples/s.

Runs the real stages on the embedded data set in a temporary folder (about a minute on two
CPU cores):

    .venv/bin/python bench/bench_data.py [--num 96] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from imagen.config import Params, deep_merge, resolve_params
from imagen.data.ingest import ingest
from imagen.data.loader import ImagenDataModule
from imagen.data.precache import precache

REPO = Path(__file__).resolve().parents[1]


def params_for(root: Path, num: int, image_size: int, workers: int) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    over = {
        "data": {
            "num_train": num,
            "num_holdout": 8,
            "image_size": image_size,
            "samples_per_shard": 32,
            "shards_dir": str(root / f"shards{image_size}"),
            "encoded_dir": str(root / f"encoded{image_size}"),
        },
        "trainer": {"num_workers": workers, "shuffle_buffer": 64},
    }
    return resolve_params(deep_merge(raw, over))


def loader_rate(params: Params, stage: str, batches: int) -> tuple[float, tuple[int, ...]]:
    st = params.stage(stage).model_copy(deep=True)
    st.trainer.batch_size = 16
    it = iter(ImagenDataModule(params, st).train_dataloader())
    first = next(it)  # worker start-up and the shuffle buffer's first fill are not counted
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in itertools.islice(it, batches))
    return n / (time.perf_counter() - t0), tuple(first["image"].shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=96, help="training samples per resolution")
    ap.add_argument("--workers", type=int, default=2, help="ingest processes / loader workers")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the default encoder folder data/encoder is built here
        try:
            rows = []
            for size in (64, 256):
                params = params_for(root, args.num, size, args.workers)
                m = ingest(params.data, workers=args.workers, progress=False, log=lambda s: None)
                rows.append((f"ingest images/s @ {size}", m["images_per_s"]))
                if size == 64:
                    pm = precache(params, progress=False, log=lambda s: None)
                    rows.append(("precache captions/s", pm["captions_per_s"]))
                    rows.append(("precache bytes/sample", pm["bytes_per_sample"]))
                else:
                    precache(params, progress=False, log=lambda s: None)
                stage = "base64" if size == 64 else "sr256"
                rate, shape = loader_rate(params, stage, batches=8)
                rows.append((f"loader samples/s @ {size} ({stage}, batch {shape})", rate))
            small = params_for(root, 16, 1024, args.workers)
            m = ingest(small.data, workers=args.workers, progress=False, log=lambda s: None)
            rows.append(("ingest images/s @ 1024", m["images_per_s"]))
        finally:
            os.chdir(cwd)
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:10.1f}")


if __name__ == "__main__":
    main()
