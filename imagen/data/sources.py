"""Where ingest's records come from: the embedded set, an image folder, or webdataset shards.

Each reader yields :class:`RawRecord` s (image bytes or a PIL image, the caption as found, the
file it came from); checking and normalising them is :mod:`imagen.data.ingest`'s job, so a
reader never rejects anything except what it cannot read at all (reported as an error).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from imagen.config import ConfigError, DataConfig
from imagen.data.parts import Part

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# caption index files, read in this order (a later one's row for a file wins)
CAPTION_FILES: tuple[str, ...] = (
    "metadata.csv",
    "metadata.jsonl",
    "captions.csv",
    "captions.jsonl",
)
FILE_COLUMNS: tuple[str, ...] = ("file", "file_name", "image", "path")
TEXT_COLUMNS: tuple[str, ...] = ("caption", "text", "prompt")
CARRIED_MEMBERS: tuple[str, ...] = ("pickle",)  # NeMo's precached T5 encodings


@dataclass
class RawRecord:
    """One candidate sample as a source gives it (before any checks)."""

    key: str
    origin: str  # the file or shard member it came from (named in the manifest)
    image: bytes | Image.Image | None = None
    caption: bytes | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    members: dict[str, bytes] = field(default_factory=dict)  # carried verbatim (NeMo's pickle)
    split: str | None = None  # set by sources that know it (embedded)
    embedded_index: int | None = None  # rendered in the worker process


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def clean_key(key: str) -> str:
    """A webdataset-safe key: no dots (they separate key and extension), no slashes.

    Folders become ``_`` (``cats/001`` is ``cats_001``). A key that had to change otherwise
    (``Photo 1``, ``猫``, ``a.b``) gets a short hash of the original, so names that clean alike
    (``猫`` and ``犬``, ``a.b`` and ``a_b``) stay two samples instead of one being dropped as a
    duplicate key.
    """
    clean = _KEY_CHARS.sub("_", key).strip("_")
    if clean and clean == key.replace("/", "_"):
        return clean
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{clean}-{digest}" if clean else digest


def _embedded_records(cfg: DataConfig, part: Part | None = None) -> Iterator[RawRecord]:
    lo, hi = part.bounds(cfg.num_train + cfg.num_holdout) if part else (0, None)
    n = 0
    for split, num in (("train", cfg.num_train), ("holdout", cfg.num_holdout)):
        for i in range(num):
            if lo <= n and (hi is None or n < hi):
                yield RawRecord(
                    key="", origin=f"embedded:{split}/{i}", split=split, embedded_index=i
                )
            n += 1


def _pick(columns: Sequence[str] | None, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if columns and c in columns), None)


def _index_path(name: str) -> str:
    """An index file's path as the folder walk spells it (``./a.png``, ``sub\\a.png``)."""
    return name.replace("\\", "/").removeprefix("./")


def _read_caption_index(folder: Path) -> dict[str, bytes | str]:
    """``file -> caption`` from the folder's index files (``captions.*``, or Hugging Face
    imagefolder's ``metadata.*``); the column names may be any of FILE_COLUMNS / TEXT_COLUMNS."""
    index: dict[str, bytes | str] = {}
    for name in CAPTION_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                reader = csv.DictReader(f)
                fcol = _pick(reader.fieldnames, FILE_COLUMNS)
                tcol = _pick(reader.fieldnames, TEXT_COLUMNS)
                if fcol is None or tcol is None:
                    msg = (
                        f"{path}: needs a file column ({', '.join(FILE_COLUMNS)}) and a caption"
                        f" column ({', '.join(TEXT_COLUMNS)}); it has {reader.fieldnames}"
                    )
                    if name.startswith("captions"):
                        raise ConfigError(msg)
                    warnings.warn(f"{msg}: not read for captions", stacklevel=2)
                    continue
                for row in reader:
                    if row[fcol]:
                        index[_index_path(row[fcol])] = row[tcol] or ""
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                fcol, tcol = _pick(list(row), FILE_COLUMNS), _pick(list(row), TEXT_COLUMNS)
                if tcol is None and name.startswith("metadata"):
                    continue  # a metadata row without a caption: a .txt beside may have one
                index[_index_path(str(row[fcol]))] = (row[tcol] if tcol else None) or ""
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                warnings.warn(f"{path}:{n}: skipped a bad line ({e!r})", stacklevel=2)
    return index


def _folder_records(cfg: DataConfig, part: Part | None = None) -> Iterator[RawRecord]:
    if isinstance(cfg.source_path, list):
        raise ConfigError("data.source_path: the folder source takes one folder, not a list")
    folder = Path(cfg.source_path or "")
    if not cfg.source_path or not folder.is_dir():
        raise ConfigError(f"data.source_path: {cfg.source_path!r} is not a folder of images")
    index = _read_caption_index(folder)
    files = shuffled_files(folder, cfg.seed)
    if part is not None:  # this part's share of the order one process visits
        files = files[slice(*part.bounds(len(files)))]
    for path in files:
        rel = path.relative_to(folder).as_posix()
        caption: bytes | str | None = index.get(rel)
        if caption is None:
            txt = path.with_suffix(".txt")
            caption = txt.read_bytes() if txt.exists() else None
        yield RawRecord(
            key=_file_key(folder, path), origin=rel, image=path.read_bytes(), caption=caption
        )


def _file_key(folder: Path, path: Path) -> str:
    rel = path.relative_to(folder).as_posix()
    return clean_key(rel.rsplit(".", 1)[0] if "." in path.name else rel)


def shuffled_files(folder: Path, seed: int) -> list[Path]:
    """The candidate image files of ``folder`` in a seeded random order (``data.seed``).

    Folders are often sorted by kind (``cats/``, ``dogs/``; ``a_*``, ``b_*``): written in name
    order, every shard, and so every batch a shard feeds, would be a run of one kind. The order
    is a permutation of the files grouped by sample key, so files that share a key (``dup.jpg``,
    ``dup.png``) stay in name order and the first of them is still the one kept.
    """
    groups: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        skip = path.name.startswith(".") or rel in CAPTION_FILES
        if skip or path.suffix.lower() in (".txt", ".json"):
            continue
        groups.setdefault(_file_key(folder, path), []).append(path)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    return [path for group in order for path in group]


def read_wdinfo(path: str | Path, root: str | None = None) -> list[str]:
    """The shards a NeMo wdinfo ``.pkl`` lists (``{"tar_files": [...], "chunk_size",
    "total_key_count"}``), joined to ``root`` (NeMo's local_root_path; default: the .pkl's
    folder). Read with the allowlist unpickler: a pickle that would run code is refused."""
    from imagen.data.nemo_format import BadRecord, safe_loads

    path = Path(path)
    try:
        info = safe_loads(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"data.source_path: {path}: {e.strerror}") from None
    except BadRecord as e:
        raise ConfigError(f"data.source_path: {path}: refused ({e.reason}: {e.detail})") from None
    tars = info.get("tar_files") if isinstance(info, dict) else None
    if not isinstance(tars, list) or not all(isinstance(t, str) for t in tars):
        raise ConfigError(f"data.source_path: {path} is not a NeMo wdinfo (no tar_files list)")
    base = Path(root) if root else path.parent
    return [t if "://" in t or Path(t).is_absolute() else str(base / t) for t in tars]


def expand_source(source: str | list[str], root: str | None = None) -> list[str] | str:
    """Local folders and globs -> a sorted list of tar paths; a NeMo wdinfo ``.pkl`` -> its
    shards; a list -> all of its entries' shards (brace patterns expanded); anything else is
    given to webdataset as is (brace patterns, ``pipe:``, ``http(s)://``, ``file://``)."""
    if isinstance(source, list):
        import webdataset as wds

        out: list[str] = []
        for entry in source:
            got = expand_source(entry, root)
            out += wds.shardlists.expand_urls(got) if isinstance(got, str) else got
        return out
    if "://" in source or source.startswith("pipe:"):
        return source
    p = Path(source)
    if p.suffix == ".pkl":
        return read_wdinfo(p, root)
    if p.is_dir():
        return sorted(str(x) for x in p.glob("*.tar"))
    if any(c in source for c in "*?["):
        return sorted(glob.glob(source))
    return source


def _webdataset_records(
    cfg: DataConfig, errors: list[tuple[str, str]], part: Part | None = None
) -> Iterator[RawRecord]:
    import webdataset as wds

    if not cfg.source_path:
        raise ConfigError("data.source_path: the webdataset source needs shards or a URL")
    urls = expand_source(cfg.source_path, cfg.source_root)
    if isinstance(urls, list) and not urls:
        raise ConfigError(f"data.source_path: no tar shards match {cfg.source_path!r}")
    if part is not None:  # this part's share of the shards
        urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else urls
        urls = urls[slice(*part.bounds(len(urls)))]
        if not urls:
            return

    def handler(exn: Exception) -> bool:
        errors.append((type(exn).__name__, str(exn)[:300]))
        return True  # keep going with the next sample / shard

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=handler)
    for s in ds:
        raw_key = str(s.get("__key__", ""))
        url = str(s.get("__url__", ""))
        origin = f"{url}#{raw_key}"
        image, ext = None, None
        for e in IMAGE_EXTS:
            if e in s:
                image, ext = s[e], e
                break
        meta: dict[str, Any] = {}
        if "json" in s:
            try:
                meta = json.loads(s["json"])
            except ValueError:
                meta = {}
        caption = s.get("txt")
        if caption is None and isinstance(meta, dict):
            caption = meta.get("caption")
        extra = {"source_meta": meta} if isinstance(meta, dict) and meta else {}
        if image is None:
            extra["missing_image"] = sorted(k for k in s if not k.startswith("__"))
        yield RawRecord(
            key=clean_key(raw_key),
            origin=origin,
            image=image,
            caption=caption,
            extra=extra | ({"source_ext": ext} if ext else {}),
            members={k: s[k] for k in CARRIED_MEMBERS if k in s},
        )


def records(
    cfg: DataConfig, errors: list[tuple[str, str]], part: Part | None = None
) -> tuple[Iterator[RawRecord], int | None]:
    """The source's records (``part``'s share only, when given) and the count of all of the
    source's records when known beforehand."""
    if cfg.source == "embedded":
        return _embedded_records(cfg, part), cfg.num_train + cfg.num_holdout
    if cfg.source == "folder":
        folder = Path(cfg.source_path if isinstance(cfg.source_path, str) else "")
        total = None
        if (
            cfg.source_path and folder.is_dir()
        ):  # image files only, so the held-out spacing is known up front
            exts = {f".{e}" for e in IMAGE_EXTS}
            total = sum(1 for p in folder.rglob("*") if p.suffix.lower() in exts)
        return _folder_records(cfg, part), total
    return _webdataset_records(cfg, errors, part), None


def _local_files(cfg: DataConfig) -> list[Path]:
    """The local files ingest would read (none for the embedded set or a remote URL)."""
    if cfg.source == "folder":
        folder = Path(cfg.source_path) if isinstance(cfg.source_path, str) else None
        return (
            sorted(p for p in folder.rglob("*") if p.is_file())
            if folder and folder.is_dir()
            else []
        )
    if cfg.source != "webdataset" or not cfg.source_path:
        return []
    try:
        urls = expand_source(cfg.source_path, cfg.source_root)
    except ConfigError:
        return []  # ingest itself says what is wrong with the source
    if isinstance(urls, str):
        import webdataset as wds

        urls = wds.shardlists.expand_urls(urls)
    paths = (
        Path(u.removeprefix("file://")) for u in urls if "://" not in u or u.startswith("file://")
    )
    return sorted(p for p in paths if p.is_file())


def fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What ingest would read, told cheaply: the source and, for a folder or local shards, the
    number, total size and a sha256 of every file's path, size and modification time.

    DVC tracks params.yaml and the code, not a folder's files: dvc.yaml's ``source`` stage
    writes this at every repro, and ingest depends on it, so adding, removing or editing an
    image or caption makes ingest (and only then what follows it) stale.
    """
    files = _local_files(cfg)
    digest = hashlib.sha256()
    size = 0
    for path in files:
        st = path.stat()
        size += st.st_size
        line = f"{path.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return {
        "source": cfg.source,
        "source_path": cfg.source_path,
        "files": len(files),
        "bytes": size,
        "sha256": digest.hexdigest(),
    }


def write_fingerprint(cfg: DataConfig, path: Path) -> int:
    """:func:`fingerprint` as JSON in ``path`` (``imagen ingest --fingerprint``); returns 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint(cfg), indent=1, sort_keys=True) + "\n")
    return 0
