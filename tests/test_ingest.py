"""`imagen ingest`: bad input is counted not fatal, shards are deterministic, all sources work."""

from __future__ import annotations

import io
import json
import re
import tarfile
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from imagen.config import ConfigError, DataConfig
from imagen.data.ingest import ingest
from imagen.data.sources import fingerprint

SIZE, MIN_RES = 64, 32


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (size[1], size[0], ch) if ch else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def make_bad_corpus(folder: Path) -> None:
    """One file per case a real scrape contains; the caption is a .txt beside the image."""
    folder.mkdir(parents=True)
    files: dict[str, bytes] = {
        "good_rgb.jpg": _jpg(_noise((80, 60), seed=1)),  # not square: center-cropped
        "big.png": _png(_noise((200, 200), seed=2)),  # larger: resized to SIZE
        "exact.jpg": _jpg(_noise((SIZE, SIZE), seed=3)),  # kept byte for byte
        "exact_png.png": _png(_noise((SIZE, SIZE), seed=17)),  # kept byte for byte too
        "cmyk.jpg": _jpg(_noise((64, 64), "CMYK", seed=4)),
        "grey.png": _png(_noise((64, 64), "L", seed=5)),
        "rgba.png": _png(_noise((64, 64), "RGBA", seed=6)),
        "grey16.png": _png(Image.fromarray(np.full((40, 40), 65535, np.uint16))),
        "tiny.png": _png(_noise((16, 16), seed=8)),  # below min_resolution
        "zero.png": b"",
        "notes.jpg": b"this is not an image at all\n",
        "empty_caption.png": _png(_noise((48, 48), seed=9)),
        "latin1.png": _png(_noise((48, 48), seed=10)),
        "long.png": _png(_noise((48, 48), seed=11)),
        "uncaptioned.png": _png(_noise((48, 48), seed=12)),
        "dup.png": _png(_noise((48, 48), seed=13)),
        "dup.jpg": _jpg(_noise((48, 48), seed=14)),  # same key "dup" as dup.jpg: later one skipped
    }
    pal = _noise((48, 48), seed=15).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    files["palette.png"] = _png(pal)
    trunc = _jpg(_noise((64, 64), seed=16))
    files["truncated.jpg"] = trunc[: len(trunc) // 2]
    for name, data in files.items():
        (folder / name).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        if stem != "uncaptioned":
            (folder / f"{stem}.txt").write_bytes(f"a caption for {stem}".encode())
    (folder / "empty_caption.txt").write_bytes(b"   \n")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "long.txt").write_bytes(b"word " * 400)


def read_shards(folder: Path, split: str = "train") -> dict[str, dict]:
    out = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            out[s["__key__"]] = s
    return out


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    base = dict(
        image_size=SIZE,
        min_resolution=MIN_RES,
        samples_per_shard=4,
        max_caption_chars=100,
        num_holdout=0,
        shards_dir=str(tmp_path / "shards"),
    )
    return DataConfig(**(base | kw))


def test_bad_input_is_skipped_or_normalised_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "images"
    make_bad_corpus(src)
    m = ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    assert m["rejected_by_reason"] == {
        "below_min_resolution": 1,
        "duplicate_key": 1,
        "empty_caption": 1,
        "empty_file": 1,
        "missing_caption": 1,
        "not_an_image": 1,
        "truncated_or_corrupt_image": 1,
    }
    files = {r["file"]: reason for reason, rs in m["rejected"].items() for r in rs}
    assert files == {
        "tiny.png": "below_min_resolution",
        "dup.png": "duplicate_key",  # dup.jpg comes first in sorted order and is kept
        "empty_caption.png": "empty_caption",
        "zero.png": "empty_file",
        "uncaptioned.png": "missing_caption",
        "notes.jpg": "not_an_image",
        "truncated.jpg": "truncated_or_corrupt_image",
    }
    good = read_shards(tmp_path / "shards")
    assert sorted(good) == sorted(
        [
            "good_rgb",
            "big",
            "exact",
            "exact_png",
            "cmyk",
            "grey",
            "rgba",
            "grey16",
            "latin1",
            "long",
            "dup",
            "palette",
        ]
    )
    assert m["counts"] == {"seen": 19, "written": 12, "train": 12, "holdout": 0, "rejected": 7}
    for key, s in good.items():
        ext = "jpg" if "jpg" in s else "png"
        img = Image.open(io.BytesIO(s[ext]))
        assert img.mode == "RGB", key
        assert img.size[0] == img.size[1] <= SIZE, key
        meta = json.loads(s["json"])
        assert meta["source"].startswith(key)
    assert Image.open(io.BytesIO(good["big"]["png"])).size == (SIZE, SIZE)
    assert Image.open(io.BytesIO(good["good_rgb"]["jpg"])).size == (60, 60)
    assert good["exact"]["jpg"] == (src / "exact.jpg").read_bytes()  # untouched JPEG kept
    assert good["exact_png"]["png"] == (src / "exact_png.png").read_bytes()  # and PNG
    assert good["rgba"]["png"] != (src / "rgba.png").read_bytes()  # changed: re-encoded
    assert json.loads(good["good_rgb"]["json"])["original_size"] == [80, 60]
    # alpha composited on white: fully transparent pixels become white
    rgba = np.asarray(Image.open(io.BytesIO(good["grey16"]["png"])))
    assert rgba.min() == 255  # 16-bit full scale -> 8-bit 255
    assert good["latin1"]["txt"].decode() == "café au lait"
    assert len(good["long"]["txt"].decode()) <= 100
    for note in (
        "caption_truncated",
        "caption_not_utf8",
        "cmyk_converted",
        "greyscale_converted",
        "alpha_composited_on_white",
        "high_bit_depth_converted",
        "palette_converted",
        "center_cropped",
        "resized",
    ):
        assert m["normalised"].get(note, 0) >= 1, note
    assert m["resolution_filter"]["min_resolution"] == MIN_RES
    assert all(len(s["sha256"]) == 64 for s in m["shards"])


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_looks_the_same(tmp_path: Path) -> None:
    """A photo 8x the shard size is decoded by libjpeg at 1/4 scale (still above the size),
    then resized as any image: the stored picture matches a full decode's, its json keeps the
    photo's own size, and the photo's bytes are never stored as they were."""
    src = tmp_path / "images"
    src.mkdir()
    smooth = _noise((64, 48), seed=3).resize((512, 384), Image.Resampling.BICUBIC)
    (src / "photo.jpg").write_bytes(_jpg(smooth))
    (src / "photo.txt").write_text("a large photo")
    ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    got = read_shards(tmp_path / "shards")["photo"]
    meta = json.loads(got["json"])
    assert meta["original_size"] == [512, 384] and meta["size"] == [SIZE, SIZE]
    assert "resized" in meta["normalised"]
    stored = np.asarray(Image.open(io.BytesIO(got["jpg"])), dtype=np.float64)
    full = Image.open(io.BytesIO((src / "photo.jpg").read_bytes())).convert("RGB")
    full = full.crop((64, 0, 448, 384)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    mse = ((stored - np.asarray(full, dtype=np.float64)) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 30  # dB


def test_a_folder_with_no_acceptable_image_stops_ingest_saying_why(tmp_path: Path) -> None:
    """Not an empty success that the next stage reports as "run ingest first": the error names
    the key, the commonest reason and its fix, and the manifest still lists every file."""
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(_png(_noise((40, 40), seed=i)))
    with pytest.raises(
        ConfigError,
        match=r"data.source_path: no image of .* was accepted.*"
        r"'missing_caption': 3.*a \.txt of the same name",
    ):
        ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sorted(r["file"] for r in manifest["rejected"]["missing_caption"]) == [
        "0.png",
        "1.png",
        "2.png",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.source_path: .*empty holds no image"):
        ingest(_cfg(tmp_path, source="folder", source_path=str(tmp_path / "empty")), progress=False)


def test_images_smaller_than_an_sr_stage_are_counted_and_noted(tmp_path: Path) -> None:
    """An SR stage trains on smaller images upsampled: ingest counts them per stage in the
    manifest and says so, once per stage that has any."""
    src = tmp_path / "images"
    src.mkdir()
    for i, side in enumerate((40, 64, 300, 300)):
        (src / f"{i}.png").write_bytes(_png(_noise((side, side), seed=i)))
        (src / f"{i}.txt").write_text(f"picture {i}")
    lines: list[str] = []
    cfg = _cfg(tmp_path, source="folder", source_path=str(src), image_size=512)
    m = ingest(cfg, progress=False, log=lines.append)
    assert m["smaller_than_stage"] == {
        "base64": {"resolution": 64, "images": 1},
        "sr256": {"resolution": 256, "images": 2},
        "sr1024": {"resolution": 1024, "images": 4},
    }
    notes = [line for line in lines if "NOTE" in line]
    assert len(notes) == 2
    assert "2 of 4 images are smaller than 256 px, sr256's resolution" in notes[0]
    assert "4 of 4 images are smaller than 1024 px" in notes[1] and "upsampled" in notes[1]


def test_rerun_gives_byte_identical_shards(tmp_path: Path) -> None:
    src = tmp_path / "images"
    make_bad_corpus(src)
    cfg = _cfg(tmp_path, source="folder", source_path=str(src), num_holdout=2, num_train=8)
    ingest(cfg, progress=False)
    shards = tmp_path / "shards"
    first = {p.name: p.read_bytes() for p in sorted(shards.iterdir())}
    ingest(cfg, workers=2, progress=False)  # a parallel re-run writes the same bytes
    assert {p.name: p.read_bytes() for p in sorted(shards.iterdir())} == first
    assert any(n.startswith("holdout-") for n in first)
    with tarfile.open(shards / "train-000000.tar") as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tf.getmembers()} == {
            (0, 0, 0, "", "")
        }


INDEX_LAYOUTS = {
    "csv": ("captions.csv", "file,caption"),
    "jsonl": ("captions.jsonl", ("file", "caption")),
    # Hugging Face imagefolder's layout, a spreadsheet export with a byte-order mark and ./ paths
    "hf_csv": ("metadata.csv", "file_name,text"),
    "hf_jsonl": ("metadata.jsonl", ("file_name", "text")),
    "excel_csv": ("captions.csv", "\ufeffimage,prompt"),
}


@pytest.mark.parametrize("layout", sorted(INDEX_LAYOUTS))
def test_folder_caption_index_files(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.jpg"]
    (src / "a.png").write_bytes(_png(_noise((40, 40), seed=1)))
    (src / "sub" / "b.jpg").write_bytes(_jpg(_noise((40, 40), seed=2)))
    index, columns = INDEX_LAYOUTS[layout]
    listed = [f"./{n}" if layout == "excel_csv" else n for n in names]
    if isinstance(columns, str):
        rows = "".join(f'{n},"caption, of {n.removeprefix("./")}"\n' for n in listed)
        (src / index).write_text(f"{columns}\n{rows}", encoding="utf-8")
    else:
        fcol, tcol = columns
        (src / index).write_text(
            "".join(json.dumps({fcol: n, tcol: f"caption, of {n}"}) + "\n" for n in listed)
        )
    m = ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    assert m["counts"]["written"] == 2 and m["counts"]["rejected"] == 0
    got = {k: s["txt"].decode() for k, s in read_shards(tmp_path / "shards").items()}
    assert got == {"a": "caption, of a.png", "sub_b": "caption, of sub/b.jpg"}


@pytest.mark.filterwarnings("ignore:.*metadata.csv. needs a file column")
def test_caption_index_without_its_columns_is_refused_by_name(tmp_path: Path) -> None:
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(_png(_noise((40, 40), seed=1)))
    (src / "a.txt").write_text("a caption beside")
    (src / "metadata.csv").write_text("file_name,width\na.png,40\n")  # no captions: .txt used
    with pytest.warns(UserWarning, match="metadata.csv: needs a file column"):
        m = ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    assert m["counts"]["written"] == 1
    (src / "captions.csv").write_text("name,label\na.png,x\n")
    with pytest.raises(ConfigError, match=r"captions.csv: needs a file column .*'name', 'label'"):
        ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)


def test_names_that_clean_alike_stay_separate_samples(tmp_path: Path) -> None:
    """Non-ASCII names (a folder captioned in Japanese or Chinese) and names that differ only in
    characters a webdataset key cannot hold are kept, each under its own safe key; the same
    name with two extensions is still one sample."""
    src = tmp_path / "images"
    (src / "動物").mkdir(parents=True)
    names = ["猫.png", "犬.png", "動物/鳥.png", "a.b.png", "a_b.png", "Photo 1.png", "cats_1.png"]
    names += ["dup.png", "dup.jpg"]
    for i, name in enumerate(names):
        (src / name).write_bytes(_png(_noise((40, 40), seed=i)))
        (src / name).with_suffix(".txt").write_text(f"caption of {name}", encoding="utf-8")
    m = ingest(_cfg(tmp_path, source="folder", source_path=str(src)), progress=False)
    assert m["rejected_by_reason"] == {"duplicate_key": 1}
    got = {s["txt"].decode(): k for k, s in read_shards(tmp_path / "shards").items()}
    assert sorted(got) == sorted(f"caption of {n}" for n in names if n != "dup.png")
    assert len(set(got.values())) == len(got)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in got.values())
    assert got["caption of a_b.png"] == "a_b" and got["caption of cats_1.png"] == "cats_1"


def _source_tar(path: Path) -> None:
    """An img2dataset-layout shard with two good samples and a broken one."""
    with wds.TarWriter(str(path)) as w:
        for i in range(2):
            w.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": _jpg(_noise((50, 70), seed=i)),
                    "txt": f"caption {i}".encode(),
                    "json": json.dumps({"url": f"http://x/{i}", "width": 70}).encode(),
                }
            )
        w.write({"__key__": "000000002", "jpg": b"\xff\xd8broken", "txt": b"bad"})
        w.write({"__key__": "000000003", "json": b'{"caption": "no image here"}'})


@pytest.mark.parametrize("how", ["path", "file_url", "pipe"])
def test_webdataset_source(tmp_path: Path, how: str) -> None:
    tar = tmp_path / "src-000.tar"
    _source_tar(tar)
    url = {"path": str(tar), "file_url": f"file://{tar}", "pipe": f"pipe:cat {tar}"}[how]
    m = ingest(_cfg(tmp_path, source="webdataset", source_path=url), progress=False)
    assert m["counts"]["written"] == 2
    assert m["rejected_by_reason"] == {"missing_image": 1, "not_an_image": 1}
    got = read_shards(tmp_path / "shards")
    assert sorted(got) == ["000000000", "000000001"]
    meta = json.loads(got["000000001"]["json"])
    assert meta["source_meta"]["url"] == "http://x/1" and meta["original_size"] == [50, 70]
    assert got["000000001"]["txt"] == b"caption 1"


def test_embedded_source_writes_train_and_holdout(tmp_path: Path) -> None:
    pytest.importorskip("imagen.embedded.dataset")
    cfg = _cfg(tmp_path, source="embedded", num_train=6, num_holdout=3)
    m = ingest(cfg, progress=False)
    assert m["counts"] == {"seen": 9, "written": 9, "train": 6, "holdout": 3, "rejected": 0}
    train, hold = read_shards(tmp_path / "shards"), read_shards(tmp_path / "shards", "holdout")
    assert len(train) == 6 and len(hold) == 3 and not set(train) & set(hold)
    s = next(iter(hold.values()))
    assert Image.open(io.BytesIO(s["png"])).size == (SIZE, SIZE)
    assert json.loads(s["json"])["attributes"]


def test_folder_holds_out_exactly_num_holdout(tmp_path: Path) -> None:
    """A folder sorted by class (like digits/0..9) gets exactly num_holdout held-out images,
    spread over the whole folder rather than taken from its start."""
    src = tmp_path / "src"
    for cls in range(6):
        (src / str(cls)).mkdir(parents=True)
        for i in range(10):
            (src / str(cls) / f"{i}.png").write_bytes(_png(_noise((40, 40), seed=cls * 10 + i)))
            (src / str(cls) / f"{i}.txt").write_text(f"a picture of the digit {cls}")
    cfg = _cfg(tmp_path, source="folder", source_path=str(src), num_holdout=13)
    manifest = ingest(cfg, progress=False, log=lambda _m: None)
    assert manifest["counts"]["holdout"] == 13
    assert manifest["counts"]["train"] == 60 - 13
    held = read_shards(tmp_path / "shards", "holdout")
    classes = {s["txt"].decode()[-1] for s in held.values()}
    assert len(classes) >= 5, classes


def _keys_in_shard_order(folder: Path, split: str = "train") -> list[str]:
    return [
        s["__key__"]
        for shard in sorted(folder.glob(f"{split}-*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]


def test_folder_sorted_by_kind_gives_mixed_shards_fixed_by_the_seed(tmp_path: Path) -> None:
    """40 files a_* then 40 b_*: every shard holds both kinds (no run of one kind), the order
    and the held-out set are the same for the same seed and differ for another."""
    src = tmp_path / "src"
    src.mkdir()
    for kind in "ab":
        for i in range(40):
            (src / f"{kind}_{i:02d}.png").write_bytes(_png(_noise((32, 32), seed=i)))
            (src / f"{kind}_{i:02d}.txt").write_text(f"kind {kind}")

    def run(seed: int, out: str) -> tuple[list[str], list[str]]:
        cfg = _cfg(tmp_path, source="folder", source_path=str(src), num_holdout=8, seed=seed)
        cfg = cfg.model_copy(update={"samples_per_shard": 8, "shards_dir": str(tmp_path / out)})
        ingest(cfg, progress=False, log=lambda _m: None)  # files would come a_00 .. b_39
        folder = tmp_path / out
        return _keys_in_shard_order(folder), _keys_in_shard_order(folder, "holdout")

    train, held = run(0, "s0")
    assert len(train) == 72 and len(held) == 8 and not set(train) & set(held)
    for i in range(0, 72, 8):  # each shard of 8 mixes both kinds
        assert {k[0] for k in train[i : i + 8]} == {"a", "b"}, train[i : i + 8]
    longest = max(len(list(run_)) for _, run_ in groupby(k[0] for k in train))
    assert longest <= 8, longest
    assert run(0, "again") == (train, held)  # deterministic, held-out set included
    other, other_held = run(1, "s1")
    assert other != train and sorted(other + other_held) == sorted(train + held)


def test_the_source_fingerprint_changes_with_the_folders_files_only(tmp_path: Path) -> None:
    """What dvc.yaml's source stage writes: a new, edited or removed image or caption changes
    it; reading the folder (an ingest) does not; the embedded set's never changes."""
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(_png(_noise((40, 40), seed=1)))
    (src / "a.txt").write_text("first")
    cfg = _cfg(tmp_path, source="folder", source_path=str(src))
    first = fingerprint(cfg)
    assert first["files"] == 2 and first["bytes"] == sum(p.stat().st_size for p in src.iterdir())
    ingest(cfg, progress=False)
    assert fingerprint(cfg) == first
    (src / "b.png").write_bytes(_png(_noise((40, 40), seed=2)))
    with_b = fingerprint(cfg)
    assert with_b["sha256"] != first["sha256"] and with_b["files"] == 3
    (src / "b.png").unlink()
    assert fingerprint(cfg) == first
    (src / "a.txt").write_text("second caption")
    assert fingerprint(cfg)["sha256"] != first["sha256"]
    embedded = _cfg(tmp_path, source="embedded")
    assert fingerprint(embedded) == fingerprint(embedded) and fingerprint(embedded)["files"] == 0
    tar = tmp_path / "src-000.tar"
    _source_tar(tar)
    shards = fingerprint(_cfg(tmp_path, source="webdataset", source_path=str(tar)))
    assert shards["files"] == 1 and shards["bytes"] == tar.stat().st_size
