"""Shards in object storage: ingest writes to, precache and the loader read from s3:// (a real
S3 API: moto's server on 127.0.0.1) and http:// (python's http.server); a DVC remote on the same
S3 server pushes and pulls data/ and models/."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import env, shrink

from imagen.config import ConfigError, resolve_params

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.integration

BUCKET = "imagen-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1, a bucket in it, and the environment that reaches it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    before = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)  # noqa: S310 - loopback
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield {**creds, "endpoint": url}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _params(root: Path, shards: str, encoded: str):
    from imagen.text import build_default_encoder

    data = {"shards_dir": shards, "encoded_dir": encoded, "num_train": 16, "num_holdout": 4}
    raw = shrink(root, {"data": data})
    params = resolve_params(raw)
    if not Path(params.conditioning.encoder_path).is_dir():  # the built toy T5, once per test
        build_default_encoder(params.conditioning, params.conditioning.encoder_path)
    return params


def _keys(params, split: str) -> list[str]:
    from imagen.data.loader import ShardStream, shard_paths

    return [s["__key__"] for s in ShardStream(shard_paths(params, split))]


def test_ingest_precache_and_loader_on_s3(s3: dict[str, str], tmp_path: Path) -> None:
    import s3fs

    from imagen.data.ingest import ingest
    from imagen.data.loader import ShardStream, shard_paths
    from imagen.data.precache import precache

    url = f"s3://{BUCKET}/run1"
    local = _params(tmp_path, str(tmp_path / "shards"), str(tmp_path / "encoded"))
    remote = _params(tmp_path, f"{url}/shards", f"{url}/encoded")
    quiet = {"progress": False, "log": lambda _m: None}
    m_local, m_s3 = ingest(local.data, **quiet), ingest(remote.data, **quiet)
    # the same bytes in the bucket as on disk, and the manifest beside them
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/shards"))
    assert names == sorted([s["name"] for s in m_local["shards"]] + ["manifest.json"])
    assert [s["sha256"] for s in m_s3["shards"]] == [s["sha256"] for s in m_local["shards"]]
    # precache reads the shards from the bucket and writes its own there; a re-run skips them
    p1 = precache(remote, **quiet)
    assert p1["samples"] == m_local["counts"]["written"]
    assert all(not s["skipped"] for s in p1["shards"])
    assert all(s["skipped"] for s in precache(remote, **quiet)["shards"])
    assert fs.exists(f"{url}/encoded/manifest.json")
    # the loader streams from the bucket, split between two ranks as from a folder
    paths = shard_paths(remote, "train")
    assert paths[0].startswith(f"{url}/encoded/train-")
    everything = [s["__key__"] for s in ShardStream(paths)]
    assert len(everything) == m_local["counts"]["train"]
    per_rank = []
    for rank in (0, 1):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        try:
            per_rank.append([s["__key__"] for s in ShardStream(paths)])
        finally:
            os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    # a training example decodes from the bucket's shards
    from imagen.data.loader import make_dataset

    ex = next(iter(make_dataset(remote, remote.stage("base64"), "train", epochs=1)))
    assert ex["image"].shape[-1] == remote.stage("base64").model.unet.image_size


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """http.server serving ``tmp_path/www`` on 127.0.0.1 in a thread."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_precache_and_loader_read_shards_over_http(web: tuple[str, Path], tmp_path: Path) -> None:
    from imagen.data.ingest import ingest
    from imagen.data.precache import precache

    base, www = web
    quiet = {"progress": False, "log": lambda _m: None}
    local = _params(tmp_path, str(www / "shards"), str(www / "encoded"))
    ingest(local.data, **quiet)
    precache(local, **quiet)
    # the web server's copy is listed from its manifest.json (a web folder cannot be listed)
    remote = _params(tmp_path, f"{base}/shards", f"{base}/encoded")
    assert _keys(remote, "train") == _keys(local, "train")
    assert _keys(remote, "holdout") == _keys(local, "holdout")
    # precache reads http shards into a local folder: the same embeddings
    http_in = _params(tmp_path, f"{base}/shards", str(tmp_path / "encoded2"))
    m = precache(http_in, **quiet)
    first = sorted((www / "encoded").glob("train-*.tar"))[0]
    assert (tmp_path / "encoded2" / first.name).read_bytes() == first.read_bytes()
    assert m["samples"] == len(_keys(local, "train")) + len(_keys(local, "holdout"))
    # a web server is read-only: ingest says so before any work
    with pytest.raises(ConfigError, match="data.shards_dir.*read-only"):
        ingest(remote.data, **quiet)


def _dvc(root: Path, *args: str, extra: dict[str, str]) -> str:
    res = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=root,
        env=env(None, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_dvc_remote_on_s3_pushes_and_pulls_data_and_models(
    s3: dict[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("dvc_s3")
    creds = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    root = tmp_path / "project"
    (root / "data" / "shards").mkdir(parents=True)
    (root / "models" / "base64").mkdir(parents=True)
    files = {
        "data/shards/train-000000.tar": os.urandom(50_000),
        "data/shards/manifest.json": b'{"counts": {}}\n',
        "models/base64/model.pt": os.urandom(30_000),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    _dvc(root, "init", "--no-scm", "-q", extra=creds)
    _dvc(root, "add", "data/shards", "models", extra=creds)
    _dvc(root, "remote", "add", "-d", "store", f"s3://{BUCKET}/dvcstore", extra=creds)
    _dvc(root, "remote", "modify", "store", "endpointurl", s3["endpoint"], extra=creds)
    _dvc(root, "push", extra=creds)
    # a fresh copy of the project (no cache, no outputs) pulls them back from the bucket
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, ignore=shutil.ignore_patterns("cache", "shards", "models"))
    shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    assert not (clone / "models").exists()
    _dvc(clone, "pull", extra=creds)
    for rel, data in files.items():
        assert (clone / rel).read_bytes() == data, rel
