"""Streaming training data: webdataset shards -> per-stage image pyramids + T5 embeddings.

:class:`ImagenDataModule` streams the encoded shards (``data.encoded_dir``; the raw ingested
shards of ``data.shards_dir`` when ``online_encoding`` is on) with webdataset:

    shard list (reshuffled each epoch, same order on every rank)
      -> split by node (rank) -> split by worker      (webdataset's split_by_node/_worker)
      -> tar samples -> shuffle buffer (trainer.shuffle_buffer) -> decode
      -> stage pyramid + text features -> DataLoader batches

Each epoch every sample is read by exactly one (rank, worker): shards are dealt out when there
are at least ranks x workers of them, and when there are fewer, every stream reads all shards
and keeps every (ranks x workers)-th sample. Training streams repeat epochs forever (training
is step-based); validation / held-out streams are one epoch.

The stage pyramid (square images, as ingest stores them):

- base64: the image resized (antialiased) to the UNet's ``unet.image_size``.
- SR stages (resolution R, low resolution r, UNet crop C): the image is resized to R, the low-
  res image is that R image downsampled to r, and a random C crop of the R image is paired
  with the aligned ``C*r/R`` crop of the r image (offsets on the low-res pixel grid), e.g.
  sr256 with C=128: a 128 crop of the 256 image + the matching 32 crop of the 64 image;
  sr1024 with C=256: a 256 crop of the 1024 image + the matching 64 crop of the 256 image.

Text features come from ``<precached_key>.npy`` (what ``imagen precache`` writes) or from
NeMo's ``pickle`` member (``{precached_key: {"encodings": (n, D)}}``, read by the allowlist
unpickler of :mod:`imagen.data.nemo_format`); a record whose pickle is unsafe, unreadable or
lacks the key is skipped with a :class:`BadRecordWarning` naming the shard, key and reason.

Batch: ``image`` (B,3,C,C) and ``lowres`` (B,3,c,c) in [-1, 1], ``text_embed``
(B,token_length,D) float32 zero-padded, ``text_mask`` (B,token_length) bool, ``caption`` and
``key`` lists; the same two text tensors also under NeMo's names ``<out_key>_embeddings`` and
``<out_key>_mask`` (``model.conditioning.out_key``, e.g. ``t5_text_embeddings``; added by the
data module after the device transfer, so the device holds one copy, and by
:func:`holdout_batches`).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from imagen.config import ConfigError, Params, StageConfig
from imagen.data.nemo_format import PICKLE_MEMBER, BadRecord, read_encodings
from imagen.text import TextEncoder, from_storage, load_text_encoder, pad_or_trim

Split = str  # "train" | "holdout"


# --------------------------------------------------------------------------------------------
# Shards and splitting
# --------------------------------------------------------------------------------------------
def shard_paths(params: Params, split: Split = "train") -> list[str]:
    """The shards a split streams from (encoded unless online encoding), in name order: paths,
    or URLs when the folder is one (``s3://``, ``gs://``, ``http(s)://``)."""
    from imagen.data.storage import Store

    cond = params.conditioning
    key = "data.shards_dir" if cond.online_encoding else "data.encoded_dir"
    folder = Store(params.data.shards_dir if cond.online_encoding else params.data.encoded_dir, key)
    shards = [folder.path(name) for name in folder.list(f"{split}-*.tar")]
    if not shards:
        run = "imagen ingest" if cond.online_encoding else "imagen ingest && imagen precache"
        raise ConfigError(f"no {split}-*.tar shards in {folder}; run `{run}` first")
    return shards


def stream_position() -> tuple[int, int]:
    """(this stream's index, number of streams) over all ranks x DataLoader workers, as
    webdataset sees them (RANK/WORLD_SIZE or torch.distributed; the DataLoader worker info)."""
    import webdataset as wds

    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank * workers + worker, world * workers


class ShardStream(IterableDataset):
    """Raw webdataset samples of a set of shards, split across ranks and workers.

    ``epochs=None`` repeats forever. The shard order of each epoch is shuffled with
    ``seed + epoch`` (identical on every rank, so the split stays disjoint) when ``shuffle``;
    the sample shuffle buffer is seeded by (seed, epoch, rank and worker).
    """

    def __init__(
        self,
        shards: list[str],
        epochs: int | None = 1,
        shuffle: bool = False,
        buffer: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.epochs, self.shuffle, self.buffer, self.seed = (
            list(shards),
            epochs,
            shuffle,
            buffer,
            seed,
        )

    def _epoch_urls(self, epoch: int) -> tuple[list[str], bool]:
        """This stream's shards for ``epoch`` and whether samples must be split instead."""
        import webdataset as wds

        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        _, streams = stream_position()
        if len(order) >= streams:
            return list(wds.split_by_worker(wds.split_by_node(order))), False
        return order, True  # too few shards: every stream reads all, keeps its share

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        from imagen.data.storage import iter_samples

        index, streams = stream_position()
        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            urls, by_sample = self._epoch_urls(epoch)
            src: Any = iter_samples(urls)
            if by_sample:
                src = (s for i, s in enumerate(src) if i % streams == index)
            if self.buffer > 1:  # seeded per (seed, epoch, stream): a rerun sees the same order
                seed = (self.seed * 1_000_003 + epoch) * 1009 + index
                src = wds.shuffle(self.buffer, initial=min(self.buffer, 100), seed=seed)(src)
            yield from src


# --------------------------------------------------------------------------------------------
# Per-stage pyramid
# --------------------------------------------------------------------------------------------
def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """A square PIL image resized to ``size`` as every stage's training data is (bicubic)."""
    if img.size == (size, size):
        return img
    # PIL widens the filter support by the scale factor when shrinking: antialiased.
    return img.resize((size, size), Image.Resampling.BICUBIC)


class StagePyramid:
    """The image(s) one stage trains on, from a stored (square) image."""

    def __init__(self, stage: StageConfig, random_crop: bool = True) -> None:
        self.crop = stage.model.unet.image_size
        self.res = stage.resolution
        self.lowres = stage.lowres if stage.model.is_sr else None
        self.random_crop = random_crop
        if self.crop > self.res:
            raise ConfigError(
                f"stages.{stage.name}.model.unet.image_size: {self.crop} is larger than the "
                f"stage resolution {self.res}"
            )
        if self.lowres is not None:
            if self.res % self.lowres or (self.crop * self.lowres) % self.res:
                raise ConfigError(
                    f"stages.{stage.name}.lowres: {self.lowres} must divide the resolution "
                    f"{self.res} and the crop {self.crop} must map to whole low-res pixels"
                )
            self.low_crop = self.crop * self.lowres // self.res
        else:
            # base stage: the UNet sees the whole image at its own size
            self.res = self.crop

    def _offset(self, span: int) -> int:
        if span <= 0:
            return 0
        if self.random_crop:
            return int(torch.randint(0, span + 1, ()).item())
        return span // 2

    def __call__(self, img: Image.Image, crops: int = 1) -> list[dict[str, torch.Tensor]]:
        """``crops`` examples of ``img`` (random crops when training; all the centre crop
        otherwise), resized once."""
        img = img.convert("RGB")
        if img.size[0] != img.size[1]:  # ingest stores squares; be lenient with other shards
            s = min(img.size)
            left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
            img = img.crop((left, top, left + s, top + s))
        full = resize_image(img, self.res)
        if self.lowres is None:
            out = []
            for _ in range(crops):
                i, j = self._offset(self.res - self.crop), self._offset(self.res - self.crop)
                out.append({"image": to_tensor(full.crop((j, i, j + self.crop, i + self.crop)))})
            return out
        low = resize_image(full, self.lowres)  # downsample the whole image, then crop aligned
        f = self.res // self.lowres
        out = []
        for _ in range(crops):
            span = self.lowres - self.low_crop
            i, j = self._offset(span), self._offset(span)
            hi = full.crop((j * f, i * f, j * f + self.crop, i * f + self.crop))
            lo = low.crop((j, i, j + self.low_crop, i + self.low_crop))
            out.append({"image": to_tensor(hi), "lowres": to_tensor(lo)})
        return out


# --------------------------------------------------------------------------------------------
# Samples -> training examples
# --------------------------------------------------------------------------------------------
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def pick_image(sample: dict[str, Any], min_size: int) -> bytes | None:
    """The smallest stored copy of a sample's image that still covers ``min_size`` pixels.

    Ingest stores smaller copies under ``<size>.<ext>`` (``data.pyramid``); decoding a 64 px
    copy instead of a 1024 px PNG is what keeps the base stage's loader faster than its
    training step. Falls back to the full image (``png``/``jpg``/...); None when there is none.
    """
    sizes = []
    for k in sample:
        size, _, ext = k.partition(".")
        if size.isdigit() and ext in IMAGE_KEYS and int(size) >= min_size:
            sizes.append((int(size), k))
    if sizes:
        return sample[min(sizes)[1]]
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


class BadRecordWarning(UserWarning):
    """A training sample skipped because its text features cannot be used safely."""


class StageExamples(IterableDataset):
    """Decoded training examples for one stage: pyramid + padded text features."""

    def __init__(self, params: Params, stage: StageConfig, stream: ShardStream, train: bool):
        super().__init__()
        self.stream = stream
        self.pyramid = StagePyramid(stage, random_crop=train)
        self.crops = stage.trainer.crops_per_image if train else 1
        self.cond = params.conditioning
        self.npy_key = f"{self.cond.precached_key}.npy"

    def _text_features(self, s: dict[str, Any], where: str) -> np.ndarray:
        """The unpadded (n, D) features: the project's .npy, else NeMo's pickle member."""
        if self.npy_key in s:
            emb = from_storage(np.load(io.BytesIO(s[self.npy_key]), allow_pickle=False))
        elif PICKLE_MEMBER in s:
            emb = read_encodings(s[PICKLE_MEMBER], self.cond.precached_key)
        else:
            raise ConfigError(
                f"{where} has no {self.npy_key} and no NeMo {PICKLE_MEMBER} member "
                "(model.conditioning.precached_key); run `imagen precache` with the same params"
            )
        if emb.ndim != 2 or emb.shape[1] != self.cond.embed_dim:
            raise ConfigError(
                f"{where}: embedding shape {emb.shape} does not match "
                f"model.conditioning.embed_dim {self.cond.embed_dim}; re-run `imagen precache`"
            )
        return emb

    def examples(self, s: dict[str, Any]) -> list[dict[str, Any]]:
        """A sample's training examples (``trainer.crops_per_image`` crops of its image when
        training, else one); raises :class:`BadRecord` for an unusable NeMo pickle."""
        key = s.get("__key__", "?")
        where = f"{s.get('__url__', '?')}: sample {key!r}"
        data = pick_image(s, self.pyramid.res)
        if data is None:
            raise ConfigError(f"{where} has no image ({', '.join(IMAGE_KEYS)})")
        text: dict[str, Any] = {"caption": s["txt"].decode("utf-8") if "txt" in s else ""}
        text["key"] = key
        if not self.cond.online_encoding:
            emb = self._text_features(s, where)
            text["text_embed"], text["text_mask"] = pad_or_trim(emb, self.cond.token_length)
        with Image.open(io.BytesIO(data)) as im:
            return [{**crop, **text} for crop in self.pyramid(im, self.crops)]

    def decoded(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(raw sample, example) pairs; bad records are skipped with a BadRecordWarning."""
        for s in self.stream:
            try:
                examples = self.examples(s)
            except BadRecord as e:
                where = f"{s.get('__url__', '?')}: sample {s.get('__key__', '?')!r}"
                warnings.warn(
                    f"{where}: skipped, bad record ({e.reason}): {e.detail}",
                    BadRecordWarning,
                    stacklevel=2,
                )
                continue
            for ex in examples:
                yield s, ex

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, ex in self.decoded():
            yield ex


def collate(examples: list[dict[str, Any]], out_key: str | None = None) -> dict[str, Any]:
    """Stack tensors, keep strings as lists; with ``out_key`` the text features are also
    under NeMo's names ``<out_key>_embeddings`` / ``<out_key>_mask`` (the same tensors)."""
    batch: dict[str, Any] = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        batch[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else list(vals)
    if out_key:
        add_nemo_keys(batch, out_key)
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


def make_dataset(
    params: Params,
    stage: StageConfig,
    split: Split = "train",
    epochs: int | None = None,
    train: bool | None = None,
) -> StageExamples:
    """The example stream of ``split`` for ``stage``. Training (``train``: shuffled shards,
    shuffle buffer, random crops) is the default for the train split."""
    train = split == "train" if train is None else train
    stream = ShardStream(
        shard_paths(params, split),
        epochs=epochs,
        shuffle=train,
        buffer=stage.trainer.shuffle_buffer if train else 0,
        seed=stage.trainer.seed + params.data.seed,
    )
    return StageExamples(params, stage, stream, train)


class OnlineEncoding:
    """Adds ``text_embed`` / ``text_mask`` to batches that carry only captions: one encoder
    forward a batch, on the batch's device, in ``model.conditioning.encoder_dtype`` (bfloat16
    on an accelerator by default), frozen and without gradients; the features are float32."""

    def __init__(self, params: Params) -> None:
        self.cond = params.conditioning
        self.encoder: TextEncoder | None = None

    def __call__(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> dict:
        if "text_embed" in batch:
            return batch
        if self.encoder is None or self.encoder.device != torch.device(device):
            self.encoder = load_text_encoder(self.cond, device=device, dtype=None)
        batch["text_embed"], batch["text_mask"] = self.encoder.encode(batch["caption"])
        return batch


class ImagenDataModule(pl.LightningDataModule):
    """Lightning data for one cascade stage, streamed from the (encoded) shards."""

    def __init__(self, params: Params, stage: StageConfig, split: Split = "train") -> None:
        super().__init__()
        self.params, self.stage, self.split = params, stage, split
        self.online = OnlineEncoding(params) if params.conditioning.online_encoding else None

    def setup(self, stage: str | None = None) -> None:
        # webdataset's split_by_node reads RANK / WORLD_SIZE (or torch.distributed, which
        # spawned DataLoader workers do not inherit): publish what the Trainer knows.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            os.environ.setdefault("RANK", str(trainer.global_rank))
            os.environ.setdefault("WORLD_SIZE", str(trainer.world_size))

    def _loader(self, split: Split, epochs: int | None, train: bool) -> DataLoader:
        t = self.stage.trainer
        ds = make_dataset(self.params, self.stage, split, epochs=epochs, train=train)
        return DataLoader(
            ds,
            batch_size=self.stage.loader_batch_size if train else t.batch_size,
            num_workers=t.num_workers,
            collate_fn=collate,
            persistent_workers=t.num_workers > 0 and epochs is None,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split, epochs=None, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("holdout", epochs=1, train=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            batch = progressive_batch(self.stage, batch, trainer.global_step)
        if self.online is not None:
            batch = self.online(batch, device=batch["image"].device)
        # NeMo's names, added after the transfer so the device holds one copy
        return add_nemo_keys(batch, self.params.conditioning.out_key)


def holdout_batches(
    params: Params, n: int, stage: str | StageConfig = "base64", batch_size: int | None = None
) -> list[dict[str, Any]]:
    """The first ``n`` held-out examples (center crops, file order) as batches, for evaluation.

    Each batch has the training keys (text features included, encoded on the fly when
    ``online_encoding``) plus ``attributes`` (from the sample metadata, for the embedded set).
    """
    st = params.stage(stage) if isinstance(stage, str) else stage
    ds = make_dataset(params, st, "holdout", epochs=1, train=False)
    online = OnlineEncoding(params) if params.conditioning.online_encoding else None
    size = batch_size or n
    examples = []
    for s, ex in itertools.islice(ds.decoded(), n):
        meta = json.loads(s["json"]) if "json" in s else {}
        ex["attributes"] = meta.get("attributes", {})
        examples.append(ex)
    out_key = params.conditioning.out_key
    batches = [collate(examples[i : i + size], out_key) for i in range(0, len(examples), size)]
    if online:
        batches = [add_nemo_keys(online(b), out_key) for b in batches]
    return batches
