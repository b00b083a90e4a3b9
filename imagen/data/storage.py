"""Where shards live: a local folder, or a folder in object storage or on a web server.

``data.shards_dir`` and ``data.encoded_dir`` take a local path or a URL: ``s3://bucket/prefix``,
``gs://bucket/prefix`` (read and write) or ``http(s)://host/path`` (read only). Local folders keep
plain file operations (write to a temporary name, then rename). URLs go through fsspec (s3fs,
gcsfs, aiohttp), imported only when a URL is used: ``pip install 'imagen-cascade[cloud]'``.
Credentials and endpoints come from where those libraries look (``AWS_ACCESS_KEY_ID``,
``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO; Google's default
credentials). An object is written whole by one upload, so a reader never sees half a shard.
A web server cannot list a folder: its shards are the ones its ``manifest.json`` names (ingest
and precache write one).

:func:`iter_samples` streams webdataset samples from shard paths or URLs (``pipe:`` and
``file:`` go to webdataset's own opener).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from imagen.config import ConfigError

READ_ONLY = ("http", "https")
CLOUD_EXTRA = "pip install 'imagen-cascade[cloud]' (s3fs, gcsfs)"


def scheme(location: str | os.PathLike[str]) -> str | None:
    """The URL scheme of ``location`` (``s3``, ``gs``, ``https``, ...), None for a local path."""
    text = str(location)
    if "://" not in text:
        return None
    proto = text.split("://", 1)[0].lower()
    return None if proto == "file" else proto


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is read through fsspec (any ``scheme://`` but ``file://``)."""
    return scheme(location) is not None


def _fs(url: str, key: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a ConfigError naming ``key`` when the
    package for its scheme is missing."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as e:
        need = e.name or "an fsspec backend"
        raise ConfigError(f"{key}: {url} needs {need}: {CLOUD_EXTRA}") from e
    except ValueError as e:  # an unknown protocol
        raise ConfigError(f"{key}: {url}: {e}") from e


def open_read(location: str, key: str = "shard") -> IO[bytes]:
    """A binary stream of a local file or a URL."""
    if not is_url(location):
        return open(location.removeprefix("file://"), "rb")  # noqa: SIM115 - the caller closes
    fs, path = _fs(location, key)
    return fs.open(path, "rb")


def sha256(location: str | os.PathLike[str]) -> str:
    """sha256 of a local file or a URL's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open_read(str(location)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """A folder of shards and JSON files: a local directory or a URL prefix.

    ``key`` names the params.yaml key the location came from, for error messages.
    """

    def __init__(self, location: str | os.PathLike[str], key: str = "data.shards_dir") -> None:
        self.location, self.key = str(location).rstrip("/"), key
        self.url = is_url(self.location)
        self.local = None if self.url else Path(self.location.removeprefix("file://"))
        if self.url:
            self.fs, self.root = _fs(self.location, key)

    def __str__(self) -> str:
        return self.location

    @property
    def writable(self) -> bool:
        return scheme(self.location) not in READ_ONLY

    def path(self, name: str) -> str:
        """The full path or URL of ``name`` in this folder."""
        return f"{self.location}/{name}" if self.url else str(self.local / name)  # type: ignore[operator]

    def sub(self, name: str) -> Store:
        return Store(self.path(name), self.key)

    def _check_writable(self) -> None:
        if not self.writable:
            raise ConfigError(
                f"{self.key}: {self.location} is read-only (http): write to s3:// or gs://"
            )

    def mkdir(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self._check_writable()  # object stores have no folders to make

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        return bool(self.fs.exists(f"{self.root}/{name}"))

    def list(self, pattern: str = "*") -> list[str]:
        """The names in this folder matching ``pattern`` (fnmatch), sorted. A web folder lists
        what its ``manifest.json`` names (its shards)."""
        if self.local is not None:
            names = [p.name for p in self.local.glob(pattern)] if self.local.is_dir() else []
        elif not self.writable:
            manifest = self.read_json("manifest.json") if self.exists("manifest.json") else {}
            names = [s["name"] for s in manifest.get("shards", [])]
        else:
            self.fs.invalidate_cache(self.root)  # another process may have written since
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
            except FileNotFoundError:
                names = []
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def open(self, name: str) -> IO[bytes]:
        return open_read(self.path(name), self.key)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def put_file(self, local: str | os.PathLike[str], name: str) -> None:
        """Move the local file ``local`` to ``name`` here (a rename, or one upload)."""
        if self.local is not None:
            os.replace(local, self.local / name)
            return
        self._check_writable()
        self.fs.put_file(str(local), f"{self.root}/{name}")
        os.unlink(local)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: a reader sees the old content or the new, never a part."""
        tmp = self._tmp(name)
        with open(tmp, "wb") as f:
            f.write(data)
        self.put_file(tmp, name)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_with(self, name: str, write: Callable[[Path], Any]) -> Any:
        """``write(tmp)`` fills a temporary local file that then becomes ``name``; returns what
        ``write`` returns. Nothing is left behind when ``write`` fails."""
        tmp = self._tmp(name)
        try:
            out = write(tmp)
            self.put_file(tmp, name)
            return out
        finally:
            tmp.unlink(missing_ok=True)

    def _tmp(self, name: str) -> Path:
        if self.local is not None:
            return self.local / f".{name}.tmp{os.getpid()}"
        self._check_writable()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        return Path(tmp)

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
        elif self.exists(name):
            self.fs.rm(f"{self.root}/{name}")

    def remove_all(self) -> None:
        """Delete this folder and everything in it."""
        if self.local is not None:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


@contextmanager
def local_file(store: Store, name: str) -> Iterator[Path]:
    """A local path holding ``name`` of ``store`` (a temporary copy when it is a URL)."""
    if store.local is not None:
        yield store.local / name
        return
    with tempfile.TemporaryDirectory(prefix="imagen-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(store.read_bytes(name))
        yield path


def _open_urls(
    data: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """webdataset's url_opener, with s3://, gs://, http(s):// read through fsspec."""
    from webdataset.gopen import gopen

    for sample in data:
        url = sample["url"]
        try:
            stream = open_read(url) if is_url(url) else gopen(url)
        except Exception as exn:  # noqa: BLE001 - the handler decides, as webdataset's does
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        yield {**sample, "stream": stream}


def iter_samples(
    urls: Iterable[str], handler: Callable[[Exception], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """webdataset samples (``__key__``, ``__url__``, one entry per member) of the shards at
    ``urls`` (local paths, ``s3://``, ``gs://``, ``http(s)://``, ``pipe:``), in order."""
    from webdataset import tariterators
    from webdataset.handlers import reraise_exception

    handler = handler or reraise_exception
    streams = _open_urls(({"url": u} for u in urls), handler)
    files = tariterators.tar_file_expander(streams, handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)
