"""The keeping rule (``trainer.keep``) as Lightning ``ModelCheckpoint`` callbacks.

- ``last``: ``checkpoints/last.ckpt`` every ``trainer.checkpoint_every_n_steps`` (the resume
  point; overwritten atomically);
- ``best``: every ``keep.every_n_steps`` a candidate ``step=N-settings=H.ckpt``; the best
  ``keep.top_k`` by ``keep.monitor`` are kept, a candidate pushed out of them is removed;
- ``archive``: every ``keep.archive_every_n_steps`` a ``step=N-settings=H-archive.ckpt`` kept
  for good.

No other file is ever removed (set-aside checkpoints of other settings stay until a person
deletes them). The rule is printed when training starts and tagged on the MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from imagen.config import StageConfig
from imagen.train.checkpoints import LAST_CKPT
from imagen.train.settings import settings_hash


class KeptCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` with a role (its own state key) that reports each removal."""

    def __init__(self, role: str, rule: str, **kwargs: Any) -> None:
        super().__init__(auto_insert_metric_name=False, save_on_train_epoch_end=False, **kwargs)
        self.role, self.rule = role, rule

    @property
    def state_key(self) -> str:
        return self._generate_state_key(role=self.role, monitor=self.monitor, mode=self.mode)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            print(f"imagen train: removed {filepath} ({self.rule})", file=sys.stderr, flush=True)
        super()._remove_checkpoint(trainer, filepath)


def keep_interval(stage: StageConfig) -> int:
    """Steps between candidates of the best-k rule."""
    t = stage.trainer
    return t.keep.every_n_steps or t.checkpoint_every_n_steps


def keeping_callbacks(stage: StageConfig, folder: Path) -> list[KeptCheckpoint]:
    """last, best-k and archive checkpoints of ``stage`` in ``folder`` (last first)."""
    t, k = stage.trainer, stage.trainer.keep
    name = f"step={{step:07d}}-settings={settings_hash(stage.model_dump(mode='json'))}"
    out = [
        KeptCheckpoint(
            "last", f"{LAST_CKPT} is replaced", dirpath=folder,
            every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=0, save_last=True,
            enable_version_counter=False,
        )
    ]  # fmt: skip
    if k.top_k > 0:
        out.append(
            KeptCheckpoint(
                "best", f"not among the best {k.top_k} by {k.monitor} ({k.mode})",
                dirpath=folder, filename=name, monitor=k.monitor, mode=k.mode,
                save_top_k=k.top_k, every_n_train_steps=keep_interval(stage),
            )
        )  # fmt: skip
    if k.archive_every_n_steps > 0:
        out.append(
            KeptCheckpoint(
                "archive", "archive", dirpath=folder, filename=name + "-archive",
                save_top_k=-1, every_n_train_steps=k.archive_every_n_steps,
            )
        )  # fmt: skip
    return out


def keeping_rule(stage: StageConfig) -> str:
    """The rule in words (printed at start, tagged ``imagen.keep_rule`` on the MLflow run)."""
    t, k = stage.trainer, stage.trainer.keep
    parts = [f"last.ckpt every {t.checkpoint_every_n_steps} steps"]
    if k.top_k > 0:
        parts.append(
            f"the best {k.top_k} by {k.monitor} ({k.mode}) of checkpoints every "
            f"{keep_interval(stage)} steps"
        )
    if k.archive_every_n_steps > 0:
        parts.append(f"every {k.archive_every_n_steps}th step for good")
    return "keeping " + ", ".join(parts) + "; nothing else is removed"
