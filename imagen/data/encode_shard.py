"""One shard's captions encoded: the samples copied to the output shard with their
embeddings (``<precached_key>.npy``, or NeMo's ``pickle`` member with ``--format nemo``);
samples that already carry NeMo's precached pickle are checked and kept as they are."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from imagen.config import ConditioningConfig, ConfigError
from imagen.data.nemo_format import PICKLE_MEMBER, BadRecord, encodings_pickle, read_encodings
from imagen.data.shards import store_tar
from imagen.data.storage import Store, iter_samples
from imagen.text import TextEncoder, to_storage


def shard_name(shard: str) -> str:
    """A shard's file name (of a path or a URL)."""
    return shard.replace("\\", "/").rsplit("/", 1)[-1]


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


FORMATS: tuple[str, ...] = ("project", "nemo")  # <key>.npy, or NeMo's <key>.pickle


def _read_samples(src: str) -> list[dict[str, Any]]:
    out = []
    for s in iter_samples([src]):
        out.append({k: v for k, v in s.items() if not k.startswith("_") or k == "__key__"})
    return out


def is_nemo_shard(src: str) -> bool:
    """Whether a shard's first sample carries NeMo's precached ``pickle`` member."""
    for s in iter_samples([src]):
        return PICKLE_MEMBER in s
    return False


def _store(emb: np.ndarray, cond: ConditioningConfig, fmt: str) -> tuple[str, bytes]:
    """(member name, bytes) of one caption's unpadded embeddings in ``fmt``."""
    if fmt == "nemo":
        dtype = "float32" if cond.storage_dtype == "bfloat16" else cond.storage_dtype
        return PICKLE_MEMBER, encodings_pickle(emb.astype(dtype), cond.precached_key)
    return f"{cond.precached_key}.npy", _npy_bytes(to_storage(emb, cond.storage_dtype))


def _check_nemo(
    samples: list[dict[str, Any]], cond: ConditioningConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Split samples into (kept, to encode) and count NeMo's precached ones; bad ones are
    dropped into ``stats["bad"]`` entries with their reason."""
    kept, todo, bad = [], [], []
    stats = {"tokens": 0, "embedding_bytes": 0, "nemo_precached": 0}
    for s in samples:
        if PICKLE_MEMBER not in s:
            todo.append(s)
            kept.append(s)
            continue
        try:
            emb = read_encodings(s[PICKLE_MEMBER], cond.precached_key, cond.embed_dim)
        except BadRecord as e:
            bad.append({"key": s["__key__"], "reason": e.reason, "detail": e.detail})
            continue
        stats["tokens"] += emb.shape[0]
        stats["embedding_bytes"] += len(s[PICKLE_MEMBER])
        stats["nemo_precached"] += 1
        kept.append(s)
    return kept, todo, {**stats, "bad": bad}  # type: ignore[dict-item]


def encode_shard(
    src: str,
    dst: tuple[Store, str],
    encoder: TextEncoder | Callable[[], TextEncoder],
    cond: ConditioningConfig,
    batch_size: int,
    on_batch: Callable[[int], Any] = lambda n: None,
    fmt: str = "project",
) -> dict[str, Any]:
    """Copy one shard's samples to ``dst`` (a folder and a name) adding their embeddings in
    ``fmt``; returns stats.

    Samples that carry NeMo's precached pickle are checked and kept as they are (bad ones are
    left out and listed under ``bad_records``); ``encoder`` may be a callable that loads it, so
    a shard of NeMo samples only never loads T5.
    """
    kept, todo, stats = _check_nemo(_read_samples(src), cond)
    on_batch(len(kept) - len(todo) + len(stats["bad"]))
    captions = []
    for s in todo:
        if "txt" not in s:
            raise ConfigError(f"{src}: sample {s['__key__']!r} has no caption (.txt)")
        captions.append(s["txt"].decode("utf-8"))
    if todo and callable(encoder) and not isinstance(encoder, TextEncoder):
        encoder = encoder()
    # sorted by length, each batch padded to its longest caption; results in sample order
    embs = encoder.encode_sorted(captions, batch_size, on_batch) if todo else []  # type: ignore[union-attr]
    for s, emb in zip(todo, embs, strict=True):
        name, blob = _store(emb, cond, fmt)
        s[name] = blob
        stats["tokens"] += emb.shape[0]
        stats["embedding_bytes"] += len(blob)
    info = store_tar(*dst, kept)
    info.update(
        cut=encoder.over_length(captions) if todo else 0,  # type: ignore[union-attr]
        tokens=stats["tokens"],
        embedding_bytes=stats["embedding_bytes"],
        nemo_precached=stats["nemo_precached"],
        bad_records=stats["bad"],
    )
    return info
