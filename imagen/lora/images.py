"""The pictures to teach: a folder in any layout ingest reads, checked before any work.

``captions.csv`` (``file,caption``), ``captions.jsonl``, ``metadata.csv`` / ``metadata.jsonl``
(``file_name,text``) or a ``.txt`` beside each image, read by
ingest's own folder reader (:mod:`imagen.data.sources`) and normalised as ingest does (EXIF
rotation, 8-bit RGB, centre square). A folder that is missing, holds no image, or holds an image
without a caption or one that cannot be read is an error naming the folder and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imagen.config import ConfigError, DataConfig


@dataclass
class TeachImages:
    """Captions and their pictures, (N, 3, R, R) in [-1, 1] at the stage's resolution."""

    captions: list[str]
    images: torch.Tensor
    files: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def read_images(folder: str | Path, resolution: int, option: str = "--images") -> TeachImages:
    """Every captioned picture of ``folder`` (in file-name order), resized to ``resolution``."""
    from PIL import Image

    from imagen.data.loader import to_tensor
    from imagen.data.normalise import decode_image, normalise_caption, normalise_image
    from imagen.data.sources import records

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{option} {folder}: not a folder (give a folder of captioned images)")
    cfg = DataConfig(
        source="folder", source_path=str(path), min_resolution=1, image_size=resolution
    )
    try:
        found = list(records(cfg, [])[0])
    except ConfigError as e:
        raise ConfigError(f"{option} {folder}: {e}") from None
    found.sort(key=lambda r: r.origin)
    captions, images, files = [], [], []
    for rec in found:
        text, _ = normalise_caption(rec.caption, cfg.max_caption_chars)
        if text is None:
            raise ConfigError(
                f"{option} {folder}: {rec.origin} has no caption (give it a line in "
                "captions.csv / captions.jsonl, or a .txt file of the same name)"
            )
        img, _, reason, detail = decode_image(bytes(rec.image or b""))
        if img is None:
            raise ConfigError(
                f"{option} {folder}: {rec.origin} is not a readable image "
                f"({reason}{': ' + detail if detail else ''})"
            )
        img, _ = normalise_image(img, cfg)  # Lanczos down to the resolution
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        captions.append(text)
        images.append(to_tensor(img))
        files.append(rec.origin)
    if not images:
        raise ConfigError(f"{option} {folder}: holds no image (jpg, png, webp, ...)")
    return TeachImages(captions, torch.stack(images), files)
