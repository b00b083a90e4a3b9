"""A tiny project folder for the training tests: params.yaml with toy sizes, real shards.

The shards are written by the real ``imagen ingest`` and ``imagen precache`` commands; the
stages train toy UNets (16 px base, 32 px SR) in seconds on a 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from imagen.config import Params, deep_merge, resolve_params

REPO = Path(__file__).resolve().parents[1]
# A 1-layer T5 at d_model 32 and 16 tokens: the text features every toy test uses.
TINY_TEXT = {
    "embed_dim": 32,
    "token_length": 16,
    "encoder": {"d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64},
}
TINY_BASE_UNET = {
    "image_size": 16,
    "embed_dim": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "num_attn_heads": 2,
    "per_head_channels": 16,
    "cond_dim": 32,
}
TINY_SR_UNET = {
    "image_size": 16,
    "embed_dim": 8,
    "channel_mult": [1, 2],
    "num_resblocks": [1, 1],
    "atnn_enabled_at": [0, 1],
    "num_attn_heads": 2,
    "per_head_channels": 16,
    "cond_dim": 32,
    "attention_type": "cross",
}
TRAINER = {
    "max_steps": 30,
    "batch_size": 8,
    "num_workers": 0,
    "log_every_n_steps": 5,
    "checkpoint_every_n_steps": 10,
    "sample_every_n_steps": 1000,
    "sample_grid_size": 4,
    "shuffle_buffer": 16,
    "optim": {"lr": 2.0e-3, "warmup_steps": 5},
    "ema_decay": 0.9,
}


def tiny_raw(root: Path) -> dict[str, Any]:
    """params.yaml of the repository with toy data, encoder and UNet sizes under ``root``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = {
        "data": {
            "num_train": 32,
            "num_holdout": 8,
            "image_size": 32,
            "min_resolution": 16,
            "samples_per_shard": 8,
        },
        "model": {"conditioning": TINY_TEXT},
        "stages": {
            "base64": {
                "model": {"unet": TINY_BASE_UNET},
                "trainer": TRAINER,
                "sampling": {"sampler": "euler", "steps": 3, "guidance_scale": 2.0},
            },
            "sr256": {
                "resolution": 32,
                "lowres": 16,
                "model": {"unet": TINY_SR_UNET},
                "trainer": {**TRAINER, "batch_size": 4},
                "sampling": {"sampler": "euler", "steps": 2, "guidance_scale": 1.0},
            },
        },
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
    }
    raw = deep_merge(raw, tiny)
    raw["stages"].pop("sr1024", None)
    return raw


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IMAGEN_"))}
    e.update(IMAGEN_THREADS="1", PYTHONPATH=str(REPO))
    return e


def imagen(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``imagen`` CLI in ``root``; stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, "-m", "imagen.cli", *args],
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def make_project(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """Write params.yaml under ``root``, run ingest + precache there; the resolved Params."""
    root.mkdir(parents=True, exist_ok=True)
    raw = deep_merge(tiny_raw(root), overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["ingest", "--no-progress"], ["precache", "--no-progress"]):
        res = imagen(root, *cmd)
        assert res.returncode == 0, res.stdout[-3000:]
    return resolve_params(raw)
