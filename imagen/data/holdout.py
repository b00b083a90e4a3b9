"""Held-out captions and real images for evaluation: ingest's holdout shards or the embedded split.

:func:`load_holdout` returns exactly ``num`` samples when the source has them (and warns,
naming the shard pattern, when it has fewer), each with the caption attributes the embedded
grammar names so the evaluator can score agreement attribute by attribute.
"""

from __future__ import annotations

import io
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from imagen.config import ConfigError, Params, StageConfig
from imagen.data.loader import OnlineEncoding, add_nemo_keys, collate, make_dataset, pick_image


@dataclass
class HeldOut:
    """Held-out captions, the attributes they name ({} when unknown) and real images (uint8)."""

    captions: list[str]
    attributes: list[dict[str, str]]
    images: Tensor  # (N, 3, R, R) uint8
    source: str = ""

    def __len__(self) -> int:
        return len(self.captions)


def pil_to_uint8(image: Any, size: int) -> Tensor:
    """A PIL image -> (3, size, size) uint8, bicubic up / Lanczos down when resized."""
    img = image.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC if img.width < size else Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _attributes_of(caption: str, given: dict | None) -> dict[str, str]:
    from imagen.embedded.dataset import ATTRIBUTES
    from imagen.embedded.evaluator import parse_caption

    found = dict(given or {})
    if not found:
        found = parse_caption(caption)
    return {k: str(v) for k, v in found.items() if k in ATTRIBUTES and v in ATTRIBUTES[k]}


def read_split(
    params: Params, split: str, num: int | None, resolution: int
) -> tuple[list[str], list[dict[str, str]], list[Tensor], str]:
    """Up to ``num`` (all when None) samples of ingest's ``<split>-*.tar`` shards: captions,
    their embedded attributes and uint8 images at ``resolution``."""
    folder = Path(params.data.shards_dir)
    pattern = f"{folder}/{split}-*.tar"
    shards = sorted(str(p) for p in folder.glob(f"{split}-*.tar"))
    captions: list[str] = []
    attrs: list[dict[str, str]] = []
    images: list[Tensor] = []
    if shards:
        import webdataset as wds

        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            data = pick_image(sample, resolution)
            if data is None or "txt" not in sample:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = sample["txt"].decode("utf-8").strip()
            captions.append(caption)
            attrs.append(_attributes_of(caption, meta.get("attributes")))
            images.append(pil_to_uint8(Image.open(io.BytesIO(data)), resolution))
            if len(captions) == num:
                break
    return captions, attrs, images, f"{len(shards)} {split} shard(s) {pattern}"


def load_holdout(params: Params, num: int, resolution: int) -> HeldOut:
    """``num`` held-out samples: from ``<shards_dir>/holdout-*.tar`` when ingest wrote them,
    else from the embedded dataset's holdout split; images resized to ``resolution``."""
    pattern = f"{params.data.shards_dir}/holdout-*.tar"
    if any(Path(params.data.shards_dir).glob("holdout-*.tar")):
        captions, attrs, images, source = read_split(params, "holdout", num, resolution)
        if len(captions) < num:
            warnings.warn(
                f"{pattern}: only {len(captions)} held-out samples (evaluate.num_images={num})",
                stacklevel=2,
            )
    else:
        from imagen.embedded.dataset import EmbeddedDataset

        captions, attrs, images = [], [], []
        data = EmbeddedDataset(num, seed=params.data.seed, size=resolution, split="holdout")
        for item in data:
            captions.append(item["caption"])
            attrs.append(_attributes_of(item["caption"], item["attributes"]))
            images.append(pil_to_uint8(item["image"], resolution))
        source = "embedded dataset (holdout split)"
    if not captions:
        raise ConfigError(f"evaluate: no held-out samples found ({pattern} holds none)")
    return HeldOut(captions, attrs, torch.stack(images), source)


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
    length = params.conditioning.token_length
    batches = [
        collate(examples[i : i + size], out_key, length) for i in range(0, len(examples), size)
    ]
    if online:
        batches = [add_nemo_keys(online(b), out_key) for b in batches]
    return batches
