"""Loader batches: what crosses the DataLoader's worker boundary and how the device finishes it.

A worker sends uint8 images and the text features unpadded in their stored dtype
(:func:`collate`: ``text_tokens`` end to end, ``text_lens``); :func:`finish_batch` makes the
training batch where it lands (the device): float32 images in [-1, 1], features zero-padded to
``token_length`` with their mask, the same values as normalising and padding in the worker.
:class:`StageBatches` sizes each batch for the optimiser step it feeds (``trainer.progressive``),
:func:`resolve_num_workers` is ``trainer.num_workers``' default.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from imagen.config import StageConfig
from imagen.text import from_storage


def to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8: what crosses the worker boundary (a quarter of float32)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (:func:`to_tensor`'s arithmetic, on any device)."""
    if x.device.type == "cpu":  # numpy's uint8 -> float32 cast is several times faster here
        y = torch.from_numpy(x.numpy().astype(np.float32))
    else:
        y = x.to(torch.float32, copy=True)
    return y.div_(127.5).sub_(1.0)  # in place: no temporaries


def stored_tensor(x: np.ndarray) -> torch.Tensor:
    """A stored feature array as a tensor of the same precision (no copy widened to fp32):
    uint16 arrays are bfloat16 bit patterns (:func:`imagen.text.to_storage`)."""
    if x.dtype == np.uint16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    if x.dtype in (np.float16, np.float32):
        return torch.from_numpy(x.copy())
    return torch.from_numpy(from_storage(x))


def collate(
    examples: list[dict[str, Any]], out_key: str | None = None, token_length: int | None = None
) -> dict[str, Any]:
    """Stack tensors, keep strings as lists; the unpadded text features of the examples end
    to end (``text_tokens``) with their lengths (``text_lens``). With ``out_key`` the batch is
    finished here (:func:`finish_batch` to ``token_length``, on the CPU) and carries NeMo's
    names too."""
    batch: dict[str, Any] = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if k == "text":
            batch["text_tokens"] = torch.cat(vals)
            batch["text_lens"] = torch.tensor([len(v) for v in vals], dtype=torch.int32)
        elif isinstance(vals[0], torch.Tensor):
            batch[k] = torch.stack(vals)
        else:
            batch[k] = list(vals)
    if out_key:
        batch = finish_batch(batch, token_length)
        add_nemo_keys(batch, out_key)
    return batch


def finish_batch(batch: dict[str, Any], token_length: int | None) -> dict[str, Any]:
    """A loader batch as the training step reads it, where it is (the device): uint8 images ->
    float32 in [-1, 1]; unpadded ``text_tokens`` / ``text_lens`` -> ``text_embed`` (B, L, D)
    float32 zero-padded to ``token_length`` (None: the longest) and ``text_mask`` (B, L).
    No host read (a gather, no boolean indexing); a finished batch passes unchanged."""
    for k in ("image", "lowres"):
        if k in batch and batch[k].dtype == torch.uint8:
            batch[k] = normalise(batch[k])
    if "text_tokens" in batch:
        tokens, lens = batch.pop("text_tokens"), batch.pop("text_lens").long()
        if token_length is None:  # a host read: only where no length is given
            token_length = int(lens.max()) if len(lens) else 0
        length = token_length
        start = torch.cumsum(lens, 0) - lens
        pos = torch.arange(length, device=lens.device)
        mask = pos[None, :] < lens[:, None]
        blank = tokens.new_zeros(1, tokens.shape[1])  # what the padding positions gather
        index = torch.where(mask, start[:, None] + pos[None, :], tokens.shape[0])
        batch["text_embed"] = torch.cat([tokens, blank])[index].float()
        batch["text_mask"] = mask
    return batch


def progressive_batch(stage: StageConfig, batch: dict[str, Any], step: int) -> dict[str, Any]:
    """The part of a training batch that optimiser step ``step`` trains on
    (``trainer.progressive``): its first batch-size examples, and during the progressive steps
    the images downsampled (area average) to the progressive resolution."""
    if stage.trainer.progressive is None:
        return batch
    low, n = stage.progressive_resolution(step), stage.step_batch_size(step)
    if len(batch["image"]) > n:
        batch = {k: v[:n] for k, v in batch.items()}
    if low:
        img = batch["image"]
        batch["image"] = torch.nn.functional.interpolate(img, size=(low, low), mode="area")
    return batch


def add_nemo_keys(batch: dict[str, Any], out_key: str) -> dict[str, Any]:
    """``<out_key>_embeddings`` / ``<out_key>_mask`` beside ``text_embed`` / ``text_mask``."""
    if "text_embed" in batch:
        batch[f"{out_key}_embeddings"] = batch["text_embed"]
        batch[f"{out_key}_mask"] = batch["text_mask"]
    return batch


def resolve_num_workers(stage: StageConfig) -> int:
    """``trainer.num_workers``, or by default the cores this process may use shared by the
    ranks of a node, one left for the training process, at least 1 and at most 8."""
    t = stage.trainer
    if t.num_workers is not None:
        return t.num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or (
        t.devices if isinstance(t.devices, int) else max(1, torch.cuda.device_count())
    )
    return max(1, min(8, cores // max(1, local) - 1))


class StageBatches(IterableDataset):
    """Batches of a stage's examples, each of the size the optimiser step it feeds trains on
    (``trainer.progressive``'s batch during its steps, then ``trainer.batch_size``): nothing is
    decoded that no step trains on. This stream's batches are the DataLoader's batches
    ``w, w + W, ...`` (worker ``w`` of ``W``: the DataLoader takes them in turn), so each one
    knows its step; ``start_step`` is where a resumed run starts."""

    def __init__(
        self,
        examples: IterableDataset,
        stage: StageConfig,
        start_step: int = 0,
        fixed: int | None = None,
    ) -> None:
        super().__init__()
        self.examples, self.stage, self.start_step, self.fixed = examples, stage, start_step, fixed

    def size(self, batch_index: int) -> int:
        """Images in the DataLoader's batch ``batch_index`` (counted from ``start_step``)."""
        if self.fixed is not None:
            return self.fixed
        per_step = self.stage.trainer.accumulate_grad_batches
        return self.stage.step_batch_size(self.start_step + batch_index // per_step)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        it = iter(self.examples)
        for k in itertools.count():
            n = self.size(k * workers + worker)
            examples = list(itertools.islice(it, n))
            if examples:
                yield collate(examples)
            if len(examples) < n:
                return


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
