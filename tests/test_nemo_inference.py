"""NeMo's inference pipeline on a tiny real cascade (16 -> 32 -> 64 px): per-stage defaults as
NeMo ships them, several images per prompt with a seed each, a user's picture super-resolved
through the SR stages (NeMo's low_res_input), the cascade stopped at a resolution, and
inference_pipeline.yaml imported and used as a profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_tiny_cascade, shrink, write_params

from imagen.cli import main as cli_main
from imagen.config import load_params, resolve_params
from imagen.embedded.dataset import EmbeddedDataset

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on the left, dark background"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("nemo_infer")
    make_tiny_cascade(tmp)
    return tmp, write_params(shrink(tmp), tmp / "params.yaml")


def sample(params: Path, out: Path, *args: str) -> int:
    return cli_main(["sample", "--params", str(params), "--out", str(out), "--no-progress", *args])


def held_out_picture(path: Path, index: int = 0) -> tuple[Path, str]:
    """A 64 px image of the embedded held-out split and its caption, as a PNG file."""
    item = EmbeddedDataset(4, seed=0, size=64, split="holdout")[index]
    item["image"].save(path)
    return path, item["caption"]


def test_stage_defaults_are_nemos_and_the_demo_keeps_its_own() -> None:
    sr = {"model": {"preset": "small_res_256"}}
    raw = {"stages": {"base64": {}, "sr256": sr, "sr1024": {"model": {"preset": "small_res_1024"}}}}
    got = {n: (s.sampling.sampler, s.sampling.steps, s.sampling.guidance_scale)
           for n, s in resolve_params(raw).stages.items()}  # fmt: skip
    assert got == {
        "base64": ("heun", 30, 7.5),
        "sr256": ("heun", 20, 8.0),
        "sr1024": ("heun", 20, 7.5),
    }
    ddpm = {"stages": {"base64": {"model": {"preconditioning_type": "DDPM"}}}}
    assert resolve_params(ddpm).stage("base64").sampling.sampler == "ddpm"
    explicit = {"stages": {"base64": {"model": {"preconditioning_type": "DDPM"},
                                      "sampling": {"sampler": "ddim"}}}}  # fmt: skip
    assert resolve_params(explicit).stage("base64").sampling.sampler == "ddim"
    demo = load_params(REPO / "params.yaml")
    assert [(s.sampling.steps, s.sampling.guidance_scale) for s in demo.stages.values()] == [
        (18, 2.0),
        (2, 1.0),
        (2, 1.0),
    ]


def test_num_images_gives_each_image_its_own_seed(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, params = tiny
    many = tmp_path / "many"
    args = ("--depth", "sr256", "--steps", "2", "--batch-size", "3")
    assert sample(params, many, PROMPT, "--num-images", "3", "--seed", "5", *args) == 0
    records = json.loads((many / "images.json").read_text())
    assert [r["seed"] for r in records] == [5, 6, 7] and {r["prompt"] for r in records} == {PROMPT}
    imgs = [np.asarray(Image.open(r["files"]["sr256"]), dtype=np.int16) for r in records]
    assert not np.array_equal(imgs[0], imgs[1])
    one = tmp_path / "one"  # image 2 of that run, alone in its batch: the same picture
    assert sample(params, one, PROMPT, "--seed", "7", *args) == 0
    alone = np.asarray(Image.open(sorted((one / "sr256").glob("*.png"))[0]), dtype=np.int16)
    assert np.abs(alone - imgs[2]).max() <= 1  # same noise; batch-size rounding at most


def test_lowres_super_resolves_a_users_picture(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, params = tiny
    picture, caption = held_out_picture(tmp_path / "held_out.png")
    out = tmp_path / "sr"
    assert sample(params, out, caption, "--lowres", str(picture), "--steps", "2") == 0
    assert not (out / "base64").exists()  # no image was generated from text
    sizes = {
        s: Image.open(next((out / s).glob("*.png"))).size for s in ("input", "sr256", "sr1024")
    }
    assert sizes == {"input": (16, 16), "sr256": (32, 32), "sr1024": (64, 64)}
    assert Image.open(out / "grid.png").width > 3 * 256  # input + two SR stages
    # the picture reaches the network: another picture, same seed, another result
    other, _ = held_out_picture(tmp_path / "other.png", index=1)
    out2 = tmp_path / "sr2"
    assert sample(params, out2, caption, "--lowres", str(other), "--steps", "2") == 0
    a, b = (np.asarray(Image.open(next((o / "sr256").glob("*.png")))) for o in (out, out2))
    assert not np.array_equal(a, b)


def test_lowres_errors_are_reported(tiny: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, params = tiny
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"nope")
    assert sample(params, tmp_path / "x", "a", "--lowres", str(bad)) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_output_res_stops_the_cascade(tiny: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, params = tiny
    out = tmp_path / "stop"
    assert sample(params, out, PROMPT, "--output-res", "32", "--steps", "2") == 0
    assert (out / "sr256").exists() and not (out / "sr1024").exists()
    assert sample(params, out, PROMPT, "--output-res", "48") == 2
    assert "no loaded stage makes 48 px" in capsys.readouterr().err


def test_inference_pipeline_profile_drives_imagen_sample(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """import-nemo --config inference_pipeline.yaml, then `imagen sample --profile` with no
    prompts: NeMo's prompts, images per prompt and guidance come from the profile."""
    _, params = tiny
    profile = tmp_path / "nemo-inference.yaml"
    conf = REPO / "tests" / "data" / "nemo_conf" / "inference_pipeline.yaml"
    argv = ["import-nemo", "--config", str(conf), "--out", str(profile), "--params", str(params)]
    assert cli_main(argv) == 0
    p = load_params(params, [f"{k}={v}" for k, v in _profile_items(profile)])
    assert p.sample.num_images == 4 and p.stage("sr256").sampling.guidance_scale == 8.0
    base = p.stage("base64").sampling  # NeMo's sampler, not the demo's interval and sigma_min
    assert base.guidance_interval is None and base.sigma_min == 0.002
    out = tmp_path / "nemo_out"
    args = ["--profile", str(profile), "-S", "sample.output_res=32", "-S", "sample.prompts=[a, b]"]
    assert sample(params, out, *args, "--steps", "1", "--batch-size", "8") == 0
    records = json.loads((out / "images.json").read_text())
    assert len(records) == 8 and [r["seed"] for r in records] == list(range(8))
    assert (out / "sr256").exists() and not (out / "sr1024").exists()
    assert torch.tensor([len(r["files"]) for r in records]).eq(2).all()


def _profile_items(path: Path) -> list[tuple[str, str]]:
    from imagen.cli import profile_overrides

    return [tuple(item.split("=", 1)) for item in profile_overrides([str(path)])]  # type: ignore[misc]
