"""On the same weights the project computes what NeMo's Imagen computes (nemo_toolkit 2.4.0).

Each test builds NeMo's module and the project's from one config, perturbs every NeMo
parameter (its zero-initialised output layers included, or the comparison would prove little),
copies the weights with the project's converter (imagen.nemo.convert) and compares outputs.
Skipped when nemo_toolkit is not installed (``make install`` installs it).
"""

from __future__ import annotations

import nemo_oracle
import pytest
import torch

try:
    NEMO = nemo_oracle.load()
except ImportError as e:  # pragma: no cover - depends on the install
    pytest.skip(
        f"NeMo oracle unavailable ({e}); pip install --no-deps nemo_toolkit==2.4.0 einops",
        allow_module_level=True,
    )

from imagen.config import DDPMConfig, EDMConfig, SamplingConfig  # noqa: E402
from imagen.diffusion import (  # noqa: E402
    DDPMDenoiser,
    EDMDenoiser,
    GuidedDenoiser,
    dynamic_threshold,
    lowres_condition,
    sample_ddpm,
    sample_heun,
)
from imagen.diffusion.schedules import log_snr_cosine, log_snr_linear  # noqa: E402
from imagen.nemo.convert import load_nemo_weights, model_config_from_nemo  # noqa: E402
from imagen.nn import build_unet, count_parameters, preset_parameter_count  # noqa: E402
from imagen.presets import PAPER_PRESETS, PRESETS  # noqa: E402

TEXT_DIM = 32
FP32 = {"atol": 2e-5, "rtol": 1e-4}

# (max abs error per case) collected for the report printed at the end of the module
ERRORS: dict[str, float] = {}


def _record(case: str, a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.double() - b.double()).abs().max())
    ERRORS[case] = max(err, ERRORS.get(case, 0.0))
    return err


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if ERRORS:
        width = max(len(k) for k in ERRORS)
        print("\nNeMo parity, max abs error:")
        for case, err in ERRORS.items():
            print(f"  {case:<{width}}  {err:.2e}")


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add N(0, scale^2) to every parameter (zero-initialised layers become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


REGULAR = dict(
    embed_dim=32,
    image_size=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    num_attn_heads=2,
    per_head_channels=16,
    cond_dim=32,
    attention_resolutions=[8],
    learned_sinu_pos_emb_dim=0,
)
EFFICIENT = dict(
    embed_dim=32,
    image_size=16,
    channel_mult=[1, 2, 2],
    num_resblocks=[1, 2, 1],
    atnn_enabled_at=[0, 1, 1],
    num_attn_heads=2,
    per_head_channels=16,
    learned_sinu_pos_emb_dim=0,
    skip_connection_scaling=True,
)


def build_pair(unet_type: str, unet: dict, noise_cond_aug: bool = False, seed: int = 1):
    """(NeMo's UNet, the project's UNet with NeMo's weights, the project ModelConfig)."""
    torch.manual_seed(seed)
    if unet_type == "sr":
        nemo = NEMO.EfficientUNetModel(
            **unet, text_embed_dim=TEXT_DIM, noise_cond_aug=noise_cond_aug
        )
    else:
        nemo = NEMO.UNetModel(
            **unet,
            text_embed_dim=TEXT_DIM,
            low_res_cond=unet_type == "sr-unet",
            noise_cond_aug=noise_cond_aug,
        )
    perturb(nemo, seed=seed)
    cfg = model_config_from_nemo(
        {
            "unet_type": unet_type,
            "unet": unet,
            "conditioning": {"embed_dim": TEXT_DIM},
            "preconditioning_type": "EDM",
            "noise_cond_aug": noise_cond_aug,
        }
    )
    ours = build_unet(cfg)
    load_nemo_weights(ours, nemo.state_dict(), unet_type)
    return nemo.eval(), ours.eval(), cfg


def inputs(sr: bool, aug: bool, b: int = 3, size: int = 16, tokens: int = 6, seed: int = 2):
    """Image, noise level, padded text of different lengths per sample (6, 3, 1 tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([tokens, 3, 1][:b])
    kw = {
        "x": torch.randn(b, 3, size, size, generator=g),
        "time": torch.randn(b, generator=g),
        "text_embed": torch.randn(b, tokens, TEXT_DIM, generator=g),
        "text_mask": torch.arange(tokens)[None] < lengths[:, None],
    }
    kw["text_embed"] = kw["text_embed"] * kw["text_mask"][..., None]  # zero padding, as T5's
    if sr:
        kw["x_low_res"] = torch.rand(b, 3, size // 2, size // 2, generator=g) * 2 - 1
    if aug:
        kw["time_low_res"] = torch.randn(b, generator=g)
    return kw


def ours_kwargs(kw: dict) -> dict:
    out = {"text_embed": kw["text_embed"], "text_mask": kw["text_mask"]}
    if "x_low_res" in kw:
        out["lowres"] = kw["x_low_res"]
    if "time_low_res" in kw:
        out["aug_level"] = kw["time_low_res"]
    return out


def compare_unet(case: str, unet_type: str, unet: dict, aug: bool = False) -> None:
    nemo, ours, _ = build_pair(unet_type, unet, noise_cond_aug=aug)
    kw = inputs(unet_type != "base", aug)
    with torch.no_grad():
        ref = nemo(**kw)
        got = ours(kw["x"], kw["time"], **ours_kwargs(kw))
    _record(case, got, ref)
    assert ref.abs().max() > 1e-2  # a real signal, not two zero outputs
    torch.testing.assert_close(got, ref, **FP32)


# ------------------------------------------------------------------------------ Regular UNet
@pytest.mark.parametrize("attention_type", ["fused", "stacked"])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_regular_unet_base(attention_type: str, pooling: str) -> None:
    unet = {**REGULAR, "attention_type": attention_type, "feature_pooling_type": pooling}
    compare_unet(f"base {attention_type} {pooling}-pooling", "base", unet)


@pytest.mark.parametrize(
    "option",
    [
        {"use_null_token": True},
        {"learned_sinu_pos_emb_dim": 16},
        {"resblock_updown": True},
        {"resample_with_conv": False},
        {"resblock_updown": True, "resample_with_conv": False},
        {"num_res_blocks": [1, 2]},
        {"init_conv_kernel_size": 5, "scale_shift_norm": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_regular_unet_options(option: dict) -> None:
    name = ",".join(f"{k}={v}" for k, v in option.items())
    compare_unet(f"base {name}", "base", {**REGULAR, **option})


@pytest.mark.parametrize("attention_type", ["fused", "stacked"])
@pytest.mark.parametrize("aug", [False, True])
def test_regular_unet_sr(attention_type: str, aug: bool) -> None:
    unet = {**REGULAR, "attention_type": attention_type}
    compare_unet(f"sr-unet {attention_type} noise_cond_aug={aug}", "sr-unet", unet, aug=aug)


# ---------------------------------------------------------------------------- Efficient UNet
@pytest.mark.parametrize("attention_type", ["self", "cross", "stacked", "fused"])
def test_efficient_unet(attention_type: str) -> None:
    unet = {**EFFICIENT, "attention_type": attention_type}
    compare_unet(f"efficient {attention_type}", "sr", unet)


@pytest.mark.parametrize(
    "option",
    [
        {"skip_connection_scaling": False},
        {"use_null_token": True, "feature_pooling_type": "mean"},
        {"learned_sinu_pos_emb_dim": 16},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_efficient_unet_options(option: dict) -> None:
    name = ",".join(f"{k}={v}" for k, v in option.items())
    compare_unet(f"efficient {name}", "sr", {**EFFICIENT, **option})


def test_efficient_unet_noise_cond_aug() -> None:
    compare_unet("efficient noise_cond_aug", "sr", EFFICIENT, aug=True)


def test_efficient_unet_default_attention_levels() -> None:
    """atnn_enabled_at absent: NeMo's [0, 0, 0, 0, 1], attention at the fifth level only."""
    unet = {k: v for k, v in EFFICIENT.items() if k != "atnn_enabled_at"}
    unet.update(channel_mult=[1, 1, 1, 1, 2], num_resblocks=[1, 1, 1, 1, 1], image_size=16)
    nemo, ours, _ = build_pair("sr", unet)
    assert hasattr(nemo.DBlocks["4"], "attention_layer")
    assert not hasattr(nemo.DBlocks["3"], "attention_layer")
    compare_unet("efficient atnn_enabled_at absent", "sr", unet)


# ------------------------------------------------------------------------- preconditioning
def _edm_pair(unet_type: str = "base", aug: bool = False, **edm):
    unet = REGULAR if unet_type != "sr" else EFFICIENT
    nemo_net, ours_net, _ = build_pair(unet_type, unet, noise_cond_aug=aug)
    cfg = EDMConfig(**edm)
    nemo = NEMO.EDMPrecond(
        nemo_net,
        loss_type=cfg.loss_type,
        sigma_data=cfg.sigma_data,
        p_mean=cfg.p_mean,
        p_std=cfg.p_std,
        noise_cond_aug=aug,
    )
    return nemo, EDMDenoiser(ours_net, cfg)


def _text(kw: dict) -> dict:
    return {"text_embed": kw["text_embed"], "text_mask": kw["text_mask"]}


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_edm_denoiser_output(sigma: float) -> None:
    nemo, ours = _edm_pair()
    kw = inputs(False, False)
    s = torch.full((3,), sigma)
    with torch.no_grad():
        ref = nemo(kw["x"] * sigma, s, kw["text_embed"], kw["text_mask"])
        got = ours(kw["x"] * sigma, s, **_text(kw))
    _record("EDM D(x; sigma), sigma 0.002..80", got, ref)
    torch.testing.assert_close(got, ref, atol=2e-5 * max(1.0, sigma), rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_edm_loss(loss_type: str) -> None:
    nemo, ours = _edm_pair(loss_type=loss_type)
    kw = inputs(False, False)
    x0 = kw["x"].clamp(-1, 1)
    sigma = torch.tensor([0.05, 0.7, 6.0])
    noise = torch.randn_like(x0)
    nemo.sample_time = lambda batch_size, device=None: sigma  # NeMo draws sigma itself
    with torch.no_grad():
        ref = nemo.compute_loss(x0, kw["text_embed"], kw["text_mask"], noise=noise)
        got = ours.per_sample_loss(x0, _text(kw), sigma=sigma, noise=noise)[0].mean()
    _record(f"EDM loss {loss_type}", got, ref)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


NEMO_LOSSES = {
    "l1": torch.nn.functional.l1_loss,
    "l2": torch.nn.functional.mse_loss,
    "huber": torch.nn.functional.smooth_l1_loss,
}


def _ddpm_pair(**ddpm):
    nemo_net, ours_net, _ = build_pair("base", REGULAR)
    cfg = DDPMConfig(**ddpm)
    nemo = NEMO.ContinousDDPMPrecond(
        nemo_net,
        loss_type=cfg.loss_type,
        pred_objective=cfg.pred_objective,
        noise_schedule=cfg.noise_schedule,
        timesteps=cfg.timesteps,
    )
    return nemo, DDPMDenoiser(ours_net, cfg)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("objective", ["noise", "x_start"])
def test_ddpm_network_output_and_loss(schedule: str, objective: str) -> None:
    nemo, ours = _ddpm_pair(noise_schedule=schedule, pred_objective=objective)
    kw = inputs(False, False)
    x0 = kw["x"].clamp(-1, 1)
    t = torch.tensor([0.02, 0.5, 0.97])
    noise = torch.randn_like(x0)
    log_snr = ours.log_snr(t)
    with torch.no_grad():
        ref = nemo(kw["x"], t, kw["text_embed"], kw["text_mask"])
        got = ours._predict(kw["x"], log_snr, _text(kw))[0]
        _record(f"DDPM net output ({schedule})", got, ref)
        torch.testing.assert_close(got, ref, **FP32)
        for loss_type in ("l1", "l2", "huber"):
            nemo.loss_fn = NEMO_LOSSES[loss_type]
            ours.config = ours.config.model_copy(update={"loss_type": loss_type})
            ref_l = nemo.compute_loss(x0, kw["text_embed"], kw["text_mask"], time=t, noise=noise)
            got_l = ours.per_sample_loss(x0, _text(kw), t=t, noise=noise)[0].mean()
            _record(f"DDPM loss {loss_type} ({schedule}, {objective})", got_l, ref_l)
            torch.testing.assert_close(got_l, ref_l, atol=1e-6, rtol=1e-5)


def test_log_snr_schedules() -> None:
    ddpm = NEMO.GaussianDiffusionContinuousTimes
    t = torch.linspace(0, 1, 1001)
    for name, ours in (("cosine", log_snr_cosine), ("linear", log_snr_linear)):
        ref = ddpm(noise_schedule=name).log_snr(t)
        _record(f"log-SNR schedule {name}", ours(t), ref)
        torch.testing.assert_close(ours(t), ref, atol=1e-5, rtol=1e-6)


def test_noise_cond_aug_inference_and_training() -> None:
    """NeMo's EDM noise-conditioning augmentation (noise_cond_aug: true): same noise, same D."""
    nemo, ours = _edm_pair("sr", aug=True)
    cfg = model_config_from_nemo(
        {
            "unet_type": "sr",
            "unet": EFFICIENT,
            "conditioning": {"embed_dim": TEXT_DIM},
            "preconditioning_type": "EDM",
            "noise_cond_aug": True,
        }
    )
    aug = cfg.noise_cond_aug
    assert aug.enabled and aug.kind == "edm" and aug.sample_sigma == 0.002
    kw = inputs(True, False)
    sigma = torch.tensor([0.3, 1.0, 5.0])
    for inference in (True, False):
        nemo.set_inference_mode(inference)
        nemo.set_rng(torch.Generator().manual_seed(7))
        lowres, level = lowres_condition(
            kw["x_low_res"], aug, training=not inference, generator=torch.Generator().manual_seed(7)
        )
        with torch.no_grad():
            ref = nemo(kw["x"], sigma, kw["text_embed"], kw["text_mask"], x_low_res=kw["x_low_res"])
            got = ours(kw["x"], sigma, **_text(kw), lowres=lowres, aug_level=level)
        _record(f"EDM noise_cond_aug ({'inference' if inference else 'training'})", got, ref)
        torch.testing.assert_close(got, ref, **FP32)


# -------------------------------------------------------------------------------- sampling
def test_dynamic_thresholding() -> None:
    x0 = torch.randn(4, 3, 8, 8) * torch.tensor([0.3, 1.0, 2.0, 5.0])[:, None, None, None]
    ref = NEMO.thresholding_x0(x0, "dynamic", 0.995)
    _record("dynamic thresholding", dynamic_threshold(x0, 0.995), ref)
    torch.testing.assert_close(dynamic_threshold(x0, 0.995), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_classifier_free_guidance_null_condition(scale: float) -> None:
    """NeMo's null text: a zero embedding with the caption's mask kept."""
    nemo, ours = _edm_pair()
    kw = inputs(False, False)
    sigma = torch.tensor([0.2, 1.0, 4.0])
    x = kw["x"] * 2
    with torch.no_grad():
        ref = nemo.forward_with_cond_scale(x=x, time=sigma, cond_scale=scale, **_text(kw))
        got = GuidedDenoiser(ours, _text(kw), scale).guided(x, sigma)
    _record("CFG (null = zero embedding, mask kept)", got, ref)
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("unet_type", ["base", "sr"])
def test_edm_heun_sampler(unet_type: str) -> None:
    """EDM Heun, no churn, dynamic thresholding, CFG 3: the same images as NeMo's EDMSampler."""
    nemo, ours = _edm_pair(unet_type)
    kw = inputs(unet_type == "sr", False)
    steps, scale = 4, 3.0
    noise = torch.randn(3, 3, 16, 16)
    cond = _text(kw)
    lowres = {}
    if unet_type == "sr":
        cond["lowres"] = lowres["x_low_res"] = kw["x_low_res"]
    nemo_times: list[float] = []
    inner = nemo.forward_with_cond_scale

    def spy(*a, **k):
        nemo_times.append(float(k["time"]))
        return inner(*a, **k)

    nemo.forward_with_cond_scale = spy
    sampler = NEMO.EDMSampler(unet_type="sr" if unet_type == "sr" else "base", num_steps=steps)
    with torch.no_grad():
        ref = sampler(nemo, noise, kw["text_embed"], kw["text_mask"], cond_scale=scale, **lowres)
        sampling = SamplingConfig(steps=steps)
        sigmas = ours.sigmas(steps, sigma_min=sampling.sigma_min, sigma_max=sampling.sigma_max)
        fn = GuidedDenoiser(ours, cond, scale, "dynamic", 0.995)
        got = sample_heun(fn, noise * sigmas[0], sigmas)
    # the same Karras schedule: sigma_0, then each later sigma twice (Heun's two evaluations)
    expected = [float(sigmas[0])] + [float(s) for s in sigmas[1:-1] for _ in (0, 1)]
    assert len(nemo_times) == 2 * steps - 1
    torch.testing.assert_close(torch.tensor(nemo_times), torch.tensor(expected), rtol=1e-5, atol=0)
    _record(f"EDM Heun sampler, {steps} steps, CFG 3 ({unet_type})", got, ref)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_ancestral_step_and_schedule(schedule: str) -> None:
    """One ancestral step from the same x_t with the same noise gives NeMo's x_{t-1}."""
    nemo, ours = _ddpm_pair(noise_schedule=schedule, pred_objective="noise")
    kw = inputs(False, False)
    steps = 10
    sched = NEMO.GaussianDiffusionContinuousTimes(noise_schedule=schedule, timesteps=steps)
    times = sched.get_sampling_timesteps(1, device="cpu")
    t_grid = torch.tensor([float(t[0]) for t, _ in times])
    sigmas = ours.sigmas(steps, dtype=torch.float64)
    # the same t grid: sigma_i = exp(-log_snr(t_i) / 2)
    torch.testing.assert_close(
        -2 * sigmas[:-1].log(), sched.log_snr(t_grid).double(), atol=1e-4, rtol=1e-5
    )
    sampler = NEMO.DDPMSampler(unet_type="base", denoiser=sched)
    i = 4
    t, t_next = torch.full((3,), float(t_grid[i])), torch.full((3,), float(t_grid[i + 1]))
    x_t = kw["x"]
    torch.manual_seed(11)
    with torch.no_grad():
        ref, _ = sampler.p_sample(
            nemo, x_t, t, t_next, kw["text_embed"], kw["text_mask"], cond_scale=2.0
        )
        fn = GuidedDenoiser(ours, _text(kw), 2.0, "dynamic", 0.995)
        log_snr, log_snr_next = sched.log_snr(t[:1]), sched.log_snr(t_next[:1])
        alpha = torch.sigmoid(log_snr).sqrt()
        alpha_next = torch.sigmoid(log_snr_next).sqrt()
        s = torch.cat([(-0.5 * log_snr).exp(), (-0.5 * log_snr_next).exp()])
        x_next = sample_ddpm(fn, x_t / alpha, s, generator=torch.Generator().manual_seed(11))
        got = x_next * alpha_next  # VE -> VP
    _record(f"DDPM ancestral step ({schedule})", got, ref)
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)


# --------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_preset_count_equals_nemos_module(name: str) -> None:
    """Each paper preset counts exactly the parameters of NeMo's module from the same block."""
    preset = PRESETS[name]
    unet = dict(preset["unet"], flash_attention=False)  # NeMo asserts flash-attn is installed
    aug = bool(preset.get("noise_cond_aug"))
    with torch.device("meta"):
        if preset["unet_type"] == "sr":
            nemo = NEMO.EfficientUNetModel(**unet, text_embed_dim=1024, noise_cond_aug=aug)
        else:
            nemo = NEMO.UNetModel(
                **unet,
                text_embed_dim=1024,
                low_res_cond=preset["unet_type"] == "sr-unet",
                noise_cond_aug=aug,
            )
    assert preset_parameter_count(name, 1024) == count_parameters(nemo)


# ------------------------------------------------------------------ bf16, checkpointing, layout
@pytest.mark.parametrize(("unet_type", "unet"), [("base", REGULAR), ("sr", EFFICIENT)])
def test_bf16_autocast_parity(unet_type: str, unet: dict) -> None:
    """Under bf16 autocast both compute the same within bf16 round-off of the fp32 output."""
    nemo, ours, _ = build_pair(unet_type, {**unet, "attention_type": "fused"})
    kw = inputs(unet_type != "base", False)
    with torch.no_grad():
        ref32 = nemo(**kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = nemo(**kw).float()
            got = ours(kw["x"], kw["time"], **ours_kwargs(kw)).float()
    scale = float(ref32.abs().max())
    _record(f"bf16 autocast ({unet_type}), relative to max |out|", got / scale, ref / scale)
    bf16_noise = float((ref - ref32).abs().max())  # NeMo's own bf16 error
    assert float((got - ref).abs().max()) <= max(3 * bf16_noise, 1e-2 * scale)


@pytest.mark.parametrize(("unet_type", "unet"), [("base", REGULAR), ("sr", EFFICIENT)])
@pytest.mark.parametrize("attention_type", ["fused", "stacked"])
def test_gradient_checkpointing_and_channels_last_parity(
    unet_type: str, unet: dict, attention_type: str
) -> None:
    nemo, _, cfg = build_pair(unet_type, {**unet, "attention_type": attention_type})
    cfg = cfg.model_copy(
        update={
            "channels_last": True,
            "unet": cfg.unet.model_copy(update={"gradient_checkpointing": True}),
        }
    )
    ours = build_unet(cfg)
    load_nemo_weights(ours, nemo.state_dict(), unet_type)
    assert ours.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    kw = inputs(unet_type != "base", False)
    x = kw["x"].clone().requires_grad_(True)
    ref = nemo(**{**kw, "x": x})
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    x2 = kw["x"].clone().requires_grad_(True)
    got = ours(x2, kw["time"], **ours_kwargs(kw))  # checkpointed: grad is enabled
    (g_got,) = torch.autograd.grad(got.square().sum(), x2)
    _record(f"gradient_checkpointing + channels_last ({unet_type}, {attention_type})", got, ref)
    torch.testing.assert_close(got, ref, **FP32)
    torch.testing.assert_close(g_got, g_ref, atol=1e-4, rtol=1e-3)


def test_nemo_dropout_true_is_refused_not_copied() -> None:
    """NeMo passes `dropout: True` to nn.Dropout as p = 1; importing such a config says so."""
    from imagen.nemo.convert import NemoWeightsError

    with pytest.raises(NemoWeightsError, match="p = 1"):
        model_config_from_nemo({"unet_type": "base", "unet": {**REGULAR, "dropout": True}})
    cfg = model_config_from_nemo({"unet_type": "base", "unet": {**REGULAR, "dropout": False}})
    assert cfg.unet.dropout == 0.0
