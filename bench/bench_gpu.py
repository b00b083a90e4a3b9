"""GPU training benchmark of the paper UNets, the project's beside NeMo's own modules.

For 500m_res_64 and 600m_res_256 at the micro-batch sizes of NeMo's configs (128 and 64;
128 text tokens of 1024 dims, half of them padding), one training step (forward, backward,
AdamW) is timed with bf16 autocast, flash attention, channels_last and torch.compile all on,
then with each of them off in turn, and all off. Printed per row: images/s, model-FLOPs
utilisation (FLOPs of one step counted with torch.utils.flop_counter, against the bf16 matmul
rate this device measures on an 8192^3 product), peak memory. NeMo's modules (nemo_toolkit
2.4.0, through tests/nemo_oracle) run the same steps where they can (their flash attention
needs flash-attn installed; without it NeMo runs its masked kernel). Each training row also
counts the host reads of one step (imagen.nn.host_reads: every value the host reads from the
device, a stall of the GPU's queue).

Then sampling: each stage of the cascade (base64 500m_res_64 at 64 px, sr256 600m_res_256 at
256 px from 64, sr1024 400m_res_1024 at 1024 px from 256) samples a batch at NeMo's inference
step counts and guidance (30 / 20 / 20 steps, its EDM Heun sampler: two network evaluations a
step, each with and without the text) in bf16 autocast, as ``sample.precision: auto`` runs on
CUDA; printed per stage: images/s and seconds per batch.

    python bench/bench_gpu.py                 # one GPU, <= 8 minutes
    python bench/bench_gpu.py --tiny          # tiny models on the CPU (what the tests run)
    python bench/bench_gpu.py --json out.json # also write the rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from imagen.config import SamplingConfig  # noqa: E402
from imagen.config.run import NEMO_INFERENCE  # noqa: E402
from imagen.nemo.convert import model_config_from_nemo  # noqa: E402
from imagen.nn import build_unet, count_parameters  # noqa: E402
from imagen.nn.host_reads import HostReads  # noqa: E402
from imagen.presets import PRESETS  # noqa: E402

# (preset, NeMo's micro_batch_size)
GPU_CASES: tuple[tuple[str, int], ...] = (("500m_res_64", 128), ("600m_res_256", 64))
TEXT_DIM, TOKENS = 1024, 128
# stage -> (preset, output size, low-res input size, images a batch)
SAMPLE_CASES: dict[str, tuple[str, int, int | None, int]] = {
    "base64": ("500m_res_64", 64, None, 16),
    "sr256": ("600m_res_256", 256, 64, 8),
    "sr1024": ("400m_res_1024", 1024, 256, 2),
}
TINY_BLOCKS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_base": (
        "base",
        dict(
            embed_dim=32,
            image_size=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[8],
            per_head_channels=16,
            cond_dim=32,
            learned_sinu_pos_emb_dim=0,
            attention_type="fused",
        ),
    ),
    "tiny_sr": (
        "sr",
        dict(
            embed_dim=32,
            image_size=16,
            channel_mult=[1, 2],
            num_resblocks=[1, 1],
            atnn_enabled_at=[0, 1],
            per_head_channels=16,
            learned_sinu_pos_emb_dim=0,
            attention_type="fused",
            skip_connection_scaling=True,
        ),
    ),
}


@dataclass
class Row:
    impl: str
    model: str
    batch: int
    bf16: bool
    flash: bool
    channels_last: bool
    compile: bool
    images_per_s: float
    tflop_per_step: float
    mfu: float
    peak_mem_gib: float
    note: str = ""
    host_reads: int = -1  # per training step (forward, backward, AdamW); -1: not counted


@dataclass
class SampleRow:
    stage: str
    model: str
    size: int
    batch: int
    steps: int
    sampler: str
    bf16: bool
    images_per_s: float
    seconds_per_batch: float
    note: str = ""


def row_of(impl: str, model: str, batch: int, v: dict[str, bool], *measured: float | str) -> Row:
    """A table row: the variant's four switches, then images/s, TFLOP, MFU, peak GiB, note."""
    switches = (v["bf16"], v["flash"], v["channels_last"], v["compile"])
    return Row(impl, model, batch, *switches, *measured)


def variants(tiny: bool) -> list[dict[str, bool]]:
    """All on, all off, then each switch off in turn (the most telling rows first)."""
    on = dict(bf16=True, flash=True, channels_last=True, compile=not tiny)
    off = {k: False for k in on}
    if tiny:
        return [off, on]
    return [on, off] + [{**on, k: False} for k in on]


def measure_matmul_tflops(device: torch.device) -> float:
    """bf16 matmul rate of this device (TFLOP/s) on an n^3 product; CPU: fp32 at n = 512."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(
    unet_type: str,
    block: dict,
    batch: int,
    text_dim: int,
    tokens: int,
    aug: bool,
    device: torch.device,
) -> dict:
    """NeMo-style keyword inputs: x, time, text_embed, text_mask, [x_low_res, time_low_res]."""
    s = block["image_size"]
    kw = {
        "x": torch.randn(batch, 3, s, s, device=device),
        "time": torch.randn(batch, device=device),
        "text_embed": torch.randn(batch, tokens, text_dim, device=device),
        "text_mask": torch.arange(tokens, device=device)[None].expand(batch, -1) < tokens // 2,
    }
    if unet_type != "base":
        kw["x_low_res"] = torch.randn(batch, 3, s // 4, s // 4, device=device)
    if aug:
        kw["time_low_res"] = torch.randn(batch, device=device)
    return kw


def build(
    impl: str,
    unet_type: str,
    block: dict,
    aug: bool,
    v: dict,
    text_dim: int,
    device: torch.device,
) -> tuple[torch.nn.Module, Any]:
    """(module, step_fn(kw) -> loss) for the project's UNet or NeMo's."""
    if impl == "project":
        cfg = model_config_from_nemo(
            {
                "unet_type": unet_type,
                "unet": block,
                "conditioning": {"embed_dim": text_dim},
                "preconditioning_type": "EDM",
                "noise_cond_aug": aug,
            }
        )
        cfg = cfg.model_copy(
            update={
                "channels_last": v["channels_last"],
                "unet": cfg.unet.model_copy(update={"flash_attention": v["flash"]}),
            }
        )
        net = build_unet(cfg).to(device)

        def call(kw: dict) -> torch.Tensor:
            extra = {}
            if "x_low_res" in kw:
                extra["lowres"] = kw["x_low_res"]
            if "time_low_res" in kw:
                extra["aug_level"] = kw["time_low_res"]
            return net(
                kw["x"], kw["time"], text_embed=kw["text_embed"], text_mask=kw["text_mask"], **extra
            )
    else:
        import nemo_oracle

        nemo = nemo_oracle.load()
        flash = v["flash"] and device.type == "cuda" and _has_flash_attn()
        blk = dict(block, flash_attention=flash, stable_attention=not flash)
        if unet_type == "sr":
            net = nemo.EfficientUNetModel(**blk, text_embed_dim=text_dim, noise_cond_aug=aug)
        else:
            net = nemo.UNetModel(
                **blk,
                text_embed_dim=text_dim,
                noise_cond_aug=aug,
                low_res_cond=unet_type == "sr-unet",
            )
        net = net.to(device)
        if v["channels_last"]:
            net = net.to(memory_format=torch.channels_last)

        def call(kw: dict) -> torch.Tensor:
            return net(**kw)

    if v["compile"]:
        call = torch.compile(call)
    return net, call


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(
    impl: str,
    name: str,
    unet_type: str,
    block: dict,
    aug: bool,
    batch: int,
    v: dict,
    peak_tflops: float,
    device: torch.device,
    steps: int,
    text_dim: int,
    tokens: int,
) -> Row:
    torch.manual_seed(0)
    net, call = build(impl, unet_type, block, aug, v, text_dim, device)
    # fused: one kernel over all tensors, no host read of each step count (the project trains
    # with it; the per-tensor loop reads every parameter's step)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    kw = inputs(unet_type, block, batch, text_dim, tokens, aug, device)
    if v["channels_last"]:
        kw["x"] = kw["x"].contiguous(memory_format=torch.channels_last)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if v["bf16"] else contextlib.nullcontext()
    )

    def step() -> None:
        with amp:
            loss = (call(kw).float() - kw["x"].float()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    step()  # warm-up (and compilation)
    counter = FlopCounterMode(display=False)
    with counter, HostReads() as reads:
        step()
    flops = counter.get_total_flops()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    note = f"{count_parameters(net) / 1e6:.1f}M params"
    mfu = flops / dt / 1e12 / peak_tflops
    row = row_of(impl, name, batch, v, batch / dt, flops / 1e12, mfu, peak, note)
    row.host_reads = reads.count
    return row


def sample_case(
    stage: str,
    preset: str,
    block: dict,
    unet_type: str,
    aug: bool,
    size: int,
    low: int | None,
    batch: int,
    steps: int,
    device: torch.device,
    text_dim: int,
    tokens: int,
) -> SampleRow:
    """One batch of ``stage`` sampled at NeMo's steps and guidance in bf16 autocast (random
    weights: the cost does not depend on them), after a one-step warm-up."""
    from imagen.diffusion import build_denoiser, sample
    from imagen.diffusion.noise_aug import sr_condition

    torch.manual_seed(0)
    cfg = model_config_from_nemo(
        {
            "unet_type": unet_type,
            "unet": block,
            "conditioning": {"embed_dim": text_dim},
            "preconditioning_type": "EDM",
            "noise_cond_aug": aug,
        }
    )
    den = build_denoiser(cfg, build_unet(cfg).to(device)).eval()
    kw = inputs("base", {"image_size": size}, batch, text_dim, tokens, False, device)
    cond: dict[str, Any] = {"text_embed": kw["text_embed"], "text_mask": kw["text_mask"]}
    if low is not None:
        lowres = torch.rand(batch, 3, low, low, device=device) * 2 - 1
        cond.update(sr_condition(lowres, cfg, training=False))
    n_steps, scale = NEMO_INFERENCE[stage]
    n_steps = steps or n_steps
    sampling = SamplingConfig(sampler="heun", steps=n_steps, guidance_scale=scale)
    shape = (batch, 3, size, size)

    def run(config: SamplingConfig) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            sample(den, shape, cond, config, seed=0)

    run(sampling.model_copy(update={"steps": 1}))  # warm-up: kernels, allocator
    _sync(device)
    t = time.perf_counter()
    run(sampling)
    _sync(device)
    dt = time.perf_counter() - t
    note = f"{count_parameters(den.net) / 1e6:.1f}M params, guidance {scale}"
    return SampleRow(stage, preset, size, batch, n_steps, "heun", True, batch / dt, dt, note)


def sampling_rows(args: argparse.Namespace, device: torch.device, start: float) -> list[SampleRow]:
    """Sampling images/s per stage (tiny: the tiny blocks at 16 px, 2 steps)."""
    rows: list[SampleRow] = []
    for stage, (preset, size, low, batch) in SAMPLE_CASES.items():
        if args.tiny:
            unet_type = "base" if stage == "base64" else "sr"
            block = TINY_BLOCKS["tiny_base" if stage == "base64" else "tiny_sr"][1]
            size, low, batch = 16, None if stage == "base64" else 4, 2
            name, aug, text_dim, tokens, steps = f"tiny_{stage}", stage != "base64", 32, 8, 2
        else:
            p = PRESETS[preset]
            unet_type, block, name, steps = p["unet_type"], p["unet"], preset, args.sample_steps
            aug, text_dim, tokens = bool(p.get("noise_cond_aug")), TEXT_DIM, TOKENS
        if time.perf_counter() - start > args.budget_s:
            print(f"sampling {stage}: skipped (time budget {args.budget_s:.0f} s)")
            continue
        try:
            row = sample_case(
                stage, name, block, unet_type, aug, size, low, batch, steps, device, text_dim,
                tokens,
            )  # fmt: skip
        except Exception as e:  # a stage this device cannot sample (memory): say so, go on
            row = SampleRow(stage, name, size, batch, 0, "heun", True, 0.0, 0.0,
                            f"failed: {type(e).__name__}: {str(e)[:80]}")  # fmt: skip
        rows.append(row)
        print(
            f"sample   {row.stage:7s} {row.model:14s} {row.size:5d} px b={row.batch:<3d} "
            f"{row.steps:3d} steps bf16  {row.images_per_s:9.2f} img/s  "
            f"{row.seconds_per_batch:7.2f} s/batch  {row.note}",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> tuple[list[Row], list[SampleRow]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-nemo", action="store_true", help="skip NeMo's modules")
    ap.add_argument(
        "--budget-s", type=float, default=450, help="skip rows once this much time has gone"
    )
    ap.add_argument(
        "--sample-steps", type=int, default=0, help="sampling steps per stage (0: NeMo's)"
    )
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampling rows")
    ap.add_argument("--no-training", action="store_true", help="skip the training rows")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # NeMo's allow_tf32: True
    elif not args.tiny:
        print("no CUDA device: running the tiny CPU version (--tiny)")
        args.tiny = True
    steps = args.steps or (1 if args.tiny else 5)
    if args.tiny:
        cases = [(n, t, b, t != "base", 2) for n, (t, b) in TINY_BLOCKS.items()]
        text_dim, tokens = 32, 8
    else:
        cases = [
            (
                n,
                PRESETS[n]["unet_type"],
                PRESETS[n]["unet"],
                bool(PRESETS[n].get("noise_cond_aug")),
                mb,
            )
            for n, mb in GPU_CASES
        ]
        text_dim, tokens = TEXT_DIM, TOKENS
    impls = ["project"]
    if not args.no_nemo:
        try:
            import nemo_oracle

            nemo_oracle.load()
            impls.append("nemo")
        except ImportError as e:
            print(f"NeMo's modules skipped: {e}")
    peak = measure_matmul_tflops(device)
    print(
        f"device {device}: measured matmul rate {peak:.3g} TFLOP/s "
        f"({'bf16' if device.type == 'cuda' else 'fp32'})"
    )
    rows: list[Row] = []
    start = time.perf_counter()
    for v in [] if args.no_training else variants(args.tiny):
        for name, unet_type, block, aug, batch in cases:
            for impl in impls:
                if time.perf_counter() - start > args.budget_s:
                    print(f"{impl} {name} {v}: skipped (time budget {args.budget_s:.0f} s)")
                    continue
                try:
                    row = run_case(
                        impl,
                        name,
                        unet_type,
                        block,
                        aug,
                        batch,
                        v,
                        peak,
                        device,
                        steps,
                        text_dim,
                        tokens,
                    )
                except Exception as e:  # a variant a stack cannot run: say so, go on
                    failed = f"failed: {type(e).__name__}"
                    row = row_of(impl, name, batch, v, 0.0, 0.0, 0.0, 0.0, failed)
                rows.append(row)
                print(
                    f"{row.impl:8s} {row.model:14s} b={row.batch:<4d} "
                    f"bf16={row.bf16:d} flash={row.flash:d} cl={row.channels_last:d} "
                    f"compile={row.compile:d}  {row.images_per_s:9.1f} img/s  "
                    f"MFU {row.mfu * 100:5.1f}%  {row.peak_mem_gib:6.1f} GiB  "
                    f"{row.host_reads:3d} host reads/step  {row.note}",
                    flush=True,
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    samples = [] if args.no_sampling else sampling_rows(args, device, start)
    if args.json:
        out = {"training": [asdict(r) for r in rows], "sampling": [asdict(r) for r in samples]}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return rows, samples


if __name__ == "__main__":
    main()
