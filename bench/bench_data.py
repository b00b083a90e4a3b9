"""Data-path throughput on this machine: ingest images/s, precache captions/s, loader samples/s.

Runs the real stages on the embedded data set in a temporary folder (about a minute on two
CPU cores):

    .venv/bin/python bench/bench_data.py [--num 96] [--workers 2]

A second section, the loader against the training step: the demo's data (1024 px images with
the 64 and 256 px copies) and the demo's stages as params.yaml sets them; per stage (base64's
progressive 32 px phase and its 64 px phase apart) the loader's images/s, as the step receives
them (finished on the device), beside the images/s of the training step alone (forward,
backward, AdamW on batches already loaded). The loader keeps up where its rate is the higher.

    .venv/bin/python bench/bench_data.py --section step [--num 48] [--loader-workers 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from imagen.config import Params, deep_merge, resolve_params
from imagen.data.ingest import ingest
from imagen.data.loader import ImagenDataModule, resolve_num_workers
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


# (label, stage, the optimiser step the loader starts at: base64's progressive phase or after)
STEP_CASES = (
    ("base64 @32 px (progressive)", "base64", 0),
    ("base64 @64 px", "base64", None),
    ("sr256", "sr256", 0),
    ("sr1024", "sr1024", 0),
)


def loader_vs_step(
    root: Path, num: int, workers: int | None, batches: int = 6, steps: int = 3
) -> list[tuple[str, float, float, int]]:
    """(label, loader images/s, training step images/s, workers) per stage of the demo."""
    from imagen.train.module import ImagenStage

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    over = {
        "data": {
            "num_train": num,
            "num_holdout": 4,
            "shards_dir": str(root / "demo_shards"),
            "encoded_dir": str(root / "demo_encoded"),
        },
        "trainer": {"num_workers": workers},
    }
    params = resolve_params(deep_merge(raw, over))
    ingest(params.data, workers=2, progress=False, log=lambda s: None)
    precache(params, progress=False, log=lambda s: None)
    rows = []
    for label, name, start in STEP_CASES:
        stage = params.stage(name)
        p = stage.trainer.progressive
        begin = start if start is not None else (p.steps if p is not None else 0)
        dm = ImagenDataModule(params, stage, start_step=begin)
        it = iter(dm.train_dataloader())
        got = [dm.on_after_batch_transfer(next(it), 0)]  # start-up and first fill not counted
        t0 = time.perf_counter()
        for b in itertools.islice(it, batches):
            got.append(dm.on_after_batch_transfer(b, 0))
        n = sum(len(b["key"]) for b in got[1:])
        loader = n / (time.perf_counter() - t0)
        del it
        step = step_rate(ImagenStage(stage), got, begin, steps)
        rows.append((label, loader, step, resolve_num_workers(stage)))
    return rows


def step_rate(module: Any, batches: list[dict[str, Any]], step: int, steps: int) -> float:
    """Images/s of the training step alone (loss, backward, fused AdamW) on loaded batches."""
    from imagen.data.loader import progressive_batch

    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4, fused=True)
    todo = [progressive_batch(module.stage, dict(b), step) for b in batches]

    def one(batch: dict[str, Any]) -> int:
        loss = module.denoiser.loss(batch["image"], module.condition(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(batch["image"])

    one(todo[0])  # warm-up
    t0 = time.perf_counter()
    n = sum(one(todo[1 + i % (len(todo) - 1)]) for i in range(steps))
    return n / (time.perf_counter() - t0)


def step_section(num: int, workers: int | None) -> None:
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the default encoder folder data/encoder is built here
        try:
            rows = loader_vs_step(Path(tmp), num, workers)
        finally:
            os.chdir(cwd)
    width = max(len(r[0]) for r in rows)
    print(f"{'stage (demo params)':<{width}}  loader img/s  step img/s  loader/step  workers")
    for label, loader, step, w in rows:
        print(f"{label:<{width}}  {loader:12.1f}  {step:10.1f}  {loader / step:10.2f}x  {w:7d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=96, help="training samples per resolution")
    ap.add_argument("--workers", type=int, default=2, help="ingest processes / loader workers")
    ap.add_argument(
        "--section",
        choices=["data", "step", "all"],
        default="all",
        help="data: ingest / precache / loader; step: the loader against the training step",
    )
    ap.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="step section: DataLoader workers (default: trainer.num_workers' default, from "
        "the cores)",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.section in ("step", "all"):
        step_section(min(args.num, 48), args.loader_workers)
    if args.section == "step":
        return
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
