"""Ingest and precache in independent parts (``--part K/N``): the same shards and manifest as
one process; a missing part is named and re-runs alone; the Prefect flow maps the parts over a
Dask LocalCluster (prefect-dask)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import imagen, shrink, write_caption_folder, write_params

from imagen.config import ConfigError, resolve_params
from imagen.data.ingest import finished_parts, ingest, ingest_part, parts_store
from imagen.data.parts import KeySet, Part

QUIET = {"progress": False, "log": lambda _m: None}


def _folder(tmp_path: Path) -> Path:
    src = write_caption_folder(tmp_path / "src", n=30, size=64)
    (src / "lighthouse_000.png").write_bytes((src / "lighthouse_000.jpg").read_bytes())  # dup key
    (src / "broken.png").write_bytes(b"not an image")
    with open(src / "captions.csv", "a") as f:
        f.write("broken.png,a broken file\nlighthouse_000.png,the same key again\n")
    return src


def _cfg(tmp_path: Path, out: str, src: Path):
    data = {"source": "folder", "source_path": str(src), "num_holdout": 4, "shards_dir": out}
    return resolve_params(shrink(None, {"data": data})).data


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_parts_give_the_shards_and_manifest_of_one_process(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    one = _cfg(tmp_path, str(tmp_path / "one"), src)
    m_one = ingest(one, **QUIET)
    assert m_one["rejected_by_reason"] == {"duplicate_key": 1, "not_an_image": 1}
    cfg = _cfg(tmp_path, str(tmp_path / "one"), src).model_copy(
        update={"shards_dir": str(tmp_path / "parted")}
    )
    ingest_part(cfg, Part(2, 3), **QUIET)
    ingest_part(cfg, Part(0, 3), workers=2, **QUIET)
    with pytest.raises(ConfigError, match=r"parts 1/3 .* not finished"):
        ingest(cfg, **QUIET)  # a missing (crashed) part is named; nothing is written
    assert not (tmp_path / "parted" / "manifest.json").exists()
    marker = parts_store(cfg).local / "part-00000-of-00003.json"  # type: ignore[operator]
    before = marker.stat().st_mtime_ns
    logs: list[str] = []
    ingest_part(cfg, Part(0, 3), progress=False, log=logs.append)  # finished: skipped
    assert "already finished" in logs[0] and marker.stat().st_mtime_ns == before
    ingest_part(cfg, Part(1, 3), **QUIET)  # the missing part alone
    assert finished_parts(cfg) == [Part(0, 3), Part(1, 3), Part(2, 3)]
    m_parts = ingest(cfg, **QUIET)  # merges the parts, in order, then deletes them
    assert not parts_store(cfg).local.exists()  # type: ignore[union-attr]
    ref, got = _tree(tmp_path / "one"), _tree(tmp_path / "parted")
    ref_manifest, got_manifest = (json.loads(t.pop("manifest.json")) for t in (ref, got))
    assert ref.keys() == got.keys() and ref == got  # byte-identical shards
    for m in (ref_manifest, got_manifest):  # the manifest differs only in the output folder
        m["params"].pop("shards_dir")
    assert ref_manifest == got_manifest and m_parts["counts"] == m_one["counts"]


def test_parts_of_stale_params_are_not_merged(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    cfg = _cfg(tmp_path, str(tmp_path / "out"), src)
    ingest_part(cfg, Part(0, 2), **QUIET)
    other = cfg.model_copy(update={"seed": 7})
    assert finished_parts(other) is None  # made with other params: a fresh run ignores them
    with pytest.raises(ConfigError, match="--part"):
        Part.parse("2/2")


def test_key_set_on_disk() -> None:
    with KeySet() as keys:
        assert keys.add("a") and keys.add("b") and not keys.add("a")
        assert "a" in keys and "c" not in keys and len(keys) == 2


def test_precache_parts_then_the_stage_writes_the_manifest(tmp_path: Path) -> None:
    from imagen.data.precache import precache
    from imagen.text import build_default_encoder

    data = {"num_train": 16, "num_holdout": 4}
    params = resolve_params(shrink(tmp_path, {"data": data}))
    build_default_encoder(params.conditioning, params.conditioning.encoder_path)
    ingest(params.data, **QUIET)
    for k in (1, 0):
        done = precache(params, part=Part(k, 2), **QUIET)
        assert done["part"] == [k, 2] and done["encoded"] > 0
    assert not (tmp_path / "data/encoded/manifest.json").exists()
    manifest = precache(params, **QUIET)
    assert all(s["skipped"] for s in manifest["shards"])  # every shard came from a part
    assert manifest["samples"] == 20 and (tmp_path / "data/encoded/manifest.json").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_the_flow_maps_ingest_parts_over_a_dask_cluster(
    tmp_path: Path, prefect_server: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("prefect_dask")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.parts import map_parts

    src = _folder(tmp_path)
    data = {"source": "folder", "source_path": str(src), "num_holdout": 4}
    raw = shrink(None, {"data": data})
    for name in ("one", "dask"):
        (tmp_path / name).mkdir()
        write_params(raw, tmp_path / name / "params.yaml")
    one = resolve_params(raw).data
    ingest(one.model_copy(update={"shards_dir": str(tmp_path / "one/data/shards")}), **QUIET)
    for k, v in prefect_server.items():  # the session's real server on 127.0.0.1
        monkeypatch.setenv(k, v)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        done = map_parts("ingest", str(tmp_path / "dask"), 3, dask="local")
    assert sorted(d["part"] for d in done) == [0, 1, 2]
    res = imagen(tmp_path / "dask", "ingest", "--no-progress")  # what `dvc repro ingest` runs
    assert res.returncode == 0 and "merged 3 parts" in res.stdout, res.stdout[-2000:]
    ref, got = _tree(tmp_path / "one/data/shards"), _tree(tmp_path / "dask/data/shards")
    for t in (ref, got):
        t["manifest.json"] = json.loads(t["manifest.json"])
        t["manifest.json"]["params"].pop("shards_dir")
    assert ref == got  # the shards byte for byte, and the manifest
