"""NeMo checkpoints load as the project's denoiser and as a stage model the cascade samples.

The files are built here the way NeMo writes them, from NeMo's own randomly initialised
modules (nemo_toolkit 2.4.0 as the oracle); skipped when nemo is not installed.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import nemo_oracle
import pytest
import torch
import yaml

try:
    NEMO = nemo_oracle.load()
except ImportError as e:  # pragma: no cover - depends on the install
    pytest.skip(f"NeMo oracle unavailable ({e})", allow_module_level=True)

from test_nemo_parity import EFFICIENT, REGULAR, TEXT_DIM, inputs, perturb  # noqa: E402

from imagen.checkpoint import load_stage  # noqa: E402
from imagen.cli import main as cli  # noqa: E402
from imagen.nemo import NemoLoadError, load_nemo_denoiser  # noqa: E402


def nemo_model_block(unet_type: str, unet: dict, aug: bool) -> dict:
    return {
        "precision": "${trainer.precision}",  # an OmegaConf interpolation, as NeMo writes it
        "unet_type": unet_type,
        "unet": dict(unet, flash_attention=False),
        "noise_cond_aug": aug,
        "preconditioning_type": "EDM",
        "preconditioning": {"loss_type": "l2", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2},
        "conditioning": {"embed_dim": TEXT_DIM, "token_length": 6, "drop_rate": 0.1},
    }


def nemo_precond(block: dict, seed: int = 3):
    torch.manual_seed(seed)
    if block["unet_type"] == "sr":
        unet = NEMO.EfficientUNetModel(
            **block["unet"], text_embed_dim=TEXT_DIM, noise_cond_aug=block["noise_cond_aug"]
        )
    else:
        unet = NEMO.UNetModel(
            **block["unet"],
            text_embed_dim=TEXT_DIM,
            low_res_cond=block["unet_type"] == "sr-unet",
            noise_cond_aug=block["noise_cond_aug"],
        )
    perturb(unet, seed=seed)
    return NEMO.EDMPrecond(unet, noise_cond_aug=block["noise_cond_aug"], **block["preconditioning"])


def megatron_state_dict(precond) -> dict[str, torch.Tensor]:
    """MegatronImagen.model (Imagen) .model (precond): keys model.model.unet.*"""
    return {f"model.model.{k}": v for k, v in precond.state_dict().items()}


def write_nemo(path: Path, block: dict, state: dict, extra: dict | None = None) -> Path:
    with tarfile.open(path, "w:") as tar:
        files = {"model_config.yaml": yaml.safe_dump(block).encode()}
        buf = io.BytesIO()
        torch.save(state, buf)
        files["model_weights.ckpt"] = buf.getvalue()
        files.update(extra or {})
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "unet_type,unet,aug",
    [("base", REGULAR, False), ("sr-unet", REGULAR, True), ("sr", EFFICIENT, True)],
)
def test_dot_nemo_loads_and_matches_nemo(tmp_path: Path, unet_type, unet, aug) -> None:
    block = nemo_model_block(unet_type, unet, aug)
    precond = nemo_precond(block).eval()
    path = write_nemo(tmp_path / "model.nemo", block, megatron_state_dict(precond))
    den = load_nemo_denoiser(path)
    assert isinstance(den, torch.nn.Module) and not den.training
    kw = inputs(unet_type != "base", False)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    lowres = kw.get("x_low_res")
    with torch.no_grad():
        precond.set_inference_mode(True)
        precond.set_rng(torch.Generator().manual_seed(0))  # the wrapper's generator: seed 0
        extra = {"x_low_res": lowres} if lowres is not None else {}
        ref = precond(kw["x"], sigma, kw["text_embed"], kw["text_mask"], **extra)
        got = den(
            kw["x"], sigma, text_embed=kw["text_embed"], text_mask=kw["text_mask"], lowres=lowres
        )
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_lightning_ckpt_with_config_and_ema_sibling(tmp_path: Path) -> None:
    block = nemo_model_block("base", REGULAR, False)
    precond = nemo_precond(block).eval()
    ema = nemo_precond(block, seed=9).eval()  # other weights, standing in for the EMA
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump({"model": block}))
    torch.save({"state_dict": megatron_state_dict(precond)}, tmp_path / "last.ckpt")
    kw = inputs(False, False)
    sigma = torch.full((3,), 0.7)
    with pytest.raises(NemoLoadError, match="config"):
        load_nemo_denoiser(tmp_path / "last.ckpt")
    den = load_nemo_denoiser(tmp_path / "last.ckpt", config=tmp_path / "model_config.yaml")
    with torch.no_grad():
        ref = precond(kw["x"], sigma, kw["text_embed"], kw["text_mask"])
        torch.testing.assert_close(den(kw["x"], sigma, kw["text_embed"], kw["text_mask"]), ref)
    torch.save({"state_dict": megatron_state_dict(ema)}, tmp_path / "last-EMA.ckpt")
    den = load_nemo_denoiser(tmp_path / "last.ckpt", config=tmp_path / "model_config.yaml")
    raw = load_nemo_denoiser(
        tmp_path / "last.ckpt", config=tmp_path / "model_config.yaml", ema=False
    )
    with torch.no_grad():
        ref_ema = ema(kw["x"], sigma, kw["text_embed"], kw["text_mask"])
        torch.testing.assert_close(den(kw["x"], sigma, kw["text_embed"], kw["text_mask"]), ref_ema)
        torch.testing.assert_close(raw(kw["x"], sigma, kw["text_embed"], kw["text_mask"]), ref)


def test_clear_errors(tmp_path: Path) -> None:
    block = nemo_model_block("base", REGULAR, False)
    state = megatron_state_dict(nemo_precond(block))
    good = write_nemo(tmp_path / "good.nemo", block, state)
    data = good.read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    with pytest.raises(NemoLoadError, match="truncated"):
        load_nemo_denoiser(tmp_path / "cut.nemo")
    # a config that builds another net: the first mismatching tensor is named
    wider = dict(block, unet=dict(block["unet"], cond_dim=64))
    with pytest.raises(NemoLoadError, match=r"text_to_cond\.weight"):
        load_nemo_denoiser(write_nemo(tmp_path / "wider.nemo", wider, state))
    # a pickle that needs a class: refused, nothing run, says what to export
    pickled = dict(state, extra=torch.nn.Linear(2, 2))
    buf = io.BytesIO()
    torch.save(pickled, buf)
    with tarfile.open(tmp_path / "pickled.nemo", "w:") as tar:
        for name, blob in (
            ("model_config.yaml", yaml.safe_dump(block).encode()),
            ("model_weights.ckpt", buf.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(NemoLoadError, match="export"):
        load_nemo_denoiser(tmp_path / "pickled.nemo")


def test_import_nemo_writes_a_stage_model(tmp_path: Path, capsys) -> None:
    block = nemo_model_block("sr", EFFICIENT, True)
    precond = nemo_precond(block).eval()
    path = write_nemo(tmp_path / "sr.nemo", block, megatron_state_dict(precond))
    assert cli(["import-nemo", str(path), "--stage", "sr256", "--out", str(tmp_path / "m")]) == 0
    net, stage = load_stage(tmp_path / "m" / "sr256")
    assert stage.name == "sr256" and stage.model.noise_cond_aug.kind == "edm"
    assert (stage.sampling.steps, stage.sampling.guidance_scale) == (20, 8.0)
    kw = inputs(True, True)
    with torch.no_grad():
        ref = precond.unet(**kw)
        got = net(
            kw["x"],
            kw["time"],
            text_embed=kw["text_embed"],
            text_mask=kw["text_mask"],
            lowres=kw["x_low_res"],
            aug_level=kw["time_low_res"],
        )
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert cli(["import-nemo", str(path), "--stage", "base64", "--out", str(tmp_path)]) == 2
    assert "cannot be the base64 stage" in capsys.readouterr().err


def test_imported_nemo_stages_sample_through_the_cascade(tmp_path: Path) -> None:
    """Two NeMo models imported as base64 and sr256 stages: `imagen sample`'s cascade runs."""
    from tiny import make_tiny_cascade

    from imagen.sample.cascade import Cascade

    params = make_tiny_cascade(tmp_path, stages=("base64",))  # the tiny text encoder (32 dims)
    models = Path(params.models_dir)
    for stage, unet_type, unet, aug, extra in (
        ("base64", "base", REGULAR, False, []),
        ("sr256", "sr", EFFICIENT, True, ["--resolution", "32", "--lowres", "16"]),
    ):
        block = nemo_model_block(unet_type, unet, aug)
        block["conditioning"]["token_length"] = 16
        path = write_nemo(
            tmp_path / f"{stage}.nemo", block, megatron_state_dict(nemo_precond(block))
        )
        args = ["import-nemo", str(path), "--stage", stage, "--out", str(models), *extra]
        assert cli(args) == 0
    encoder = params.conditioning.encoder_path
    cascade = Cascade.from_models_dir(models, depth="sr256", encoder_path=encoder)
    out = cascade.generate(["a red circle"], depth="sr256", seed=0, steps={"base64": 2, "sr256": 2})
    assert out["base64"].shape == (1, 3, 16, 16) and out["sr256"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["sr256"]).all()
