"""Inpainting: the replacement method and RePaint's resampling, on exact and tiny real models.

The exact denoiser of a two-component Gaussian mixture gives the ground truth: keeping one
coordinate at a value only one component explains, the regenerated coordinate must follow that
component, whatever the sampler and preconditioning. A tiny random cascade shows the kept region
is the input image to the pixel at the base stage and through an SR stage, and ``imagen sample
--image --mask`` writes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_tiny_cascade, shrink, write_params

from imagen.cli import main as cli_main
from imagen.config import ConfigError, DDPMConfig, EDMConfig, SamplingConfig
from imagen.diffusion import DDPMDenoiser, EDMDenoiser, Inpaint, fit_image, fit_mask, sample
from imagen.diffusion.analytic import GaussianMixture, exact_net
from imagen.sample.cascade import Cascade

F64 = torch.float64
N = 400


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(threads)


def _mixture() -> GaussianMixture:
    # component A around (-1, 0.6), B around (1, -0.6); 0.1 variance: 6 standard deviations apart
    means = torch.tensor([[-1.0, 0.6], [1.0, -0.6]], dtype=F64)
    return GaussianMixture([0.3, 0.7], means, 0.1 * torch.eye(2, dtype=F64).expand(2, 2, 2))


def _inpaint_mixture(kind: str, sampler: str, resample: int) -> torch.Tensor:
    """N samples of the mixture with x[0] kept at -1 (only component A explains it)."""
    target = _mixture()
    if kind == "EDM":
        den = exact_net(target, EDMDenoiser, config=EDMConfig())
    else:
        den = exact_net(target, DDPMDenoiser, config=DDPMConfig(pred_objective="v"))
    known = torch.tensor([-1.0, 0.0], dtype=F64).expand(N, 2)
    regenerate = torch.tensor([False, True]).expand(N, 2)
    schedule = "karras" if sampler in ("heun", "euler", "dpmpp_2m") else "auto"
    cfg = SamplingConfig(sampler=sampler, steps=40, guidance_scale=1.0, schedule=schedule)
    x = sample(den, (N, 2), sampling=cfg, seed=1, dtype=F64,
               inpaint=Inpaint(known, regenerate, resample))  # fmt: skip
    assert torch.equal(x[:, 0], known[:, 0])  # kept exactly
    return x[:, 1]


@pytest.mark.parametrize(
    ("kind", "sampler"), [("EDM", "heun"), ("EDM", "dpmpp_2m"), ("DDPM", "ddpm"), ("DDPM", "ddim")]
)
def test_regenerated_coordinate_follows_the_kept_one(kind: str, sampler: str) -> None:
    y = _inpaint_mixture(kind, sampler, 1)
    # Unconditionally 70% of samples come from B: P(x[1] > 0) = .31, mean -0.24. Given
    # x[0] = -1 they come from A, x[1] ~ N(0.6, 0.1): P(x[1] > 0) = .97. The replacement method
    # is approximate (measured at 4000 samples: mean .26-.41, P .77-.92 over the samplers).
    assert (y > 0).double().mean() > 0.7 and y.mean() > 0.2, ((y > 0).double().mean(), y.mean())


def test_resampling_moves_closer_to_the_conditional() -> None:
    # RePaint's jumps back let the regenerated coordinate catch up with the kept one: at 4000
    # samples the mean of x[1] goes from .27 (r = 1) to .44 (r = 3) and P(x[1] > 0) from .79
    # to .96; the truth is .6 and .97
    plain, resampled = _inpaint_mixture("EDM", "euler", 1), _inpaint_mixture("EDM", "euler", 3)
    assert float(resampled.mean()) - float(plain.mean()) > 0.1, (plain.mean(), resampled.mean())
    assert (resampled > 0).double().mean() > (plain > 0).double().mean() + 0.08


def test_bad_inpaint_arguments_fail_clearly() -> None:
    den = exact_net(_mixture(), EDMDenoiser, config=EDMConfig())
    known, regenerate = torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=torch.bool)
    cfg = SamplingConfig(sampler="dpmpp_2m", steps=2)
    with pytest.raises(ValueError, match="multistep and cannot jump back"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate, 2))
    with pytest.raises(ValueError, match="resample: got 0"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate, 0))
    with pytest.raises(ValueError, match="mask"):
        sample(den, (2, 2), sampling=cfg, inpaint=Inpaint(known, regenerate[:1], 1))


def test_fit_mask_keeps_thin_strokes() -> None:
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 10, 20] = True  # one pixel at 64 px is still regenerated at 16 px
    small = fit_mask(mask, 16)
    assert small.shape == (1, 1, 16, 16) and small.sum() == 1 and small[0, 0, 2, 5]
    assert torch.equal(fit_mask(small, 32)[0, 0, 4:6, 10:12], torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------ a tiny real cascade
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Random base64 (16 px) and sr256 (16 -> 32 px) stage files, params.yaml, a picture and
    a mask (32 px: the base stage sees them resized, sr256 at their size)."""
    root = tmp_path_factory.mktemp("inpaint")
    make_tiny_cascade(root, ("base64", "sr256"))
    params = write_params(shrink(root, stages=("base64", "sr256")), root / "params.yaml")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "img.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 4:28] = 255  # white: regenerate
    Image.fromarray(mask).save(root / "mask.png")
    return root, params


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _sample(root, params, *args: str) -> int:
    return cli_main(
        ["sample", "a red circle", "--params", str(params), "--no-progress",
         "--image", str(root / "img.png"), "--mask", str(root / "mask.png"), *args]
    )  # fmt: skip


def test_sample_keeps_the_picture_outside_the_mask_at_every_stage(tiny, tmp_path, capsys):
    root, params = tiny
    out = tmp_path / "out"
    args = ("--depth", "sr256", "--out", str(out), "--seed", "3", "--resample", "base64=2")
    assert _sample(root, params, *args) == 0
    picture = torch.from_numpy(_pixels(root / "img.png")).permute(2, 0, 1)[None] / 127.5 - 1
    regenerate = torch.from_numpy(_pixels(root / "mask.png")[..., 0] >= 128)[None, None]
    for stage, res in (("base64", 16), ("sr256", 32)):
        (png,) = (out / stage).glob("*.png")
        got = _pixels(png)
        known = fit_image(picture.float(), res)[0].add(1).mul(127.5).round().permute(1, 2, 0)
        regen = fit_mask(regenerate, res)[0, 0].numpy()
        assert regen.any() and not regen.all()
        # the kept region is the picture at the stage's resolution, to the pixel
        assert np.array_equal(got[~regen], known.numpy().astype(np.int16)[~regen]), stage
        # the masked region is new: a random net does not redraw random pixels
        assert np.abs(got[regen] - known.numpy()[regen]).mean() > 20, stage
    assert np.array_equal(
        _pixels(out / "sr256" / png.name)[~regen], _pixels(root / "img.png")[~regen]
    )
    assert (out / "input").is_dir() and "1 image(s)" in capsys.readouterr().out


def test_resample_runs_and_changes_the_masked_region(tiny, tmp_path) -> None:
    root, params = tiny
    common = ("--depth", "base64", "--sampler", "euler", "--steps", "3")
    assert _sample(root, params, *common, "--out", str(tmp_path / "r1")) == 0
    assert _sample(root, params, *common, "--resample", "3", "--out", str(tmp_path / "r3")) == 0
    (a,), (b,) = (list((tmp_path / r / "base64").glob("*.png")) for r in ("r1", "r3"))
    keep = ~fit_mask(torch.from_numpy(_pixels(root / "mask.png")[..., 0] >= 128)[None, None], 16)
    keep = keep[0, 0].numpy()
    assert np.array_equal(_pixels(a)[keep], _pixels(b)[keep])
    assert not np.array_equal(_pixels(a), _pixels(b))


def test_bad_inpainting_inputs_are_clear_errors(tiny, tmp_path, capsys) -> None:
    root, params = tiny
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    Image.new("L", (24, 32), 255).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    base = ["sample", "x", "--params", str(params), "--no-progress", "--depth", "base64"]
    img, mask = str(root / "img.png"), str(root / "mask.png")
    cases = [
        (["--image", str(tmp_path / "nope.png"), "--mask", mask], "--image", "no such file"),
        (["--image", str(tmp_path / "broken.png"), "--mask", mask], "--image", "not a readable"),
        (["--image", img, "--mask", str(tmp_path / "small.png")], "--mask", "24x32 px"),
        (["--image", img, "--mask", str(tmp_path / "black.png")], "--mask", "all black"),
        (["--image", img], "--image needs --mask", ""),
        (["--resample", "2"], "--resample", "only with --image"),
        (["--image", img, "--mask", mask, "--resample", "0"], "--resample", ">= 1"),
        (["--image", img, "--mask", mask, "--resample", "sr9=2"], "--resample", "unknown stage"),
        (["--image", img, "--mask", mask, "--resample", "2", "--sampler", "dpmpp_2m"],
         "stage base64", "multistep"),
        (["--image", img, "--mask", mask, "--lowres", img], "--lowres", "exclude"),
    ]  # fmt: skip
    for args, *needles in cases:
        assert cli_main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert all(n in err for n in needles), (args, err)


def test_cascade_refuses_a_mask_with_nothing_to_regenerate(tiny) -> None:
    root, _ = tiny
    cascade = Cascade.from_models_dir(root / "models", depth="base64")
    image, mask = torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="nothing to regenerate"):
        cascade.generate(["x"], inpaint_image=image, inpaint_mask=mask)
    with pytest.raises(ConfigError, match="multistep"):
        cascade.generate(["x"], inpaint_image=image, inpaint_mask=~mask, resample=2,
                         sampler="dpmpp_2m")  # fmt: skip
