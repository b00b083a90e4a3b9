"""Data-path throughput on this machine: ingest images/s, precache captions/s, loader samples/s.

Runs the real stages on the embedded data set in a temporary folder (about a minute on two
CPU cores):

    .venv/bin/python bench/bench_data.py [--num 96] [--workers 2]

First it prints the precache table of a T5 of real architecture (t5-v1_1-base shape, random
weights built from a config): captions/s with fixed vs dynamic padding, fp32 vs bf16, 1 vs 2
processes, and the encoder's memory in fp32 / bf16 (base and XXL). ``--section t5`` prints only
that table.

A second section (``--section step``), the loader against the training step: the demo's data
(1024 px images with the 64 and 256 px copies) and the demo's stages as params.yaml sets them;
per stage (base64's progressive 32 px phase and its 64 px phase apart) the loader's images/s,
as the step receives them (finished on the device), beside the images/s of the training step
alone (forward, backward, AdamW on batches already loaded). The loader keeps up where its rate
is the higher.

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
from imagen.data.datamodule import ImagenDataModule
from imagen.data.ingest import ingest
from imagen.data.loader import resolve_num_workers
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


# ---- precache at scale: a T5 of real architecture (t5-v1_1-base shape, random weights) ----
T5_BASE = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def t5_encoder(shape: dict[str, int], dtype: torch.dtype, device: str = "cpu") -> Any:
    """A T5 v1.1 encoder of ``shape`` (random weights, seed 0) with the installed MiniLM's
    WordPiece tokenizer (T5's own SentencePiece vocabulary is not installable offline; both
    split English into subwords, about 1.3 tokens a word); ``device`` meta: no memory."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from imagen.config.encoders import expand_alias
    from imagen.text import TextEncoder

    tok = AutoTokenizer.from_pretrained(expand_alias("minilm"))
    config = T5Config(
        vocab_size=len(tok), feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = T5EncoderModel(config).to(dtype).eval().requires_grad_(False)
    return TextEncoder(
        model, tok, 128, "t5-v1_1-base-shape", torch.device(device), shape["d_model"]
    )


def _encode_rate(captions: list[str], padding: str, dtype: str, batch: int, threads: int) -> float:
    """Captions/s of one process: fixed (every caption padded to 128) or dynamic (sorted by
    length, each batch padded to its longest), after one warm-up batch."""
    torch.set_num_threads(threads)
    enc = t5_encoder(T5_BASE, getattr(torch, dtype))
    enc.encode_sorted(captions[:batch], batch)  # warm-up
    t0 = time.perf_counter()
    if padding == "dynamic":
        enc.encode_sorted(captions, batch)
    else:
        for i in range(0, len(captions), batch):
            enc.encode_unpadded(captions[i : i + batch], padding="max_length")
    return len(captions) / (time.perf_counter() - t0)


def _encode_star(job: tuple[list[str], str, str, int, int]) -> float:
    return _encode_rate(*job)


def precache_scale_rows(n: int, batch: int) -> list[tuple[str, float]]:
    """Captions/s of the t5-v1_1-base-shaped encoder on ``n`` embedded captions: fixed vs
    dynamic padding, fp32 vs bf16, 1 process of 2 threads vs 2 processes of 1 thread (each
    half of the captions, as two precache ranks with their shards), and the encoder's memory
    (what online_encoding holds on every rank) in fp32 and bf16, base and XXL shapes."""
    import multiprocessing as mp

    from imagen.embedded.dataset import holdout_captions

    captions = [c for c, _ in holdout_captions(n, seed=1)]
    enc = t5_encoder(T5_BASE, torch.float32)
    lengths = enc.token_lengths(captions)
    print(f"T5 table: {n} embedded captions, {sum(lengths) / n:.1f} tokens on average (max "
          f"{max(lengths)}; fixed padding: 128), batch {batch}", flush=True)  # fmt: skip
    rows = []
    for padding, dtype in (("fixed", "float32"), ("dynamic", "float32"), ("dynamic", "bfloat16")):
        rate = _encode_rate(captions, padding, dtype, batch, 2)
        rows.append((f"t5-base captions/s, {padding} padding, {dtype}, 1 process", rate))
    halves = [captions[: n // 2], captions[n // 2 :]]
    with mp.get_context("spawn").Pool(2) as pool:
        jobs = [(h, "dynamic", "float32", batch, 1) for h in halves]
        done = pool.map(_encode_star, jobs)
    # the encoding time of the slower rank (model build excluded, as in the 1-process rows)
    slowest = max(len(h) / r for h, r in zip(halves, done, strict=True))
    rows.append(("t5-base captions/s, dynamic padding, float32, 2 processes", n / slowest))
    for name, shape in (("t5-v1_1-base", T5_BASE), ("t5-v1_1-xxl", T5_XXL)):
        meta = t5_encoder(shape, torch.float32, device="meta").model
        count = sum(p.numel() for p in meta.parameters())
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            rows.append((f"{name} encoder weights, {dtype} (MiB)", count * size / 2**20))
    return rows


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
    ap.add_argument("--captions", type=int, default=128, help="captions for the T5 table")
    ap.add_argument(
        "--section",
        choices=["t5", "step", "data", "all"],
        default="all",
        help="t5: precache captions/s of a t5-v1_1-base-shaped encoder; step: the loader "
        "against the training step; data: ingest / precache / loader",
    )
    ap.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="step section: DataLoader workers (default: trainer.num_workers' default, from "
        "the cores)",
    )
    args = ap.parse_args()
    if args.section in ("all", "t5"):
        rows = precache_scale_rows(args.captions, batch=64)
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value:10.1f}", flush=True)
    torch.set_num_threads(2)
    if args.section in ("step", "all"):
        step_section(min(args.num, 48), args.loader_workers)
    if args.section not in ("data", "all"):
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
