"""Cascade sampling and `imagen sample` on a tiny real cascade (16 -> 32 -> 64 px)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import make_tiny_cascade, shrink, write_params

from imagen.cli import main as cli_main
from imagen.config import ConfigError
from imagen.sample.cascade import Cascade, parse_stage_values

PROMPTS = ["a large red circle on the left, dark background", "a small blue square at the top"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cascade")
    params = make_tiny_cascade(tmp)
    return tmp, params, Cascade.from_models_dir(params.models_dir)


def test_generate_runs_every_stage_at_its_resolution(tiny) -> None:
    _, _, cascade = tiny
    out = cascade.generate(PROMPTS, seed=0, batch_size=2)
    assert list(out) == ["base64", "sr256", "sr1024"]
    for stage, res in (("base64", 16), ("sr256", 32), ("sr1024", 64)):
        assert out[stage].shape == (2, 3, res, res)
        assert out[stage].min() >= -1 and out[stage].max() <= 1
        assert torch.isfinite(out[stage]).all()


def test_same_seed_same_images_other_seed_other_images(tiny) -> None:
    _, _, cascade = tiny
    a = cascade.generate(PROMPTS, depth="sr256", seed=3, batch_size=1)
    b = cascade.generate(PROMPTS, depth="sr256", seed=3, batch_size=1)
    c = cascade.generate(PROMPTS, depth="sr256", seed=4, batch_size=1)
    for stage in a:
        assert torch.equal(a[stage], b[stage])
        assert not torch.equal(a[stage], c[stage])


def test_bf16_sampling_stays_close_to_fp32(tiny) -> None:
    """sample.precision bf16 (the default on CUDA) gives the fp32 images within bf16 rounding;
    "auto" is fp32 on the CPU."""
    tmp, params, _ = tiny
    fp32 = Cascade.from_models_dir(params.models_dir)
    assert not fp32.bf16  # auto on the CPU
    bf16 = Cascade.from_models_dir(params.models_dir, precision="bf16")
    a = fp32.generate(PROMPTS, seed=5, batch_size=2)
    b = bf16.generate(PROMPTS, seed=5, batch_size=2)
    for stage in a:
        assert b[stage].dtype == torch.float32
        diff = (a[stage] - b[stage]).abs()
        assert float(diff.max()) > 0  # autocast really ran in bf16
        assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1, (stage, diff.mean())
    with pytest.raises(ConfigError, match="sample.precision"):
        fp32.set_precision("fp16")


def test_overrides_per_stage_change_the_samples(tiny) -> None:
    _, _, cascade = tiny
    base = cascade.generate(PROMPTS[:1], depth="base64", seed=0)["base64"]
    guided = cascade.generate(PROMPTS[:1], depth="base64", seed=0, guidance={"base64": 6.0})
    assert not torch.allclose(base, guided["base64"])
    # an override for another stage leaves this one alone
    same = cascade.generate(PROMPTS[:1], depth="base64", seed=0, steps={"sr256": 9})
    assert torch.equal(base, same["base64"])


def test_noise_aug_override_reaches_the_sr_stage(tmp_path: Path) -> None:
    # an SR stage trained with noise conditioning augmentation sees its low-res input through
    # the sampling level (the demo's SR stages train without it)
    aug = {"sr256": {"model": {"noise_cond_aug": {"enabled": True, "kind": "cosine_vp"}}}}
    params = make_tiny_cascade(tmp_path, ("base64", "sr256"), {"stages": aug})
    cascade = Cascade.from_models_dir(params.models_dir, depth="sr256")
    lo = cascade.generate(PROMPTS[:1], depth="sr256", seed=0, noise_aug=0.002)["sr256"]
    hi = cascade.generate(PROMPTS[:1], depth="sr256", seed=0, noise_aug=0.9)["sr256"]
    assert not torch.allclose(lo, hi)


def test_bad_overrides_fail_clearly(tiny) -> None:
    _, _, cascade = tiny
    with pytest.raises(ConfigError, match="sampler"):
        cascade.generate(PROMPTS[:1], depth="base64", sampler="nope")
    with pytest.raises(ConfigError, match="depth"):
        cascade.generate(PROMPTS[:1], depth="sr2048")


def test_parse_stage_values() -> None:
    assert parse_stage_values("30", int, "--steps") == 30
    assert parse_stage_values("base64=30, sr256=20", int, "--steps") == {
        "base64": 30,
        "sr256": 20,
    }
    assert parse_stage_values(None, int, "--steps") is None
    with pytest.raises(ConfigError, match="unknown stage 'sr512'"):
        parse_stage_values("sr512=3", int, "--steps")
    with pytest.raises(ConfigError, match="not a float"):
        parse_stage_values("base64=abc", float, "--guidance")


def test_partial_cascade_and_missing_stage_message(tmp_path: Path) -> None:
    params = make_tiny_cascade(tmp_path, stages=("base64",))
    cascade = Cascade.from_models_dir(params.models_dir, depth="base64")
    assert list(cascade.generate(PROMPTS[:1], seed=0)) == ["base64"]
    with pytest.raises(FileNotFoundError, match=r"imagen train --stage sr256"):
        Cascade.from_models_dir(params.models_dir, depth="sr1024")


def test_sample_command_writes_pngs_and_grid(tiny, tmp_path: Path, capsys) -> None:
    root, params, _ = tiny
    yaml_path = write_params(shrink(root), tmp_path / "params.yaml")
    out = tmp_path / "samples"
    rc = cli_main(
        [
            "sample", *PROMPTS, "--params", str(yaml_path), "--out", str(out),
            "--depth", "sr256", "--steps", "base64=2,sr256=1", "--guidance", "base64=3",
            "--sampler", "base64=heun", "--noise-aug", "0.2", "--seed", "1", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    for stage, res in (("base64", 16), ("sr256", 32)):
        files = sorted((out / stage).glob("*.png"))
        assert len(files) == 2
        assert Image.open(files[0]).size == (res, res)
    assert not (out / "sr1024").exists()
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 256 and grid.height > 2 * 256  # two stages x two prompts
    assert "2 prompt(s)" in capsys.readouterr().out


def test_sample_command_names_the_missing_stage(tmp_path: Path, capsys) -> None:
    raw = shrink(tmp_path)
    yaml_path = write_params(raw, tmp_path / "params.yaml")
    rc = cli_main(["sample", "a red circle", "--params", str(yaml_path), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "base64" in err and "imagen train --stage base64" in err
