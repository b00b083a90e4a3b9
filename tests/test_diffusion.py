"""Preconditionings, losses, guidance, thresholding and noise augmentation on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from imagen.config import DDPMConfig, EDMConfig, ModelConfig, NoiseAugConfig
from imagen.diffusion import (
    DDPMDenoiser,
    EDMDenoiser,
    GuidedDenoiser,
    augment_lowres,
    build_denoiser,
    drop_mask,
    dynamic_threshold,
    lowres_condition,
    sample_aug_level,
    static_threshold,
)
from imagen.diffusion.analytic import GaussianMixture, exact_net

F64 = torch.float64


class ZeroNet(torch.nn.Module):
    def forward(self, x, noise_cond, **cond):
        return torch.zeros_like(x)


class RecordingNet(torch.nn.Module):
    """out = 2 * input; remembers its inputs and how often it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(
        self,
        x,
        noise_cond,
        text_embed=None,
        text_mask=None,
        lowres=None,
        aug_level=None,
        drop_text=None,
    ):
        self.calls.append({"x": x.clone(), "noise_cond": noise_cond.clone(), "drop": drop_text})
        return 2 * x


# ------------------------------------------------------------------------------------------
# EDM
# ------------------------------------------------------------------------------------------
def test_edm_with_zero_network_returns_c_skip_x() -> None:
    den = EDMDenoiser(ZeroNet(), EDMConfig(sigma_data=0.5))
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(den(x, sigma), c_skip[:, None, None, None] * x)


def test_edm_network_sees_c_in_x_and_c_noise() -> None:
    net = RecordingNet()
    den = EDMDenoiser(net, EDMConfig(sigma_data=0.5))
    x = torch.randn(2, 3)
    out = den(x, 2.0)
    c_in, c_skip, c_out = 1 / math.sqrt(4.25), 0.25 / 4.25, 2 * 0.5 / math.sqrt(4.25)
    torch.testing.assert_close(net.calls[0]["x"], c_in * x)
    torch.testing.assert_close(net.calls[0]["noise_cond"], torch.full((2,), math.log(2.0) / 4))
    torch.testing.assert_close(out, c_skip * x + c_out * 2 * c_in * x)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_edm_loss_matches_hand_computation(loss_type: str) -> None:
    # sigma = 2, sigma_data = 0.5, zero network: D = c_skip x with c_skip = 0.25 / 4.25 = 1/17
    den = EDMDenoiser(ZeroNet(), EDMConfig(sigma_data=0.5, loss_type=loss_type))
    x0 = torch.tensor([[3.0, -0.5]], dtype=F64)
    noise = torch.tensor([[0.5, 1.0]], dtype=F64)
    # x = x0 + 2 noise = [4, 1.5]; D = [4/17, 1.5/17]; D - x0 = [4/17 - 3, 1.5/17 + 0.5]
    d1, d2 = 4 / 17 - 3, 1.5 / 17 + 0.5
    weight = (4 + 0.25) / (2 * 0.5) ** 2  # (sigma^2 + sd^2) / (sigma sd)^2 = 4.25
    # NeMo's weighting: loss(sqrt(w) D, sqrt(w) x0); for l2 that is w * (D - x0)^2
    e1, e2 = math.sqrt(weight) * d1, math.sqrt(weight) * d2  # 5.70, 1.21: both > 1

    def huber(e: float) -> float:
        return 0.5 * e**2 if abs(e) < 1 else abs(e) - 0.5

    elementwise = {
        "l2": [e1**2, e2**2],
        "l1": [abs(e1), abs(e2)],
        "huber": [huber(e1), huber(e2)],
    }[loss_type]
    expected = sum(elementwise) / 2
    per, sigma = den.per_sample_loss(x0, {}, sigma=torch.tensor([2.0], dtype=F64), noise=noise)
    assert per.shape == (1,) and float(sigma) == 2.0
    assert float(per) == pytest.approx(expected, rel=1e-12)
    assert float(den.loss(x0, {}, generator=torch.Generator().manual_seed(0))) > 0


def test_edm_training_sigmas_are_log_normal() -> None:
    den = EDMDenoiser(ZeroNet(), EDMConfig(p_mean=-1.2, p_std=1.2))
    log_s = den.sample_sigma(20_000, torch.empty(0), torch.Generator().manual_seed(0)).log()
    # SE of the mean 1.2/sqrt(2e4) = 0.0085, of the std 1.2/sqrt(4e4) = 0.006; 4 SE
    assert abs(float(log_s.mean()) + 1.2) < 0.034
    assert abs(float(log_s.std()) - 1.2) < 0.024


# ------------------------------------------------------------------------------------------
# continuous DDPM
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_ddpm_loss_matches_hand_computation(objective: str, loss_type: str) -> None:
    net = RecordingNet()  # predicts 2 * x_vp
    den = DDPMDenoiser(net, DDPMConfig(pred_objective=objective, loss_type=loss_type))
    x0 = torch.tensor([[0.8, -0.4, 0.1]], dtype=F64)
    eps = torch.tensor([[0.3, 1.2, -0.7]], dtype=F64)
    t = 0.37
    theta = (t + 0.008) / 1.008 * math.pi / 2  # cosine schedule: alpha = cos, s = sin
    alpha, s = math.cos(theta), math.sin(theta)
    x_vp = [alpha * a + s * b for a, b in zip(x0[0].tolist(), eps[0].tolist(), strict=True)]
    target = {
        "noise": eps[0].tolist(),
        "x_start": x0[0].tolist(),
        "v": [alpha * e - s * a for a, e in zip(x0[0].tolist(), eps[0].tolist(), strict=True)],
    }[objective]
    diffs = [2 * v - y for v, y in zip(x_vp, target, strict=True)]
    expected = sum(d**2 if loss_type == "l2" else abs(d) for d in diffs) / 3
    per, sigma = den.per_sample_loss(x0, {}, t=torch.tensor([t], dtype=F64), noise=eps)
    assert float(per) == pytest.approx(expected, rel=1e-10)
    assert float(sigma) == pytest.approx(s / alpha, rel=1e-10)
    # noise_cond is the log-SNR, as NeMo conditions its UNet
    assert float(net.calls[0]["noise_cond"]) == pytest.approx(-2 * math.log(s / alpha), rel=1e-6)
    torch.testing.assert_close(net.calls[0]["x"][0], torch.tensor(x_vp, dtype=F64))


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
def test_ddpm_forward_inverts_each_objective(objective: str) -> None:
    # A network that outputs the true objective for (x0, eps) makes the denoiser return x0.
    x0, eps = torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    sigma = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=F64)
    alpha = (1 / (1 + sigma**2).sqrt())[:, None]
    s = sigma[:, None] * alpha

    def oracle(x_vp, noise_cond, **cond):
        torch.testing.assert_close(x_vp, alpha * x0 + s * eps)
        return {"noise": eps, "x_start": x0, "v": alpha * eps - s * x0}[objective]

    den = DDPMDenoiser(oracle, DDPMConfig(pred_objective=objective))
    torch.testing.assert_close(den(x0 + sigma[:, None] * eps, sigma), x0)


def test_ddpm_huber_and_schedule_ranges() -> None:
    den = DDPMDenoiser(ZeroNet(), DDPMConfig(pred_objective="x_start", loss_type="huber"))
    x0 = torch.tensor([[2.0, 0.5]], dtype=F64)  # zero prediction: errors 2 (linear), 0.5
    per, _ = den.per_sample_loss(x0, t=torch.tensor([0.5], dtype=F64), noise=torch.zeros_like(x0))
    assert float(per) == pytest.approx(((2 - 0.5) + 0.5 * 0.25) / 2)
    # NeMo's log-SNR at t = 0 and t = 1 (float32): cosine 8.77 / -33.9, linear 9.21 / -10.0
    for schedule, ends in (("cosine", (8.77, -33.9)), ("linear", (9.21, -10.0))):
        d = DDPMDenoiser(ZeroNet(), DDPMConfig(noise_schedule=schedule))
        log_snr = -2 * torch.log(torch.tensor([d.sigma_min, d.sigma_max], dtype=F64))
        torch.testing.assert_close(log_snr, torch.tensor(ends, dtype=F64), atol=0.01, rtol=0)


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
def test_exact_network_reproduces_the_exact_denoiser(objective: str) -> None:
    target = GaussianMixture(
        [0.4, 0.6],
        torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
        torch.stack([0.2 * torch.eye(2, dtype=F64), 0.1 * torch.eye(2, dtype=F64)]),
    )
    x = 2 * torch.randn(6, 2, dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=F64)
    ref = target.denoise(x, sigma)
    edm = exact_net(target, EDMDenoiser)
    ddpm = exact_net(target, DDPMDenoiser, config=DDPMConfig(pred_objective=objective))
    torch.testing.assert_close(edm(x, sigma), ref)
    torch.testing.assert_close(ddpm(x, sigma), ref)


def test_build_denoiser_follows_the_config() -> None:
    edm = build_denoiser(ModelConfig(preconditioning={"sigma_data": 0.7}), ZeroNet())
    assert isinstance(edm, EDMDenoiser) and edm.sigma_data == 0.7
    cfg = ModelConfig(preconditioning_type="DDPM", preconditioning={"pred_objective": "v"})
    ddpm = build_denoiser(cfg, ZeroNet())
    assert isinstance(ddpm, DDPMDenoiser) and ddpm.config.pred_objective == "v"
    assert ddpm.timesteps == 1000


def test_loss_trains_a_real_network() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    wrapped = lambda x, c, **kw: net(x)  # noqa: E731
    for den in (EDMDenoiser(wrapped), DDPMDenoiser(wrapped, DDPMConfig(pred_objective="v"))):
        net.zero_grad()
        loss = den.loss(torch.randn(8, 3), {}, torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert net[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# guidance and thresholding
# ------------------------------------------------------------------------------------------
class TextNet(torch.nn.Module):
    """Output depends on the text unless drop_text; counts forward passes and batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(
        self,
        x,
        noise_cond,
        text_embed=None,
        text_mask=None,
        lowres=None,
        aug_level=None,
        drop_text=None,
    ):
        self.batches.append(x.shape[0])
        t = text_embed.mean(dim=(1, 2))
        t = torch.where(drop_text, torch.zeros_like(t), t)
        return 0.5 * x + t[:, None, None, None] + lowres.mean() * 0.1


def _guided_setup():
    net = TextNet()
    den = EDMDenoiser(net)
    cond = {
        "text_embed": torch.randn(2, 4, 6),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
        "lowres": torch.randn(2, 3, 4, 4),
        "aug_level": torch.zeros(2),
    }
    return net, den, cond, torch.randn(2, 3, 8, 8), torch.tensor([1.5, 0.3])


def test_guidance_scale_one_is_exactly_the_conditional_prediction() -> None:
    net, den, cond, x, sigma = _guided_setup()
    guided = GuidedDenoiser(den, cond, guidance_scale=1.0)(x, sigma)
    direct = den(x, sigma, **cond, drop_text=torch.zeros(2, dtype=torch.bool))
    assert torch.equal(guided, direct)
    assert net.batches == [2, 2]  # no unconditional half was run


def test_guidance_runs_one_batched_forward_and_extrapolates() -> None:
    net, den, cond, x, sigma = _guided_setup()
    guided = GuidedDenoiser(den, cond, guidance_scale=4.0)(x, sigma)
    assert net.batches == [4]  # conditional and unconditional halves in one forward
    c = den(x, sigma, **cond, drop_text=torch.zeros(2, dtype=torch.bool))
    u = den(x, sigma, **cond, drop_text=torch.ones(2, dtype=torch.bool))
    assert not torch.allclose(c, u)
    torch.testing.assert_close(guided, u + 4.0 * (c - u))


def test_guidance_interval_guides_only_inside_it() -> None:
    """sampling.guidance_interval (lo, hi]: guided inside, the conditional prediction alone
    (one forward of batch B) outside, per sample when a batch straddles it."""
    net, den, cond, x, sigma = _guided_setup()  # sigma (1.5, 0.3)
    c = den(x, sigma, **cond, drop_text=torch.zeros(2, dtype=torch.bool))
    u = den(x, sigma, **cond, drop_text=torch.ones(2, dtype=torch.bool))
    net.batches.clear()
    out = GuidedDenoiser(den, cond, 4.0, interval=(2.0, 80.0))(x, sigma)
    assert torch.equal(out, c) and net.batches == [2]
    both = GuidedDenoiser(den, cond, 4.0, interval=(0.1, 80.0))(x, sigma)
    torch.testing.assert_close(both, u + 4.0 * (c - u))
    half = GuidedDenoiser(den, cond, 4.0, interval=(1.0, 80.0))(x, sigma)
    torch.testing.assert_close(half[0], (u + 4.0 * (c - u))[0])
    torch.testing.assert_close(half[1], c[1])


def test_dynamic_threshold_bounds_and_leaves_in_range_values() -> None:
    big = 3 * torch.randn(4, 3, 8, 8)
    out = dynamic_threshold(big, 0.995)
    assert out.abs().max() <= 1.0
    # per sample: values at or beyond the 99.5th percentile map to exactly +-1
    assert torch.allclose(out.reshape(4, -1).abs().amax(1), torch.ones(4))
    s = torch.quantile(big[0].abs().flatten(), 0.995)
    torch.testing.assert_close(out[0], big[0].clamp(-s, s) / s)
    inside = torch.rand(4, 3, 8, 8) * 2 - 1
    assert torch.equal(dynamic_threshold(inside), inside)
    assert torch.equal(static_threshold(big), big.clamp(-1, 1))


def test_thresholding_applies_inside_the_guided_denoiser() -> None:
    _, den, cond, x, sigma = _guided_setup()
    out = GuidedDenoiser(den, cond, 7.5, thresholding="dynamic")(50 * x, sigma)
    assert out.abs().max() <= 1.0
    raw = GuidedDenoiser(den, cond, 7.5, thresholding="none")(50 * x, sigma)
    assert raw.abs().max() > 1.0


def test_drop_mask_rate() -> None:
    g = torch.Generator().manual_seed(0)
    assert not drop_mask(100, 0.0, g).any() and drop_mask(100, 1.0, g).all()
    m = drop_mask(10_000, 0.1, g)
    assert m.dtype == torch.bool and m.shape == (10_000,)
    assert abs(float(m.float().mean()) - 0.1) < 4 * math.sqrt(0.09 / 10_000)  # 4 SE
    with pytest.raises(ValueError, match="drop_rate"):
        drop_mask(4, 1.5)


# ------------------------------------------------------------------------------------------
# noise conditioning augmentation
# ------------------------------------------------------------------------------------------
def test_noise_augmentation_levels() -> None:
    lowres = torch.randn(3, 3, 8, 8)
    assert torch.equal(augment_lowres(lowres, 0.0, torch.Generator().manual_seed(1)), lowres)
    eps = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(augment_lowres(lowres, 1.0, torch.Generator().manual_seed(1)), eps)
    level = torch.tensor([0.0, 0.5, 1.0])
    mixed = augment_lowres(lowres, level, torch.Generator().manual_seed(1))
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(mixed[1], c * lowres[1] + c * eps[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment_lowres(lowres, 1.5)


def test_aug_level_sampling_and_condition() -> None:
    lv = sample_aug_level(1000, 0.3, torch.Generator().manual_seed(0))
    assert lv.shape == (1000,) and lv.min() >= 0 and lv.max() < 0.3 and lv.std() > 0.05
    lowres = torch.randn(4, 3, 8, 8)
    cfg = NoiseAugConfig(enabled=True, kind="cosine_vp", max_level=0.5, sample_level=0.2)
    noisy, level = lowres_condition(lowres, cfg, training=False)
    assert torch.equal(level, torch.full((4,), 0.2)) and not torch.equal(noisy, lowres)
    _, level = lowres_condition(lowres, cfg, training=True, generator=torch.Generator())
    assert (level < 0.5).all() and level.unique().numel() == 4
    same, level = lowres_condition(lowres, NoiseAugConfig(enabled=False), training=True)
    assert torch.equal(same, lowres) and level is None


def test_edm_noise_aug_is_nemos() -> None:
    """noise_cond_aug: true -> c_in(s) (lowres + s eps), ln(s)/4; s = 0.002 at sampling and
    ln s ~ N(p_mean, p_std^2) in training (eps drawn first, then s, from one generator)."""
    m = ModelConfig.model_validate(
        {
            "unet_type": "sr",
            "noise_cond_aug": True,
            "unet": {"num_resblocks": [1, 1, 1, 1]},
            "preconditioning": {"p_mean": -0.5, "p_std": 0.8},
        }
    )
    aug = m.noise_cond_aug
    assert aug.enabled and aug.kind == "edm" and (aug.p_mean, aug.p_std) == (-0.5, 0.8)
    lowres = torch.randn(4, 3, 8, 8)
    got, level = lowres_condition(lowres, aug, training=False, generator=torch.Generator())
    eps = torch.randn(4, 3, 8, 8, generator=torch.Generator())
    c_in = 1 / math.sqrt(0.002**2 + 0.25)
    torch.testing.assert_close(got, c_in * (lowres + 0.002 * eps))
    torch.testing.assert_close(level, torch.full((4,), math.log(0.002) / 4))
    g = torch.Generator().manual_seed(3)
    _, level = lowres_condition(torch.randn(20_000, 1, 1, 1), aug, training=True, generator=g)
    log_s = 4 * level
    assert abs(float(log_s.mean()) + 0.5) < 0.03 and abs(float(log_s.std()) - 0.8) < 0.03
    with pytest.raises(ValueError, match="EDM"):
        ModelConfig.model_validate(
            {"unet_type": "sr", "noise_cond_aug": True, "preconditioning_type": "DDPM"}
        )


# ------------------------------------------------------------------------------------------
# lowres_residual: an SR stage diffusing x0 - up(lowres)
# ------------------------------------------------------------------------------------------
def _sr_model(**kw) -> ModelConfig:
    return ModelConfig(
        unet_type="sr",
        preconditioning_type="DDPM",
        preconditioning={"pred_objective": "x_start"},
        lowres_residual=True,
        **kw,
    )


def test_residual_stage_with_a_zero_residual_is_bicubic_upsampling() -> None:
    from imagen.diffusion import sr_condition, upsample_to

    model = _sr_model()
    den = build_denoiser(model, ZeroNet())
    lowres = torch.rand(2, 3, 4, 4) * 2 - 1
    x = torch.randn(2, 3, 16, 16)
    cond = sr_condition(lowres, model, training=False)
    bicubic = torch.nn.functional.interpolate(lowres, size=(16, 16), mode="bicubic")
    torch.testing.assert_close(upsample_to(lowres, x), bicubic)
    for sigma in (0.01, 1.0, 50.0):  # x_start net outputs 0: D = up(lowres) at every level
        torch.testing.assert_close(den(x, sigma, **cond), bicubic)


def test_residual_stage_trains_on_the_residual_and_keeps_state_dict_keys() -> None:
    from imagen.diffusion import LOWRES_IMAGE

    net = RecordingNet()
    model = _sr_model()
    den = build_denoiser(model, net)
    plain = DDPMDenoiser(net, DDPMConfig(pred_objective="x_start"))
    x0 = torch.randn(3, 3, 8, 8)
    lowres = torch.randn(3, 3, 2, 2)
    t, noise = torch.rand(3), torch.randn(3, 3, 8, 8)
    got, _ = den.per_sample_loss(x0, {"lowres": lowres, LOWRES_IMAGE: lowres}, t=t, noise=noise)
    up = torch.nn.functional.interpolate(lowres, size=(8, 8), mode="bicubic")
    want, _ = plain.per_sample_loss(x0 - up, {"lowres": lowres}, t=t, noise=noise)
    torch.testing.assert_close(got, want)
    # the net is the only submodule: checkpoints keep the keys of the plain stage
    assert list(den.state_dict()) == list(plain.state_dict())
    with pytest.raises(ValueError, match="lowres_image"):
        den(x0, 1.0, lowres=lowres)


def test_lowres_residual_is_refused_for_a_base_stage() -> None:
    with pytest.raises(ValueError, match="lowres_residual: only a super-resolution UNet"):
        ModelConfig(unet_type="base", lowres_residual=True)
