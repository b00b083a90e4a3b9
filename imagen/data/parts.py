"""Independent parts of ingest and precache (``--part K/N``), and a key set kept on disk.

Part K of N (K counted from 0) takes the K-th of N contiguous, near-equal ranges of an ordered
list (ingest: the source's records in the order one process would visit them; precache: the
ingested shards). Parts run anywhere (processes, machines, a Dask cluster under Prefect) and a
part that crashed is re-run alone; the pieces are put together in order afterwards, so the
result is the one a single process gives.

:class:`KeySet` is ingest's duplicate-key check: a set of strings in an SQLite file, so the
keys of hundreds of millions of records are not held in memory.
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagen.config import ConfigError

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (from 0) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, option: str = "--part") -> Part:
        """``"K/N"`` -> Part(K, N); a ConfigError naming ``option`` unless 0 <= K < N."""
        m = _PART.match(text)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ConfigError(
                f"{option}: {text!r} is not K/N with 0 <= K < N (part K of N, counted from 0)"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this part's share of ``n`` items (contiguous; sizes differ by <= 1)."""
        return n * self.index // self.count, n * (self.index + 1) // self.count

    @property
    def name(self) -> str:
        """``part-00002-of-00008`` (sorts in order)."""
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class KeySet:
    """A set of strings on disk (SQLite, in a temporary folder unless ``path`` is given).

    ``add(key)`` says whether the key is new; memory stays flat whatever the number of keys.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._tmp = None if path else tempfile.TemporaryDirectory(prefix="imagen-keys-")
        file = Path(path) if path else Path(self._tmp.name) / "keys.sqlite"  # type: ignore[union-attr]
        self.db = sqlite3.connect(file)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS keys (k TEXT PRIMARY KEY) WITHOUT ROWID")
        self.pending = 0

    def add(self, key: str) -> bool:
        """Add ``key``; True when it was not there before."""
        cur = self.db.execute("INSERT OR IGNORE INTO keys VALUES (?)", (key,))
        self.pending += 1
        if self.pending >= 10_000:
            self.db.commit()
            self.pending = 0
        return cur.rowcount == 1

    def __contains__(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM keys WHERE k = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM keys").fetchone()[0])

    def close(self) -> None:
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> KeySet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
