"""Autoguidance and negative prompts on a tiny real cascade (random-weight 16 px base stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import CORES, make_tiny_cascade, shrink, write_params

from imagen.checkpoint import read_stage, save_stage
from imagen.cli import main as cli_main
from imagen.config import ConfigError, SamplingConfig
from imagen.diffusion import SAMPLERS
from imagen.diffusion.guidance import GuidedDenoiser
from imagen.sample.cascade import Cascade

PROMPTS = ["a large red circle on the left, dark background", "a small blue square at the top"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A base64-only cascade, a weaker guide (its weights moved) as a model file and as a
    training checkpoint of the training module's state dict."""
    torch.set_num_threads(CORES)
    tmp = tmp_path_factory.mktemp("guidance")
    params = make_tiny_cascade(tmp, stages=("base64",))
    main = Path(params.models_dir) / "base64" / "model.pt"
    stage, state, _ = read_stage(main)
    gen = torch.Generator().manual_seed(7)
    weaker = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in state.items()
    }
    guide = save_stage(tmp / "guide", stage, weaker, step=0)
    from imagen.train.module import ImagenStage

    module = ImagenStage(stage)
    module.ema.module.load_state_dict(weaker)
    meta = {"stage": stage.model_dump(mode="json")}  # what on_save_checkpoint adds
    ckpt = {"state_dict": module.state_dict(), "global_step": 3, "imagen": meta}
    ckpt_path = tmp / "step=0000003.ckpt"
    torch.save(ckpt, ckpt_path)
    cascade = Cascade.from_models_dir(params.models_dir, depth="base64")
    return tmp, params, cascade, main, guide, ckpt_path


def _base(cascade: Cascade, **kw) -> torch.Tensor:
    kw = {"depth": "base64", "seed": 3, "batch_size": 2, **kw}
    return cascade.generate(PROMPTS, **kw)["base64"]


def test_autoguidance_is_guide_plus_w_times_the_difference(tiny) -> None:
    """D_guide(x; c) + w (D_main(x; c) - D_guide(x; c)), both on the same text."""
    _, _, cascade, _, guide_file, _ = tiny
    cascade.set_guide(guide_file)
    stage = cascade.stages["base64"]
    embed, mask = cascade.encode(PROMPTS)
    cond = {"text_embed": embed, "text_mask": mask}
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([2.0, 0.5])
    out = GuidedDenoiser(stage.denoiser, cond, 2.5, guide=stage.guide)(x, sigma)
    keep = torch.zeros(2, dtype=torch.bool)
    d_main = stage.denoiser(x, sigma, **cond, drop_text=keep)
    d_guide = stage.guide(x, sigma, **cond, drop_text=keep)
    assert not torch.allclose(d_main, d_guide)
    torch.testing.assert_close(out, d_guide + 2.5 * (d_main - d_guide))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_autoguidance_with_every_sampler(tiny, sampler: str) -> None:
    """w = 1 is the main model's sample exactly; a guide equal to the main model gives the
    main model's sample at any w; a weaker guide changes it."""
    _, _, cascade, main, guide_file, _ = tiny
    common = {"sampler": sampler, "steps": 3}
    plain = _base(cascade, guidance=1.0, **common)
    cascade.set_guide(guide_file)
    assert torch.equal(_base(cascade, guidance=1.0, guidance_kind="auto", **common), plain)
    guided = _base(cascade, guidance=3.0, guidance_kind="auto", **common)
    assert not torch.allclose(guided, plain)
    cascade.set_guide(main)  # the guide is the main model itself
    assert torch.equal(_base(cascade, guidance=3.0, guidance_kind="auto", **common), plain)


def test_autoguidance_respects_the_guidance_interval(tiny) -> None:
    _, _, cascade, _, guide_file, _ = tiny
    cascade.set_guide(guide_file)
    stage = cascade.stages["base64"]
    config = stage.config
    plain = _base(cascade, guidance=1.0)
    outside = (1e-4, 1e-3)  # no step's noise level lies inside: the main model alone
    inside = (0.0, 1e3)
    try:
        for interval, same in ((outside, True), (inside, False)):
            sampling = config.sampling.model_copy(update={"guidance_interval": interval})
            stage.config = config.model_copy(update={"sampling": sampling})
            out = _base(cascade, guidance=3.0, guidance_kind="auto")
            assert torch.equal(out, plain) is same
    finally:
        stage.config = config


def test_guide_from_a_training_checkpoint_is_its_ema_weights(tiny) -> None:
    _, _, cascade, _, guide_file, ckpt = tiny
    cascade.set_guide(guide_file)
    from_model = _base(cascade, guidance=3.0, guidance_kind="auto")
    cascade.set_guide(ckpt)
    assert torch.equal(_base(cascade, guidance=3.0, guidance_kind="auto"), from_model)


def test_bad_guides_fail_naming_the_key(tiny, tmp_path: Path) -> None:
    _, _, cascade, _, _, _ = tiny
    with pytest.raises(ConfigError, match=r"--guide=.*nope.ckpt: no such file"):
        cascade.set_guide(tmp_path / "nope.ckpt")
    stage = cascade.stages["base64"]
    missing = str(tmp_path / "missing")
    sampling = stage.config.sampling.model_copy(update={"guidance": "auto", "guide": missing})
    with pytest.raises(ConfigError, match=r"stages\.base64\.sampling\.guide=.*missing"):
        cascade.sample_stage("base64", *cascade.encode(PROMPTS), sampling=sampling)
    with pytest.raises(ValueError, match="guide"):
        SamplingConfig(guidance="auto")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"--guide=.*junk.ckpt: not a readable"):
        cascade.set_guide(tmp_path / "junk.ckpt")


def test_negative_prompt_replaces_the_null_text(tiny) -> None:
    """CFG's unconditional branch is the negative prompt's encoding (by hand on one step);
    an empty negative is the null text, i.e. plain CFG exactly."""
    _, _, cascade, _, _, _ = tiny
    den = cascade.stages["base64"].denoiser
    embed, mask = cascade.encode(PROMPTS)
    neg_embed, neg_mask = cascade.encode(["red", ""])
    cond = {"text_embed": embed, "text_mask": mask}
    negative = {"text_embed": neg_embed, "text_mask": neg_mask, "null": torch.tensor([0, 1])}
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([2.0, 0.5])
    out = GuidedDenoiser(den, cond, 4.0, negative=negative)(x, sigma)
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    c = den(x, sigma, **cond, drop_text=keep)
    u_neg = den(x, sigma, text_embed=neg_embed, text_mask=neg_mask, drop_text=keep)
    u_null = den(x, sigma, **cond, drop_text=drop)
    torch.testing.assert_close(out[0], (u_neg + 4.0 * (c - u_neg))[0])
    torch.testing.assert_close(out[1], (u_null + 4.0 * (c - u_null))[1])
    plain = _base(cascade, guidance=4.0)
    assert torch.equal(_base(cascade, guidance=4.0, negative=[""]), plain)
    assert not torch.allclose(_base(cascade, guidance=4.0, negative=["red"]), plain)
    with pytest.raises(ConfigError, match="3 negative prompts for 2 prompts"):
        _base(cascade, negative=["a", "b", "c"])


def test_sample_command_negative_and_guide(tiny, tmp_path: Path, capsys) -> None:
    root, _, _, _, guide_file, _ = tiny
    yaml_path = write_params(
        shrink(root, {"models_dir": str(root / "models")}), tmp_path / "p.yaml"
    )
    base = ["sample", *PROMPTS, "--params", str(yaml_path), "--depth", "base64", "--no-progress"]
    rc = cli_main([*base, "--out", str(tmp_path / "neg"), "--negative", "red", "--negative", ""])
    assert rc == 0
    rc = cli_main([*base, "--out", str(tmp_path / "ag"), "--guide", str(guide_file)])
    assert rc == 0
    for out in ("neg", "ag"):
        records = json.loads((tmp_path / out / "images.json").read_text())
        assert [Image.open(r["files"]["base64"]).size for r in records] == [(16, 16)] * 2
    capsys.readouterr()
    rc = cli_main([*base, "--negative", "a", "--negative", "b", "--negative", "c"])
    assert rc == 2 and "--negative: 3 negative prompts for 2 prompts" in capsys.readouterr().err
    rc = cli_main([*base, "--guide", str(tmp_path / "none.ckpt")])
    assert rc == 2 and "--guide=" in capsys.readouterr().err
    rc = cli_main([*base, "--guide", str(guide_file), "--negative", "red"])
    assert rc == 2 and "autoguidance" in capsys.readouterr().err


def test_a_guide_of_another_shape_is_refused(tiny) -> None:
    """A guide that does not fit (another resolution) is refused, naming the key."""
    tmp, _, cascade, main, _, _ = tiny
    stage, state, _ = read_stage(main)
    other = stage.model_copy(update={"resolution": 32})
    save_stage(tmp / "wrong", other, state)
    with pytest.raises(ConfigError, match=r"evaluate\.guide=.*resolution is 32"):
        cascade.set_guide(tmp / "wrong", key="evaluate.guide")
