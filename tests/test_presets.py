"""The paper presets match NeMo's published sizes; ``imagen presets`` reports them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagen.nn import preset_parameter_count
from imagen.presets import PAPER_PRESETS, PRESET_SIZE_EXCEPTIONS, PRESETS, PUBLISHED_SIZES_M

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_is_within_two_percent_of_published(name):
    count = preset_parameter_count(name, text_embed_dim=1024)
    published = PUBLISHED_SIZES_M[name] * 1e6
    deviation = abs(count / published - 1)
    if name in PRESET_SIZE_EXCEPTIONS:
        # documented: NeMo's own config counts this far from the published size
        assert deviation < 0.5, count
    else:
        assert deviation < 0.02, (name, count)


def test_small_presets_stay_tiny():
    assert preset_parameter_count("small_res_64", 256) < 3_000_000
    assert preset_parameter_count("small_res_256", 256) < 2_000_000
    assert preset_parameter_count("small_res_1024", 256) < 2_000_000


def test_presets_json_cli():
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "imagen"), "presets", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert list(counts) == list(PRESETS)
    assert counts["500m_res_64"] == preset_parameter_count("500m_res_64")
    assert all(isinstance(v, int) and v > 0 for v in counts.values())
