"""Training throughput (images/s) and peak memory of each stage, against published figures.

On the CPU it measures every stage of params.yaml at its configured (small) preset and batch
size. With CUDA it also measures the paper presets with bf16 / flash attention / channels_last
switched on and off, next to the published A100-80G figures (REFERENCE.md: base 500M 107
img/s, base 2B 27.4, SR 600M Efficient UNet 84.3, bf16, per GPU).

    .venv/bin/python bench/bench_train.py [--steps 6] [--paper]

Each measurement runs real Lightning training steps (AdamW, clipping, EMA) on synthetic batches
of the stage's shapes; the first steps are warm-up and not timed. On a shared CPU the wall-clock
rate depends on other load, so the CPU time per image is printed too.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytorch_lightning import Callback  # noqa: E402

from imagen.config import StageConfig, load_params, resolve_params  # noqa: E402
from imagen.nn import count_parameters  # noqa: E402
from imagen.train import ImagenStage, build_trainer  # noqa: E402

PUBLISHED = {"500m_res_64": 107.0, "2b_res_64": 27.4, "600m_res_256": 84.3}


class _Timer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.c0, self.images = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, idx) -> None:
        if trainer.global_step == self.warmup and not self.t0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx) -> None:
        if self.t0:
            self.images += batch["image"].shape[0]

    def result(self) -> tuple[float, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return self.images / wall, cpu / max(self.images, 1)


def synthetic(stage: StageConfig, n: int, device: str) -> list[dict[str, Any]]:
    b, s = stage.trainer.batch_size, stage.model.unet.image_size
    c = stage.model.conditioning
    out = []
    for _ in range(n):
        x = {
            "image": torch.rand(b, 3, s, s) * 2 - 1,
            "text_embed": torch.randn(b, c.token_length, c.embed_dim),
            "text_mask": torch.ones(b, c.token_length, dtype=torch.bool),
        }
        if stage.model.is_sr:
            low = s * stage.lowres // stage.resolution
            x["lowres"] = torch.rand(b, 3, low, low) * 2 - 1
        out.append(x)
    return out


def measure(stage: StageConfig, steps: int, warmup: int = 2) -> dict[str, float]:
    timer = _Timer(warmup)
    module = ImagenStage(stage)
    stage = stage.model_copy(deep=True)
    stage.trainer.max_steps = steps + warmup
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "imagen-bench"
    trainer = build_trainer(stage, out, [timer], logger=False)
    trainer.checkpoint_callback.save_last = False  # no disk writes in the timing
    trainer._enable_checkpointing = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = torch.utils.data.DataLoader(synthetic(stage, steps + warmup, device), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    ips, cpu_per_img = timer.result()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = count_parameters(module.net) / 1e6
    del module, trainer
    gc.collect()
    return {"img_s": ips, "cpu_s_per_img": cpu_per_img, "peak_gib": peak, "params_m": params}


def paper_stage(preset: str, flags: dict[str, Any], batch: int) -> StageConfig:
    name = "base64" if preset.endswith("_64") else "sr256"
    raw = {
        "model": {"conditioning": {"embed_dim": 1024, "token_length": 128}},
        "stages": {
            name: {
                "model": {
                    "preset": preset,
                    "channels_last": flags["channels_last"],
                    "unet": {"flash_attention": flags["flash"]},
                },
                "trainer": {
                    "batch_size": batch,
                    "precision": "bf16" if flags["bf16"] else "32",
                    "accelerator": "gpu",
                    "num_workers": 0,
                },
            }
        },
    }
    if name == "sr256":
        raw["stages"][name]["model"]["unet"]["image_size"] = 256
    return resolve_params(raw).stage(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--paper", action="store_true", help="paper presets (needs CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    params = load_params(
        args.params, ["trainer.accelerator=cpu"] if not torch.cuda.is_available() else None
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
    )
    print(
        f"{'stage':8} {'preset':16} {'params':>8} {'batch':>5} {'img/s':>8} "
        f"{'cpu s/img':>9} {'peak GiB':>8}"
    )
    for name, stage in params.stages.items():
        stage = stage.model_copy(deep=True)
        stage.trainer.num_workers = 0
        r = measure(stage, args.steps)
        print(
            f"{name:8} {stage.model.preset or '-':16} {r['params_m']:7.2f}M "
            f"{stage.trainer.batch_size:5d} {r['img_s']:8.2f} {r['cpu_s_per_img']:9.3f} "
            f"{r['peak_gib']:8.2f}",
            flush=True,
        )
    if not (args.paper or torch.cuda.is_available()):
        return
    if not torch.cuda.is_available():
        print("--paper needs a CUDA device; skipped")
        return
    print("\npaper presets on", torch.cuda.get_device_name(), "(published: A100-80G, bf16)")
    variants = {
        "fp32": {"bf16": False, "flash": False, "channels_last": False},
        "bf16": {"bf16": True, "flash": False, "channels_last": False},
        "bf16+flash": {"bf16": True, "flash": True, "channels_last": False},
        "bf16+flash+cl": {"bf16": True, "flash": True, "channels_last": True},
    }
    for preset, batch in (("500m_res_64", 32), ("2b_res_64", 16), ("600m_res_256", 16)):
        for label, flags in variants.items():
            try:
                r = measure(paper_stage(preset, flags, batch), args.steps)
            except torch.OutOfMemoryError:
                print(f"{preset:14} {label:14} out of memory at batch {batch}")
                torch.cuda.empty_cache()
                continue
            print(
                f"{preset:14} {label:14} {r['params_m']:7.1f}M img/s {r['img_s']:7.1f} "
                f"(published {PUBLISHED[preset]}) peak {r['peak_gib']:.1f} GiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
