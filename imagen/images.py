"""Image helpers shared by training, evaluation, sampling and the dataset preview: tensor <->
PIL conversion and captioned contact sheets (the grids people look at in MLflow and reports/)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W) in [0, 255]."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [-1, 1] -> an RGB PIL image."""
    return Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy(), "RGB")


def side_by_side(images: Sequence[Image.Image], height: int) -> Image.Image:
    """Images scaled to ``height`` (nearest-neighbour when enlarging, so pixels stay visible)
    and pasted left to right: e.g. an SR stage's low-res input, its sample and the real image."""
    tiles = []
    for img in images:
        w = max(1, round(img.width * height / img.height))
        resample = Image.Resampling.NEAREST if img.height <= height else Image.Resampling.LANCZOS
        tiles.append(img.convert("RGB").resize((w, height), resample))
    sheet = Image.new("RGB", (sum(t.width for t in tiles), height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width
    return sheet


def wrap_text(
    draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont, max_lines: int
) -> list[str]:
    """Greedy word wrap to ``width`` pixels; an ellipsis marks text cut at ``max_lines``."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    cols: int | None = None,
    cell: int = 128,
    caption_lines: int = 3,
) -> Image.Image:
    """A white sheet of ``images`` scaled to ``cell`` px high, each with its caption below.

    Wide images (several views side by side) keep their aspect ratio.
    """
    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    tiles = [side_by_side([img], cell) for img in images]
    font = ImageFont.load_default()
    text_h = 12 * caption_lines + 4 if captions else 0
    cell_w = max([t.width for t in tiles] + [120 if captions else cell])
    pad = 6
    sheet = Image.new(
        "RGB", (cols * (cell_w + pad) + pad, rows * (cell + text_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (cell + text_h + pad)
        sheet.paste(tile, (x0 + (cell_w - tile.width) // 2, y0))
        if captions:
            for k, line in enumerate(wrap_text(draw, captions[i], cell_w, font, caption_lines)):
                draw.text((x0, y0 + cell + 2 + 12 * k), line, fill="black", font=font)
    return sheet


def cascade_grid(
    images: Mapping[str, torch.Tensor], prompts: Sequence[str], *, cell: int = 256
) -> Image.Image:
    """Rows = prompts, columns = stages (64 -> 256 -> 1024), every image shown at ``cell`` px.

    Each stage is resized with nearest-neighbour so a 64 px image shows its real pixels beside
    the 256 px and 1024 px ones.
    """
    # input (a given low-res image) first, then the stages in the order given
    stages = sorted(images, key=lambda s: s != "input")
    font = ImageFont.load_default()
    label_w, head_h, pad = 180, 18, 6
    width = label_w + len(stages) * (cell + pad) + pad
    height = head_h + len(prompts) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for j, stage in enumerate(stages):
        res = images[stage].shape[-1]
        draw.text((label_w + j * (cell + pad), 3), f"{stage} ({res} px)", fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y0 = head_h + i * (cell + pad)
        for k, line in enumerate(wrap_text(draw, prompt, label_w - 10, font, cell // 12)):
            draw.text((pad, y0 + 12 * k), line, fill="black", font=font)
        for j, stage in enumerate(stages):
            img = to_pil(images[stage][i])
            resample = Image.NEAREST if img.width <= cell else Image.LANCZOS
            sheet.paste(img.resize((cell, cell), resample), (label_w + j * (cell + pad), y0))
    return sheet
