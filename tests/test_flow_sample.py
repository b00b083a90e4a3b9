"""The imagen-sample flow's command line: the options it passes to ``imagen sample`` and the
parameters it refuses before any work, naming them (the served flow itself runs in
tests/test_flow.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.sample import sample_command
from imagen.cli import build_parser
from imagen.config import ConfigError


def test_the_command_is_imagen_sample_with_every_option_given() -> None:
    cmd = sample_command(
        ["a red circle", "a blue square"],
        Path("/tmp/out"),
        negative=["red", "blue"],
        depth="sr256",
        num_images=2,
        seed=5,
        steps="base64=4",
        guidance=3,
        sampler="euler",
    )
    assert cmd[1:4] == ["-m", "imagen.cli", "sample"]
    args = build_parser("sample").parse_args(cmd[3:])
    assert args.prompts == ["a red circle", "a blue square"]
    assert args.negative == ["red", "blue"]
    assert (args.depth, args.num_images, args.seed) == ("sr256", 2, 5)
    assert (args.steps, args.guidance, args.sampler) == ("base64=4", "3", "euler")
    assert args.out == "/tmp/out" and args.no_progress


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"negative": ["a", "b", "c"]}, "negative"),
        ({"depth": "sr512"}, "depth"),
        ({"num_images": 0}, "num_images"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        sample_command(["a red circle", "a blue square"], Path("/tmp/out"), **kwargs)
    with pytest.raises(ConfigError, match="^prompts: "):
        sample_command([], Path("/tmp/out"))
