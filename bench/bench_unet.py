"""UNet training-step benchmark.

CPU (always): for the small presets, forward + backward + AdamW step at a small batch: time per
image and peak memory. Memory is the growth of the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) from just after the model and the optimiser
are built to the end of the timed steps, measured in a fresh subprocess per preset (the peak
RSS of a process never decreases, so presets must not share one).

"CPU s" is the process CPU time of the step (all threads): with a busy neighbour on the
same cores the wall time inflates, the CPU time much less.

CUDA (when available): training images/s of the paper presets in bf16 autocast, with flash
attention and channels_last both off and both on.

    .venv/bin/python bench/bench_unet.py [--batch 8] [--steps 3] [--text-dim 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagen.config import ModelConfig  # noqa: E402
from imagen.nn import build_unet, count_parameters, preset_model_config  # noqa: E402
from imagen.presets import PAPER_PRESETS  # noqa: E402

SMALL = ("small_res_64", "small_res_256", "small_res_1024")


def batch_for(net: torch.nn.Module, b: int, text_dim: int, tokens: int, device: str) -> dict:
    s = net.image_size
    kw = {
        "x": torch.randn(b, net.channels, s, s, device=device),
        "noise_cond": torch.randn(b, device=device),
        "text_embed": torch.randn(b, tokens, text_dim, device=device),
        "text_mask": torch.arange(tokens, device=device)[None].expand(b, -1) < tokens // 2,
    }
    if net.is_sr:
        kw["lowres"] = torch.randn(b, net.channels, s // 4, s // 4, device=device)
        kw["aug_level"] = torch.rand(b, device=device)
    return kw


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, kw: dict) -> None:
    loss = (net(**kw).float() - kw["x"].float()).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def one_cpu(name: str, batch: int, steps: int, text_dim: int, tokens: int, threads: int) -> dict:
    """Measure one small preset (run in its own process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_unet(preset_model_config(name, text_dim))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    kw = batch_for(net, batch, text_dim, tokens, "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    train_step(net, opt, kw)  # warm-up (allocates optimiser state)
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(net, opt, kw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = min(times)
    return {
        "preset": name,
        "params": count_parameters(net),
        "size": net.image_size,
        "batch": batch,
        "step_s": step,
        "cpu_s": min(cpu),
        "ms_per_image": 1e3 * step / batch,
        "peak_rss_delta_mib": (rss1 - rss0) / 1024,
    }


def cuda_images_per_s(name: str, fast: bool, steps: int, text_dim: int, tokens: int) -> float:
    """Training images/s of a paper preset in bf16; ``fast``: flash attention + channels_last."""
    base = preset_model_config(name, text_dim)
    unet = base.unet.model_copy(update={"flash_attention": fast, "stable_attention": not fast})
    model = ModelConfig.model_validate(
        {**base.model_dump(), "unet": unet.model_dump(), "channels_last": fast}
    )
    net = build_unet(model).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = 16 if net.image_size <= 64 else 4
    kw = batch_for(net, batch, text_dim, tokens, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        train_step(net, opt, kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(net, opt, kw)
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    del net, opt
    torch.cuda.empty_cache()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--text-dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (cores here: 2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                one_cpu(args.one, args.batch, args.steps, args.text_dim, args.tokens, args.threads)
            )
        )
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    table = Table(
        title=f"CPU training step (forward + backward + AdamW), {args.threads} threads, "
        f"batch {args.batch}, text {args.tokens}x{args.text_dim}, best of {args.steps}"
    )
    for col in ("preset", "params", "size", "step (s)", "CPU s", "ms / image", "peak RSS delta"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for name in SMALL:
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--batch", str(args.batch)]
            + ["--steps", str(args.steps), "--text-dim", str(args.text_dim)]
            + ["--tokens", str(args.tokens), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        table.add_row(
            name,
            f"{r['params'] / 1e6:.2f}M",
            f"{r['size']}",
            f"{r['step_s']:.3f}",
            f"{r['cpu_s']:.3f}",
            f"{r['ms_per_image']:.1f}",
            f"{r['peak_rss_delta_mib']:.0f} MiB",
        )
    console.print(table)

    if not torch.cuda.is_available():
        console.print("CUDA not available: paper-preset GPU throughput skipped.")
        return
    gpu = Table(title=f"{torch.cuda.get_device_name()} training images/s, bf16 autocast")
    for col in ("preset", "plain (SDPA, NCHW)", "flash-attn + channels_last"):
        gpu.add_column(col, justify="left" if col == "preset" else "right")
    for name in PAPER_PRESETS:
        rates = []
        for fast in (False, True):
            try:
                rates.append(f"{cuda_images_per_s(name, fast, 5, 1024, 128):.1f}")
            except torch.cuda.OutOfMemoryError:
                rates.append("OOM")
                torch.cuda.empty_cache()
        gpu.add_row(name, *rates)
    console.print(gpu)


if __name__ == "__main__":
    main()
