"""Checking and normalising one ingest record into a webdataset sample (runs in ingest's
worker processes): captions to clean UTF-8, images to 8-bit RGB squares no larger than
``data.image_size`` with their smaller copies (``data.pyramid``), or the reason it is rejected.
:mod:`imagen.data.ingest` routes the results into shards.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imagen.config import DataConfig
from imagen.data.nemo_format import BadRecord, safe_loads
from imagen.data.sources import RawRecord, clean_key

JPEG_QUALITY = 95


# --------------------------------------------------------------------------------------------
# Records from the sources
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    key: str
    origin: str
    split: str | None
    sample: dict[str, Any] | None = None  # webdataset sample when accepted
    reason: str | None = None  # rejection reason
    detail: str = ""
    notes: list[str] = field(default_factory=list)  # what was normalised


# --------------------------------------------------------------------------------------------
# Checking and normalising one record (runs in worker processes)
# --------------------------------------------------------------------------------------------
_EMBEDDED_CACHE: dict[tuple[str, int, int, int], Any] = {}


def _embedded_item(cfg: DataConfig, split: str, index: int) -> dict[str, Any]:
    from imagen.embedded.dataset import EmbeddedDataset

    total = cfg.num_train if split == "train" else cfg.num_holdout
    ck = (split, cfg.seed, cfg.image_size, total)
    if ck not in _EMBEDDED_CACHE:
        _EMBEDDED_CACHE[ck] = EmbeddedDataset(
            total, seed=cfg.seed, size=cfg.image_size, split=split
        )
    return _EMBEDDED_CACHE[ck][index]


def normalise_caption(raw: bytes | str | None, max_chars: int) -> tuple[str | None, list[str]]:
    """-> (caption or None when missing/empty, notes). Non-UTF-8 bytes are read as cp1252
    (latin-1 as the last resort); whitespace runs become one space; long captions are cut."""
    notes: list[str] = []
    if raw is None:
        return None, notes
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            notes.append("caption_not_utf8")
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
    else:
        text = raw
        if any(0xDC80 <= ord(c) <= 0xDCFF for c in text):  # surrogate-escaped bytes
            notes.append("caption_not_utf8")
            text = text.encode("utf-8", "surrogateescape").decode("latin-1")
    text = " ".join(text.replace("\x00", " ").split())
    if not text:
        return None, notes
    if len(text) > max_chars:
        notes.append("caption_truncated")
        text = text[:max_chars].rstrip()
    return text, notes


def to_rgb8(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL mode -> 8-bit RGB; alpha is composited on white. Returns (image, notes)."""
    notes: list[str] = []
    mode = img.mode
    if mode == "RGB":
        return img, notes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append("high_bit_depth_converted")
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(1.0, float(arr.max())) if arr.max() > 1.0 else 1.0
        arr = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), notes
    if mode == "P":
        notes.append("palette_converted")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("alpha_composited_on_white")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    if mode == "CMYK":
        notes.append("cmyk_converted")
    elif mode in ("L", "1"):
        notes.append("greyscale_converted")
    elif mode != "RGB":
        notes.append(f"{mode.lower()}_converted")
    return img.convert("RGB"), notes


def _pyramid(img: Image.Image, sizes: list[int], ext: str) -> dict[str, bytes]:
    """Smaller copies of a square image, keyed ``<size>.<ext>`` (sizes >= the image skipped).

    Each is resized from the full image (LANCZOS), so every level is as sharp as a direct
    downsample; the loader then decodes a 64 px copy for base64 instead of a 1024 px image.
    """
    out: dict[str, bytes] = {}
    for r in sorted(set(sizes)):
        if r >= img.size[0]:
            continue
        buf = io.BytesIO()
        small = img.resize((r, r), Image.Resampling.LANCZOS)
        if ext == "jpg":
            small.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        else:
            small.save(buf, format="PNG", compress_level=3)
        out[f"{r}.{ext}"] = buf.getvalue()
    return out


def decode_image(
    data: bytes, at_least: int | None = None
) -> tuple[Image.Image | None, str | None, str, str]:
    """Image bytes -> (image, source format, rejection reason or "", detail).

    With ``at_least``, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale whose short
    side is still at least that (libjpeg's DCT scaling): a 4000x3000 photo for 1024 px shards
    decodes 2.5x faster, and the size it had is in ``img.info["original_size"]``.
    """
    if len(data) == 0:
        return None, None, "empty_file", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, size = img.format, img.size
            if at_least and fmt == "JPEG":
                img.draft(img.mode, (at_least, at_least))
            img.load()
            img.info["original_size"] = size
    except UnidentifiedImageError:
        return None, None, "not_an_image", ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, None, "image_too_large", str(e)[:200]
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return None, None, "truncated_or_corrupt_image", str(e)[:200]
    return img, fmt, "", ""


def normalise_image(img: Image.Image, cfg: DataConfig) -> tuple[Image.Image, list[str]]:
    """EXIF rotation, 8-bit RGB, center-crop to a square, downsize to data.image_size; returns
    the image and what was changed (the caller checks min_resolution before cropping)."""
    notes: list[str] = []
    try:
        if img.getexif().get(0x0112, 1) not in (0, 1):  # EXIF Orientation says "rotate me"
            img = ImageOps.exif_transpose(img)
            notes.append("exif_rotated")
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    img, mode_notes = to_rgb8(img)
    notes += mode_notes
    w, h = img.size
    if min(w, h) < cfg.min_resolution:
        return img, notes
    if w != h:  # center crop to a square
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append("center_cropped")
    if img.size[0] > cfg.image_size:
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)
        notes.append("resized")
    return img, notes


def encode_image(img: Image.Image, src_format: str | None, raw: Any, changed: bool) -> tuple:
    """(extension, bytes): a JPEG or PNG source keeps its bytes when unchanged (8-bit RGB,
    square, no larger than data.image_size); a changed JPEG is re-encoded as JPEG once;
    everything else is stored as PNG (no JPEG artefacts on synthetic images)."""
    if src_format in ("JPEG", "PNG") and not changed:  # re-encoding a 1024 px PNG: ~30 ms
        return ("jpg" if src_format == "JPEG" else "png"), bytes(raw)
    buf = io.BytesIO()
    if src_format == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG", compress_level=3)
    return "png", buf.getvalue()


def process(rec: RawRecord, cfg: DataConfig) -> Result:
    """Check and normalise one record into a webdataset sample, or say why it is rejected."""
    extra = dict(rec.extra)
    key, image, caption = rec.key, rec.image, rec.caption
    if rec.embedded_index is not None:
        # generated data cannot be bad input: a failure here is a bug and stops the run
        item = _embedded_item(cfg, rec.split or "train", rec.embedded_index)
        key, image, caption = clean_key(str(item["key"])), item["image"], item["caption"]
        extra["attributes"] = item.get("attributes", {})
    res = Result(key, rec.origin, rec.split)
    for blob in rec.members.values():
        try:
            safe_loads(blob)  # only to refuse what is unsafe: precache checks the contents
        except BadRecord as e:
            res.reason, res.detail = e.reason, e.detail
            return res
    text, res.notes = normalise_caption(caption, cfg.max_caption_chars)
    if text is None:
        res.reason = "missing_caption" if caption is None else "empty_caption"
        return res
    if image is None:
        res.reason, res.detail = "missing_image", ",".join(extra.pop("missing_image", []))
        return res
    img, src_format = image, None
    if isinstance(image, bytes | bytearray):
        at_least = max(cfg.image_size, cfg.min_resolution)
        img, src_format, res.reason, res.detail = decode_image(image, at_least)
        if img is None:
            return res
        res.reason = None
    orig_size, orig_mode = tuple(img.info.get("original_size", img.size)), img.mode
    if img.size != orig_size:  # decoded at a reduced scale: never stored as the source bytes
        res.notes.append("resized")
    img, notes = normalise_image(img, cfg)
    res.notes += notes
    if min(img.size) < cfg.min_resolution:
        w, h = img.size
        res.reason, res.detail = "below_min_resolution", f"{w}x{h} < {cfg.min_resolution}"
        return res
    ext, data = encode_image(img, src_format, image, changed=bool(notes))
    meta = {
        "source": rec.origin,
        "original_size": list(orig_size),
        "original_mode": orig_mode,
        "original_format": src_format,
        "size": list(img.size),
        "normalised": sorted(set(res.notes)),
        **extra,
    }
    res.sample = {
        "__key__": key,
        ext: data,
        **_pyramid(img, cfg.pyramid, ext),
        **rec.members,
        "txt": text.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode(),
    }
    return res


def _process_star(args: tuple[RawRecord, DataConfig]) -> Result:
    return process(*args)
