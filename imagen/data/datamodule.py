"""The Lightning data module of a training stage: :mod:`imagen.data.loader`'s streams as
train/val DataLoaders, with the batch finished on the device (padding, progressive
downsampling, online encoding, NeMo's key names). Kept apart from the loader so that
evaluating and sampling do not import Lightning.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from imagen.config import Params, StageConfig
from imagen.data.batches import (
    StageBatches,
    _as_is,
    add_nemo_keys,
    finish_batch,
    progressive_batch,
    resolve_num_workers,
)
from imagen.data.loader import OnlineEncoding, Split, make_dataset


class ImagenDataModule(pl.LightningDataModule):
    """Lightning data for one cascade stage, streamed from the (encoded) shards."""

    def __init__(
        self, params: Params, stage: StageConfig, split: Split = "train", start_step: int = 0
    ) -> None:
        super().__init__()
        self.params, self.stage, self.split, self.start_step = params, stage, split, start_step
        self.online = OnlineEncoding(params) if params.conditioning.online_encoding else None

    def setup(self, stage: str | None = None) -> None:
        # webdataset's split_by_node reads RANK / WORLD_SIZE (or torch.distributed, which
        # spawned DataLoader workers do not inherit): publish what the Trainer knows.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            os.environ.setdefault("RANK", str(trainer.global_rank))
            os.environ.setdefault("WORLD_SIZE", str(trainer.world_size))

    def _loader(self, split: Split, epochs: int | None, train: bool) -> DataLoader:
        ds = make_dataset(self.params, self.stage, split, epochs=epochs, train=train)
        fixed = None if train else self.stage.trainer.batch_size
        workers = resolve_num_workers(self.stage)
        return DataLoader(
            StageBatches(ds, self.stage, self.start_step, fixed),
            batch_size=None,  # StageBatches batches
            num_workers=workers,
            collate_fn=_as_is,
            persistent_workers=workers > 0 and epochs is None,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split, epochs=None, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("holdout", epochs=1, train=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict:
        batch = finish_batch(batch, self.params.conditioning.token_length)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            batch = progressive_batch(self.stage, batch, trainer.global_step)
        if self.online is not None:
            batch = self.online(batch, device=batch["image"].device)
        # NeMo's names, added after the transfer so the device holds one copy
        return add_nemo_keys(batch, self.params.conditioning.out_key)
