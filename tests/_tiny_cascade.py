"""Tiny real cascades for the cascade, evaluate and registry tests (random weights, seconds).

The stages keep the real 3-stage structure at toy sizes: base 16 px -> SR 32 px -> SR 64 px,
each a real UNet built from config and saved as a real stage model file, with the embedded
T5 text encoder built at d_model 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _train_data import TINY_BASE_UNET, TINY_SR_UNET, TINY_TEXT

from imagen.checkpoint import save_stage
from imagen.config import Params, deep_merge, resolve_params
from imagen.nn import build_unet
from imagen.text import build_default_encoder


def tiny_raw(tmp: Path) -> dict[str, Any]:
    """A params mapping (as params.yaml would give) for a toy cascade rooted at ``tmp``."""
    return {
        "seed": 0,
        "model": {"conditioning": {**TINY_TEXT, "encoder_path": str(tmp / "encoder")}},
        "stages": {
            "base64": {
                "resolution": 16,
                "model": {
                    "unet_type": "base",
                    "unet": TINY_BASE_UNET,
                },
                "sampling": {"sampler": "euler", "steps": 3, "guidance_scale": 2.0},
            },
            "sr256": {
                "resolution": 32,
                "lowres": 16,
                "model": {
                    "unet_type": "sr",
                    "unet": {**TINY_SR_UNET, "image_size": 32},
                    "noise_cond_aug": True,  # NeMo's EDM augmentation
                },
                "sampling": {"sampler": "euler", "steps": 2, "guidance_scale": 1.0},
            },
            "sr1024": {
                "resolution": 64,
                "lowres": 32,
                "model": {
                    "unet_type": "sr",
                    "unet": {**TINY_SR_UNET, "image_size": 32},
                    "noise_cond_aug": True,  # NeMo's EDM augmentation
                },
                "sampling": {"sampler": "euler", "steps": 2, "guidance_scale": 1.0},
            },
        },
        "evaluate": {"reports_dir": str(tmp / "reports")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test"},
        "models_dir": str(tmp / "models"),
    }


def make_tiny_cascade(
    tmp: Path, stages: tuple[str, ...] = ("base64", "sr256", "sr1024"), **overrides: Any
) -> Params:
    """Write random-weight stage model files and the text encoder under ``tmp``; the Params."""
    params = resolve_params(deep_merge(tiny_raw(tmp), overrides))
    build_default_encoder(params.conditioning, tmp / "encoder")
    for i, name in enumerate(stages):
        stage = params.stages[name]
        torch.manual_seed(100 + i)
        net = build_unet(stage.model)
        with torch.no_grad():  # wake the zero-initialised layers so text and guidance matter
            for param in net.parameters():
                if param.ndim > 1 and not param.any():
                    param.normal_(0.0, 0.05)
        save_stage(Path(params.models_dir) / name, stage, net.state_dict(), step=1)
    return params


def write_params_yaml(params_raw: dict[str, Any], path: Path) -> Path:
    """The params mapping as a params.yaml file (for the CLI)."""
    import yaml

    path.write_text(yaml.safe_dump(params_raw, sort_keys=False))
    return path
