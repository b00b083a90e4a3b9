"""Streaming training data: webdataset shards -> per-stage image pyramids + T5 embeddings.

The streams of :class:`~imagen.data.datamodule.ImagenDataModule` read the encoded shards
(``data.encoded_dir``; the raw ingested shards of ``data.shards_dir`` when ``online_encoding``
is on) with webdataset:

    shard list (reshuffled each epoch, same order on every rank)
      -> split by node (rank) -> split by worker      (webdataset's split_by_node/_worker)
      -> tar samples, each slimmed to the one stored image copy the stage decodes
      -> shuffle buffer (trainer.shuffle_buffer; default twice a shard, so shards mix)
      -> decode -> stage pyramid (uint8) + unpadded text features (as stored: fp16/bf16)
      -> crop shuffle (SR stages with crops_per_image > 1: an image's crops spread over
         batches) -> batches of the size the optimiser step they feed trains on
      -> the device: images normalised to [-1, 1], text features padded (:func:`finish_batch`)

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

What crosses the DataLoader's worker boundary and the host-to-device copy is compact: images
as uint8, text features unpadded in their stored dtype (``text_tokens`` (sum of n, D), all the
batch's tokens end to end, and ``text_lens`` (B,)). On the device :func:`finish_batch` makes the
training batch: ``image`` (B,3,C,C) and ``lowres`` (B,3,c,c) float32 in [-1, 1], ``text_embed``
(B,token_length,D) float32 zero-padded, ``text_mask`` (B,token_length) bool (the same values as
normalising and padding in the worker), ``caption`` and ``key`` lists; the same two text
tensors also under NeMo's names ``<out_key>_embeddings`` and ``<out_key>_mask``
(``model.conditioning.out_key``, e.g. ``t5_text_embeddings``; added by the data module after
the device transfer, so the device holds one copy, and by
:func:`imagen.data.holdout.holdout_batches`).
"""

from __future__ import annotations

import functools
import io
import itertools
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from imagen.config import ConfigError, Params, StageConfig
from imagen.data.batches import (
    StageBatches,
    add_nemo_keys,
    collate,
    finish_batch,
    normalise,
    progressive_batch,
    resolve_num_workers,
    stored_tensor,
    to_uint8,
)
from imagen.data.nemo_format import PICKLE_MEMBER, BadRecord, read_encodings
from imagen.text import TextEncoder, load_text_encoder

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
        select: Any = None,
    ) -> None:
        super().__init__()
        self.shards, self.epochs, self.shuffle, self.buffer, self.seed = (
            list(shards),
            epochs,
            shuffle,
            buffer,
            seed,
        )
        self.select = select  # sample -> the part of it kept (before the shuffle buffer)

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
            if self.select is not None:
                src = map(self.select, src)
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
        otherwise), resized once; uint8 (:func:`normalise` makes them [-1, 1])."""
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
                out.append({"image": to_uint8(full.crop((j, i, j + self.crop, i + self.crop)))})
            return out
        low = resize_image(full, self.lowres)  # downsample the whole image, then crop aligned
        f = self.res // self.lowres
        out = []
        for _ in range(crops):
            span = self.lowres - self.low_crop
            i, j = self._offset(span), self._offset(span)
            hi = full.crop((j * f, i * f, j * f + self.crop, i * f + self.crop))
            lo = low.crop((j, i, j + self.low_crop, i + self.low_crop))
            out.append({"image": to_uint8(hi), "lowres": to_uint8(lo)})
        return out


# --------------------------------------------------------------------------------------------
# Samples -> training examples
# --------------------------------------------------------------------------------------------
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def _is_image_key(key: str) -> bool:
    size, _, ext = key.partition(".")
    return key in IMAGE_KEYS or (size.isdigit() and ext in IMAGE_KEYS)


def pick_image_key(sample: dict[str, Any], min_size: int) -> str | None:
    """The key of :func:`pick_image`'s copy."""
    sizes = []
    for k in sample:
        size, _, ext = k.partition(".")
        if size.isdigit() and ext in IMAGE_KEYS and int(size) >= min_size:
            sizes.append((int(size), k))
    if sizes:
        return min(sizes)[1]
    return next((k for k in IMAGE_KEYS if k in sample), None)


def pick_image(sample: dict[str, Any], min_size: int) -> bytes | None:
    """The smallest stored copy of a sample's image that still covers ``min_size`` pixels.

    Ingest stores smaller copies under ``<size>.<ext>`` (``data.pyramid``); decoding a 64 px
    copy instead of a 1024 px PNG is what keeps the base stage's loader faster than its
    training step. Falls back to the full image (``png``/``jpg``/...); None when there is none.
    """
    key = pick_image_key(sample, min_size)
    return None if key is None else sample[key]


def slim_sample(sample: dict[str, Any], min_size: int) -> dict[str, Any]:
    """The sample without the stored image copies :func:`pick_image` passes over: the shuffle
    buffer holds what the stage decodes (a 64 px PNG for base64, not the 1024 px one too)."""
    keep = pick_image_key(sample, min_size)
    return {k: v for k, v in sample.items() if k == keep or not _is_image_key(k)}


class BadRecordWarning(UserWarning):
    """A training sample skipped because its text features cannot be used safely."""


class StageExamples(IterableDataset):
    """Decoded training examples for one stage: pyramid + padded text features."""

    def __init__(
        self,
        params: Params,
        stage: StageConfig,
        stream: ShardStream,
        train: bool,
        crop_buffer: int = 0,
    ):
        super().__init__()
        self.stream = stream
        self.pyramid = StagePyramid(stage, random_crop=train)
        self.crops = stage.trainer.crops_per_image if train else 1
        self.crop_buffer = crop_buffer if self.crops > 1 else 0
        self.cond = params.conditioning
        self.npy_key = f"{self.cond.precached_key}.npy"

    def _text_features(self, s: dict[str, Any], where: str) -> torch.Tensor:
        """The unpadded (n, D) features in their stored dtype (fp16, bf16 or fp32): the
        project's .npy, else NeMo's pickle member."""
        if self.npy_key in s:
            emb = stored_tensor(np.load(io.BytesIO(s[self.npy_key]), allow_pickle=False))
        elif PICKLE_MEMBER in s:
            emb = read_encodings(s[PICKLE_MEMBER], self.cond.precached_key)
        else:
            raise ConfigError(
                f"{where} has no {self.npy_key} and no NeMo {PICKLE_MEMBER} member "
                "(model.conditioning.precached_key); run `imagen precache` with the same params"
            )
        if emb.ndim != 2 or emb.shape[1] != self.cond.embed_dim:
            raise ConfigError(
                f"{where}: embedding shape {tuple(emb.shape)} does not match "
                f"model.conditioning.embed_dim {self.cond.embed_dim}; re-run `imagen precache`"
            )
        return torch.as_tensor(emb)

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
        if not self.cond.online_encoding:  # unpadded, as stored: padded on the device
            text["text"] = self._text_features(s, where)[: self.cond.token_length]
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
        examples: Iterator[dict[str, Any]] = (ex for _, ex in self.decoded())
        if self.crop_buffer > 1:  # an image's crops land in different batches (seeded)
            import webdataset as wds

            index, _ = stream_position()
            seed = (self.stream.seed * 1_000_003 + 7) * 1009 + index
            examples = wds.shuffle(self.crop_buffer, initial=self.crop_buffer, seed=seed)(examples)
        yield from examples


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
    pyramid = StagePyramid(stage)
    stream = ShardStream(
        shard_paths(params, split),
        epochs=epochs,
        shuffle=train,
        buffer=shuffle_buffer(params, stage) if train else 0,
        seed=stage.trainer.seed + params.data.seed,
        select=functools.partial(slim_sample, min_size=pyramid.res),
    )
    crop_buffer = stage.trainer.crops_per_image * stage.loader_batch_size if train else 0
    return StageExamples(params, stage, stream, train, crop_buffer=crop_buffer)


def shuffle_buffer(params: Params, stage: StageConfig) -> int:
    """``trainer.shuffle_buffer``, or by default twice ``data.samples_per_shard``: a buffer
    larger than a shard mixes each shard with the next one of the (shuffled) shard order."""
    t = stage.trainer.shuffle_buffer
    return 2 * params.data.samples_per_shard if t is None else t


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


__all__ = [
    "StageBatches",
    "add_nemo_keys",
    "collate",
    "finish_batch",
    "make_dataset",
    "normalise",
    "progressive_batch",
    "resolve_num_workers",
    "stored_tensor",
    "to_uint8",
]
