"""Precache across processes: the rank and world size from torchrun or SLURM, the device,
and rank 0 waiting for the other ranks' reports (files under ``<encoded_dir>/.ranks/``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from imagen.config import ConfigError
from imagen.data.storage import Store
from imagen.text import default_device


def world_from_env() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's ``RANK`` / ``WORLD_SIZE``, or SLURM's
    ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` (a task of ``srun``); else (0, 1)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if not os.environ.get(w):
            continue
        try:
            rank, world = int(os.environ.get(r, "0")), int(os.environ[w])
        except ValueError as e:
            raise ConfigError(f"{r} / {w}: not integers ({e})") from e
        if not 0 <= rank < world:
            raise ConfigError(f"{r}: {rank} is not a rank of {w} {world}")
        return rank, world
    return 0, 1


def resolve_device(name: str | None) -> torch.device:
    """``--device``: auto (None) is CUDA when present, else the CPU; a bare ``cuda`` is the
    local rank's GPU under torchrun / srun. A device this machine lacks is a ConfigError."""
    if name in (None, "auto"):
        return torch.device(default_device())
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"precache --device: {name!r} is not a torch device ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"precache --device: {name!r}, but no CUDA device is visible")
        if dev.index is None:
            dev = torch.device(default_device())
    return dev


def ranks_dir(out: Store) -> Store:
    """Where the ranks of one launch report their shards to rank 0 (removed after it)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run and os.environ.get("SLURM_JOB_ID"):
        run = f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return out.sub(".ranks").sub(run or "run")


def wait_for_ranks(out: Store, world: int, log: Callable[[str], Any]) -> dict[str, Any]:
    """Rank 0: the shard entries of every other rank of this launch, once each has reported."""
    folder = ranks_dir(out)
    files = [f"rank-{r}.json" for r in range(1, world)]
    if not all(folder.exists(f) for f in files):
        log(f"precache rank 0/{world}: waiting for the other ranks to finish their shards")
    while not all(folder.exists(f) for f in files):
        time.sleep(0.5)
    done: dict[str, Any] = {}
    for f in files:
        done.update(folder.read_json(f))
    folder.remove_all()
    if not out.sub(".ranks").list():
        out.sub(".ranks").remove_all()
    return done
