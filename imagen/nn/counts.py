"""``imagen presets``: the UNet presets with their parameter counts (built on the meta device).

imagen presets           a table: name, NeMo config, UNet type, image size, attention, count,
                         published size
imagen presets --json    {"500m_res_64": 524897540, ...} for every preset
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from imagen.presets import PRESET_SIZE_EXCEPTIONS, PRESETS, PUBLISHED_SIZES_M


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print {preset: parameter count} as JSON"
    )
    parser.add_argument(
        "--text-embed-dim",
        type=int,
        default=1024,
        help="text feature dim the counts assume (default: %(default)s, as published)",
    )


def preset_counts(text_embed_dim: int = 1024) -> dict[str, int]:
    """Parameter count of every preset, in PRESETS order."""
    from imagen.nn import preset_parameter_count

    return {name: preset_parameter_count(name, text_embed_dim) for name in PRESETS}


def main(args: argparse.Namespace, params: Any = None) -> int:
    counts = preset_counts(args.text_embed_dim)
    if args.json:
        print(json.dumps(counts))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"UNet presets (text embed dim {args.text_embed_dim})")
    for col in ("preset", "NeMo config", "unet_type", "image size", "attention"):
        table.add_column(col, no_wrap=True)
    for col in ("parameters", "published", "difference"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, count in counts.items():
        unet = PRESETS[name]["unet"]
        published = PUBLISHED_SIZES_M.get(name)
        pub = diff = "-"
        if published is not None:
            pub = f"{published:,.0f}M"
            diff = f"{(count / 1e6 / published - 1) * 100:+.1f}%"
            if name in PRESET_SIZE_EXCEPTIONS:
                diff += " *"
        table.add_row(
            name,
            PRESETS[name].get("nemo_config", "-"),
            PRESETS[name]["unet_type"],
            f"{unet['image_size']}x{unet['image_size']}",
            unet.get("attention_type", "fused"),
            f"{count / 1e6:,.1f}M",
            pub,
            diff,
        )
    console = Console(width=max(Console().width, 125))
    console.print(table)
    for name, why in PRESET_SIZE_EXCEPTIONS.items():
        console.print(f"* {name}: {why}")
    return 0
