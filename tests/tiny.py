"""The one way a test gets a project: the real params.yaml, shrunk to toy sizes.

:func:`shrink` merges :data:`TOY` (a 1-layer T5 at d_model 32, UNets of a few thousand
parameters, a 16 px base stage, 32 and 64 px SR stages, a few dozen embedded samples) over the
repository's params.yaml, so every test follows the real layout and keys. Three ways to use it:

- :func:`make_project`: a project folder with params.yaml and real shards, written by the real
  ``imagen ingest`` and ``imagen precache`` commands (training, DDP and fault tests);
- :func:`make_tiny_cascade`: random-weight stage model files and the text encoder (cascade,
  evaluate and registry tests);
- :func:`copy_project`: a throw-away git copy of the repository (pipeline and Prefect tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from imagen.cli import OFFLINE_ENV
from imagen.config import Params, deep_merge, resolve_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# This test process's share of the (at most 2) cores: pytest-xdist workers split them
CORES = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))

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
    "progressive": None,
}
EULER = {"sampler": "euler", "steps": 2, "guidance_scale": 1.0}
TOY: dict[str, Any] = {
    "data": {
        "num_train": 32,
        "num_holdout": 8,
        "image_size": 64,
        "min_resolution": 16,
        "samples_per_shard": 8,
        "pyramid": [16, 32],
    },
    "model": {"conditioning": TINY_TEXT},
    "stages": {
        "base64": {
            "model": {"unet": TINY_BASE_UNET},
            "trainer": TRAINER,
            "sampling": {**EULER, "steps": 3, "guidance_scale": 2.0},
        },
        "sr256": {
            "resolution": 32,
            "lowres": 16,
            "model": {"unet": TINY_SR_UNET},
            "trainer": {**TRAINER, "batch_size": 4},
            "sampling": EULER,
        },
        "sr1024": {
            "resolution": 64,
            "lowres": 32,
            "model": {"unet": TINY_SR_UNET},
            "trainer": {**TRAINER, "batch_size": 2},
            "sampling": EULER,
        },
    },
    "evaluate": {
        "guidance_scales": [1, 3],
        "num_images": 4,
        "batch_size": 4,
        "steps": 2,
        "grid_images": 4,
        "cascade_prompts": 2,
        "cascade_steps": 1,
        "sr_pairs": 2,
        "sr_tiles": 0,
    },
    "evaluator": {"steps": 20, "batch_size": 8, "resolution": 16, "width": 8, "quality_pairs": 8},
    # the toy base UNet is 16 px: own_data's 16 px phase cannot fit it (its noise levels do);
    # the block is checked against the stages even for the embedded data
    "own_data": {"stages": {"base64": {"trainer": {"progressive": None}}}},
}
# What the whole-pipeline tests train: two steps a stage, a checkpoint after each.
FAST_STAGES = {
    "stages": {
        s: {"trainer": {"max_steps": 2, "checkpoint_every_n_steps": 1}}
        for s in ("base64", "sr256", "sr1024")
    }
}


def shrink(
    root: Path | None = None,
    overrides: dict[str, Any] | None = None,
    stages: tuple[str, ...] = ("base64", "sr256", "sr1024"),
) -> dict[str, Any]:
    """The repository's params.yaml with :data:`TOY` and ``overrides`` merged over it.

    With ``root`` every output path (shards, encoder, models, reports, the MLflow database and
    experiment "test") is absolute under it, for tests that run stages in-process; without,
    paths stay relative, as a project folder's commands expect.
    """
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TOY)
    # the toy step counts stand for own_data's too (its base stage's are a real folder's)
    for stage in (raw.get("own_data") or {}).get("stages", {}).values():
        (stage.get("trainer") or {}).pop("max_steps", None)
    if root is not None:
        raw = deep_merge(
            raw,
            {
                "data": {
                    "shards_dir": str(root / "data/shards"),
                    "encoded_dir": str(root / "data/encoded"),
                },
                "model": {"conditioning": {"encoder_path": str(root / "data/encoder")}},
                "evaluate": {"reports_dir": str(root / "reports")},
                "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
                "models_dir": str(root / "models"),
            },
        )
    raw = deep_merge(raw, overrides or {})
    raw["stages"] = {k: v for k, v in raw["stages"].items() if k in stages}
    return raw


def write_params(raw: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def env(root: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for the project's commands: this venv first on PATH, ``root``'s code (else
    the repository's) on PYTHONPATH, the offline switches, no inherited MLflow or imagen run."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IMAGEN_"))}
    e.pop("PREFECT_API_URL", None)
    e.update(OFFLINE_ENV)
    e.update(
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        PYTHONPATH=str(root if root is not None else REPO),
        IMAGEN_THREADS="1" if root is None else str(CORES),
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    e.update(extra)
    return e


def run(
    cmd: list[str], cwd: Path, timeout: float = 600, **extra: str
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` (a repository copy runs its own code); stdout and stderr merged."""
    code = cwd if (cwd / "imagen").is_dir() else None
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env(code, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def imagen(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``imagen`` CLI of this repository, run in ``root``."""
    return run([sys.executable, "-m", "imagen.cli", *args], root, timeout)


def make_project(
    root: Path,
    overrides: dict[str, Any] | None = None,
    stages: tuple[str, ...] = ("base64", "sr256"),
) -> Params:
    """params.yaml under ``root`` plus real shards from ``imagen ingest`` and ``imagen
    precache``; returns the resolved Params (its paths relative to ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    # paths relative to the project folder, as a user's params.yaml has them
    mlflow = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"}}
    raw = shrink(None, deep_merge(mlflow, overrides or {}), stages)
    write_params(raw, root / "params.yaml")
    for cmd in (["ingest", "--no-progress"], ["precache", "--no-progress"]):
        res = imagen(root, *cmd)
        assert res.returncode == 0, res.stdout[-3000:]
    return resolve_params(raw)


def make_tiny_cascade(
    root: Path,
    stages: tuple[str, ...] = ("base64", "sr256", "sr1024"),
    overrides: dict[str, Any] | None = None,
) -> Params:
    """Random-weight stage model files and the text encoder under ``root``; the Params
    (``overrides`` merged over the toy params)."""
    from imagen.checkpoint import save_stage
    from imagen.nn import build_unet
    from imagen.text import build_default_encoder

    params = resolve_params(shrink(root, overrides))
    build_default_encoder(params.conditioning, params.conditioning.encoder_path)
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


# A user's own captions: words the embedded grammar does not know, so only the trained
# evaluator can measure them (the whole-pipeline test ingests this folder).
FOLDER_THINGS = ["lighthouse", "teapot", "cactus", "bicycle", "violin", "anchor", "mushroom"]
FOLDER_LOOKS = ["striped", "dotted", "glowing", "wooden", "paper"]


def write_caption_folder(dest: Path, n: int = 40, size: int = 96) -> Path:
    """``n`` drawn pictures (PNG and JPEG) with a captions.csv of made-up subjects."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    dest.mkdir(parents=True, exist_ok=True)
    rows = ["file,caption"]
    for i in range(n):
        thing, look = FOLDER_THINGS[i % len(FOLDER_THINGS)], FOLDER_LOOKS[i % len(FOLDER_LOOKS)]
        img = Image.new("RGB", (size, size), tuple(rng.randrange(150, 256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        k = FOLDER_THINGS.index(thing)
        box = (10 + 3 * k, 12, size - 10 - 2 * k, size - 12 - 4 * k)
        fill = tuple(rng.randrange(0, 120) for _ in range(3))
        (draw.ellipse if k % 2 else draw.rectangle)(box, fill=fill)
        name = f"{thing}_{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(dest / name)
        rows.append(f"{name},a {look} {thing} on a plain background")
    (dest / "captions.csv").write_text("\n".join(rows) + "\n")
    return dest


def copy_project(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The repository's tracked and untracked (not ignored) files copied to ``dest``, with
    shrunk params and one git commit (DVC experiments and the runs' commit tag need one)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    write_params(shrink(None, deep_merge(FAST_STAGES, overrides or {})), dest / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, env=env(dest), check=True, capture_output=True)
    return dest
