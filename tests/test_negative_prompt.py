"""Negative prompts on a model that has learned colour: the base64 model ``make demo`` trains
(tests/data/demo_base64.pt, its weights in float16; tests/data/half_model.py made it) with
the text encoder its config builds. Naming each held-out caption's colour as the negative
prompt lowers the embedded evaluator's colour agreement against the same seeds without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagen.checkpoint import read_stage
from imagen.embedded.dataset import holdout_captions
from imagen.evaluate.metrics import Alignment
from imagen.images import to_uint8
from imagen.sample.cascade import Cascade
from imagen.text import build_default_encoder

ASSET = Path(__file__).parent / "data" / "demo_base64.pt"

pytestmark = pytest.mark.slow


def test_naming_the_colour_as_negative_prompt_lowers_colour_agreement(tmp_path: Path) -> None:
    stage, _, _ = read_stage(ASSET)
    encoder = build_default_encoder(stage.model.conditioning, tmp_path / "encoder")
    cascade = Cascade.from_files({"base64": ASSET}, encoder_path=encoder, precision="32")
    held = [(c, a) for c, a in holdout_captions(40) if "color" in a][:16]
    captions = [c for c, _ in held]
    attributes = [a for _, a in held]
    seeds = list(range(len(captions)))
    alignment = Alignment(None, embedded=True)
    found = {}
    for name, negative in (("plain", None), ("negative", [a["color"] for a in attributes])):
        with torch.random.fork_rng(devices=[]):
            images = cascade.generate(
                captions,
                depth="base64",
                seeds=seeds,
                guidance=4.0,
                negative=negative,
                batch_size=16,
            )["base64"]
        found[name] = alignment.compute(to_uint8(images), captions, attributes)["agreement_color"]
    print(f"colour agreement of {len(captions)} held-out captions at w=4: {found}")
    # the trained model follows the colour it is asked for, and turns away from it when the
    # colour is the negative prompt (measured on 32 captions: .72 -> .22)
    assert found["plain"] >= 0.5
    assert found["negative"] <= found["plain"] - 0.25
