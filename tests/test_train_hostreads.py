"""No host reads in a training step: the real ``imagen train`` loop (``train_stage``, its
callbacks and trainer, toy sizes) reads nothing from the device between log steps.

A host read is ``aten._local_scalar_dense`` (behind ``.item()``, ``float()``, ``bool()``) or
``aten.is_nonzero``; on a GPU each one waits for every queued kernel. A dispatch mode counts
them by the optimiser step in progress.
"""

from __future__ import annotations

import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import yaml
from host_reads import READ_OPS
from pytorch_lightning.callbacks import Callback
from tiny import make_project
from torch.utils._python_dispatch import TorchDispatchMode

from imagen.config import Params, deep_merge, resolve_params
from imagen.train import stage as stage_mod

READS = READ_OPS


class StepReads(TorchDispatchMode):
    """Counts host reads, keyed by the optimiser step in progress (``step``, set by
    :class:`StepMarker`); keeps where each came from (the innermost imagen/lightning frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.counts: Counter[int] = Counter()
        self.where: dict[int, Counter[str]] = defaultdict(Counter)
        self.loader: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in READS:
            frames = traceback.extract_stack()
            if any("/torch/utils/data/" in f.filename for f in frames):
                # the data pipeline's own CPU tensors (in its worker processes when
                # num_workers > 0): not a read from the training device
                self.loader[self.step] += 1
            else:
                self.counts[self.step] += 1
                self.where[self.step][_origin(frames)] += 1
        return func(*args, **(kwargs or {}))


def _origin(stack: traceback.StackSummary) -> str:
    frames = [f for f in stack[:-2] if "/torch/utils/" not in f.filename]
    for f in reversed(frames):
        if "/imagen/" in f.filename or "pytorch_lightning" in f.filename:
            return f"{Path(f.filename).name}:{f.lineno} {f.name}"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"


class StepMarker(Callback):
    """Tells the counter which optimiser step runs (reads in a step's end hooks count there)."""

    def __init__(self, mode: StepReads) -> None:
        self.mode = mode

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mode.step = trainer.global_step + 1

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mode.step = -1  # the end of training (final checkpoint, metrics)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny project (real shards of both stages) for the runs below."""
    root = tmp_path_factory.mktemp("reads")
    make_project(root)
    return root


def params_with(root: Path, stage: str, model: dict | None = None, **trainer: Any) -> Params:
    """The project's params with ``stages.<stage>.trainer`` keys (and ``model``) replaced."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    over = {"trainer": trainer, "model": model or {}}
    return resolve_params(deep_merge(raw, {"stages": {stage: over}}))


def _count(root: Path, stage: str, steps: int, every: int, monkeypatch) -> StepReads:
    # the base stage with fused attention on the flash (SDPA) path, the SR stage as it is
    fused = {"unet": {"attention_type": "fused", "flash_attention": True}}
    model = fused if stage == "base64" else {}
    params = params_with(root, stage, model, max_steps=steps, log_every_n_steps=every,
                         checkpoint_every_n_steps=every, sample_every_n_steps=10**6,
                         progress_seconds=3600.0, batch_size=2)  # fmt: skip
    monkeypatch.chdir(root)
    mode = StepReads()
    original = stage_mod._callbacks

    def with_marker(*args: Any, **kwargs: Any) -> Any:
        progress, callbacks = original(*args, **kwargs)
        return progress, [*callbacks, StepMarker(mode)]

    monkeypatch.setattr(stage_mod, "_callbacks", with_marker)
    with mode:
        stage_mod.train_stage(params, stage, root / "models" / f"reads-{stage}")
    return mode


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_no_host_reads_between_log_steps(project: Path, stage: str, monkeypatch) -> None:
    steps, every = 8, 4
    mode = _count(project, stage, steps, every, monkeypatch)
    ordinary = {s: n for s, n in mode.counts.items() if 0 < s <= steps and s % every}
    report = {s: dict(mode.where[s]) for s in sorted(mode.where) if s > 0}
    print(f"{stage}: reads by step {dict(sorted(mode.counts.items()))}\n{report}")
    print(f"{stage}: data-loader reads on its CPU tensors by step {dict(mode.loader)}")
    assert not ordinary, f"host reads in steps between log steps: {report}"
