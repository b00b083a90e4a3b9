"""Deterministic webdataset shards: what ingest and precache write.

Tar members have mtime 0, owner root/root with empty names and mode 0644, in sample order and
sorted extension order, so equal samples give byte-equal shards; every tar is written to a
temporary name and renamed into place, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagen.data.storage import Store


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tar(path: str | os.PathLike[str], samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write samples (``{"__key__": k, "ext": bytes, ...}``) to one tar, atomically.

    Members have mtime 0, owner root/root with empty names and mode 0644, in sample order and
    sorted extension order (webdataset's TarWriter), so equal samples give equal bytes.
    Returns ``{"name", "samples", "bytes", "sha256"}``.
    """
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False)
            for s in samples:
                writer.write(s)
                n += 1
            writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "name": path.name,
        "samples": n,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def store_tar(store: Store, name: str, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """:func:`write_tar` into ``name`` of a local folder or a URL (written whole, then moved
    or uploaded); the same return value."""
    return store.write_with(name, lambda tmp: {**write_tar(tmp, samples), "name": name})


class ShardSetWriter:
    """Rolls samples into ``<prefix>-000000.tar, ...`` of ``per_shard`` samples each, in a
    local folder or at a URL (:class:`imagen.data.storage.Store`)."""

    def __init__(self, out_dir: Path | Store, prefix: str, per_shard: int) -> None:
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.buffer: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any]) -> None:
        self.buffer.append(sample)
        if len(self.buffer) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        if isinstance(self.out_dir, Path):
            info = write_tar(self.out_dir / name, self.buffer)
        else:
            info = store_tar(self.out_dir, name, self.buffer)
        self.shards.append({**info, "split": self.prefix})
        self.buffer = []
