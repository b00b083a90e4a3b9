"""Sampling speed of the cascade: time per image per stage, sampler and step count.

Builds every stage of params.yaml (the small presets by default) with random weights (speed
does not depend on the weights) and the real T5 text encoder, then times real sampling runs:

- per stage, for each sampler and step count: seconds per image and per network evaluation
  (NFE, counted with a forward hook; classifier-free guidance runs the conditional and
  unconditional halves as one batch of 2B, counted once);
- the whole cascade (64 -> 256 -> 1024) at the measured step counts, and projected to each
  stage's configured sampler and steps (``stages.<name>.sampling``) from the measured time
  per evaluation.

On the CPU the step counts are small so the run fits in about 3 minutes on 2 cores; with CUDA
the same grid plus the configured step counts run on the GPU as well.

    python bench/bench_cascade.py [--params params.yaml] [--batch 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagen.config import STAGES, load_params  # noqa: E402
from imagen.nn import build_unet, count_parameters  # noqa: E402
from imagen.sample.cascade import Cascade  # noqa: E402
from imagen.text import build_default_encoder, load_text_encoder  # noqa: E402

# (sampler, steps) measured per stage on the CPU; a GPU adds the configured step counts.
CPU_GRID: dict[str, list[tuple[str, int]]] = {
    "base64": [("euler", 4), ("heun", 4), ("dpmpp_2m", 4), ("ddim", 4), ("euler", 8)],
    "sr256": [("euler", 2), ("heun", 2), ("dpmpp_2m", 2)],
    "sr1024": [("euler", 1), ("euler", 2)],
}
CASCADE_STEPS = {"base64": 4, "sr256": 2, "sr1024": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _counting(net: torch.nn.Module) -> list[int]:
    calls = [0]
    net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def bench(params_path: str, batch: int, device: torch.device) -> None:
    params = load_params(params_path)
    cond = params.conditioning
    with tempfile.TemporaryDirectory() as tmp:
        # The embedded T5 built in a scratch folder (the real encoder code path).
        cond = cond.model_copy(update={"encoder_path": str(Path(tmp) / "encoder")})
        if not Path(params.conditioning.encoder_path).is_dir():
            build_default_encoder(cond, cond.encoder_path)
        else:
            cond = params.conditioning
        encoder = load_text_encoder(cond, device=device)
        torch.manual_seed(0)
        nets = {name: build_unet(params.stages[name].model) for name in STAGES}
        counters = {name: _counting(net) for name, net in nets.items()}
        cascade = Cascade({n: (nets[n], params.stages[n]) for n in STAGES}, encoder, device=device)
    prompts = [f"a large red circle on the left, dark background {i}" for i in range(batch)]
    t0 = time.perf_counter()
    embeds, mask = cascade.encode(prompts)
    _sync(device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {batch}")
    print(f"text encoder: {(time.perf_counter() - t0) / batch * 1e3:.1f} ms/prompt")
    print()
    header = f"{'stage':7} {'res':>5} {'params':>7} {'sampler':9} {'steps':>5} {'NFE':>4} "
    header += f"{'guid':>5} {'s/image':>9} {'ms/NFE/img':>10}"
    print(header)
    print("-" * len(header))
    per_nfe: dict[str, float] = {}
    lowres = None
    for name in STAGES:
        stage = cascade.stages[name]
        grid = list(CPU_GRID[name])
        if device.type == "cuda":
            s = stage.config.sampling
            grid += [(s.sampler, s.steps)]
        warm = stage.sampling(steps=1, sampler="euler")
        cascade.sample_stage(name, embeds, mask, lowres, sampling=warm)  # warm-up
        out = None
        for sampler, steps in grid:
            sampling = stage.sampling(steps=steps, sampler=sampler)
            counters[name][0] = 0
            gen = torch.Generator().manual_seed(0)
            _sync(device)
            t = time.perf_counter()
            out = cascade.sample_stage(name, embeds, mask, lowres, sampling=sampling, generator=gen)
            _sync(device)
            dt = time.perf_counter() - t
            nfe = counters[name][0]
            per_nfe.setdefault(name, dt / nfe / batch)
            per_nfe[name] = min(per_nfe[name], dt / nfe / batch)
            print(
                f"{name:7} {stage.resolution:5d} {count_parameters(stage.net) / 1e6:6.1f}M "
                f"{sampler:9} {steps:5d} {nfe:4d} {sampling.guidance_scale:5.1f} "
                f"{dt / batch:9.2f} {dt / nfe / batch * 1e3:10.1f}",
                flush=True,
            )
        lowres = out
    print()
    _sync(device)
    t = time.perf_counter()
    cascade.generate(prompts, steps=CASCADE_STEPS, batch_size=batch)
    _sync(device)
    dt = time.perf_counter() - t
    steps_txt = ", ".join(
        f"{n} {cascade.stages[n].config.sampling.sampler} {k}" for n, k in CASCADE_STEPS.items()
    )
    print(f"whole cascade (measured; {steps_txt} steps): {dt / batch:.2f} s/image")
    projected = 0.0
    parts = []
    for name in STAGES:
        s = cascade.stages[name].config.sampling
        nfe = 2 * s.steps - 1 if s.sampler == "heun" else s.steps
        projected += per_nfe[name] * nfe
        parts.append(f"{name} {s.sampler} {s.steps} steps = {nfe} NFE")
    print(
        f"whole cascade (projected at the configured sampling: {'; '.join(parts)}): "
        f"{projected:.1f} s/image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=1, help="images per sampling batch")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("IMAGEN_THREADS", 2)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    with torch.no_grad():
        bench(args.params, args.batch, torch.device("cpu"))
        if torch.cuda.is_available():
            print("\n=== CUDA ===")
            bench(args.params, max(args.batch, 4), torch.device("cuda"))


if __name__ == "__main__":
    main()
