"""`imagen import-nemo --config`: each of NeMo's example Imagen configs (stored copies in
tests/data/nemo_conf, their source named in each file) becomes a params profile that builds
NeMo's network at NeMo's parameter count; every NeMo key is accounted for; bad input stops with
the NeMo key and the params key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from imagen.cli import profile_overrides
from imagen.config import ConfigError, load_params
from imagen.nemo.config_import import import_config, validate
from imagen.nemo.config_yaml import leaves, read_nemo_yaml
from imagen.nn import build_unet, count_parameters

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "data" / "nemo_conf"

# NeMo's own UNetModel / EfficientUNetModel built from each config's block (text dim 1024),
# counted on the meta device with the nemo_toolkit 2.4.0 oracle (test below, where installed)
NEMO_COUNTS: dict[str, tuple[str, int]] = {
    "base64-500m": ("base64", 524_897_540),
    "base64-500m-edm": ("base64", 524_897_540),
    "base64-500m_online_encoding": ("base64", 524_897_540),
    "base64-2b": ("base64", 2_171_162_116),
    "sr256-400m": ("sr256", 408_350_468),
    "sr256-400m-edm": ("sr256", 408_021_764),
    "sr256-450m-edm": ("sr256", 568_675_844),
    "sr256-600m": ("sr256", 646_023_428),
    "sr256-600m-edm": ("sr256", 700_281_604),
    "sr256-600m-edm-noise": ("sr256", 700_610_308),
    "sr1024-600m": ("sr1024", 639_193_348),
}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "imagen.cli", "import-nemo", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def count_of(path: Path) -> tuple[str, int]:
    imp = import_config(path)
    assert imp.errors == []
    params = validate(imp, REPO / "params.yaml")  # over the demo's params, presets and all
    with torch.device("meta"):
        return imp.stage or "", count_parameters(build_unet(params.stage(imp.stage).model))


@pytest.mark.parametrize("name", sorted(NEMO_COUNTS))
def test_each_training_config_builds_nemos_network(name: str) -> None:
    assert count_of(CONF / f"{name}.yaml") == NEMO_COUNTS[name]


@pytest.mark.parametrize("name", ["base64-500m", "sr256-600m-edm-noise", "sr1024-600m"])
def test_counts_equal_nemos_own_modules(name: str) -> None:
    """Against NeMo's code itself: the UNet block of the YAML given to NeMo's constructor."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from nemo_oracle import load

        nemo = load()
    except ImportError as e:
        pytest.skip(f"nemo_toolkit oracle not installed: {e}")
    model = read_nemo_yaml(CONF / f"{name}.yaml")["model"]
    unet = {k: v for k, v in model["unet"].items() if k != "low_res_cond"}
    unet["flash_attention"] = False  # NeMo asserts flash-attn is installed
    aug = bool(model.get("noise_cond_aug", False))
    with torch.device("meta"):
        if model["unet_type"] == "sr":
            net = nemo.EfficientUNetModel(**unet, text_embed_dim=1024, noise_cond_aug=aug)
        else:
            sr = model["unet_type"] == "sr-unet"
            net = nemo.UNetModel(**unet, text_embed_dim=1024, low_res_cond=sr, noise_cond_aug=aug)
    assert count_of(CONF / f"{name}.yaml")[1] == count_parameters(net)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_nemo_key_is_in_the_profile(path: Path, tmp_path: Path) -> None:
    """Nothing is dropped silently: each NeMo key is a mapped key's source or a comment."""
    out = tmp_path / "p.yaml"
    from imagen.nemo.config_profile import render_profile

    imp = import_config(path)
    assert imp.errors == []
    text = render_profile(imp, out)
    for key, _ in leaves(read_nemo_yaml(path)):
        parts = key.split(".")
        prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
        # a commented key, a reported subtree naming it, the source of a mapped key or block
        named = f"{key}:" in text or any(f"# {p}\n" in text for p in prefixes)
        named = named or any(
            f"{p}.* (" in text and key[len(p) + 1 :] in text for p in prefixes[:-1]
        )
        assert named, f"{path.name}: NeMo key {key} is not in the profile"
    assert yaml.safe_load(text) == {k: _plain(v) for k, v in imp.values.items()}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def test_the_command_writes_a_profile_the_other_commands_take(tmp_path: Path) -> None:
    out = tmp_path / "nemo-sr256-600m.yaml"
    run = cli("--config", str(CONF / "sr256-600m.yaml"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "not mapped:" in run.stdout and "exp_manager.exp_dir" in run.stdout
    assert f"imagen train    --profile {out} --stage sr256" in run.stdout
    text = out.read_text()
    assert "# Not mapped (NeMo key: why):" in text and "pbss" not in text  # not in this config
    params = load_params(REPO / "params.yaml", profile_overrides([str(out)]))
    sr = params.stage("sr256")
    assert sr.model.preset == "600m_res_256" and sr.model.unet_type == "sr"
    assert sr.model.noise_cond_aug.enabled and sr.model.noise_cond_aug.kind == "edm"
    assert not sr.model.unet.masked_pooling and sr.model.unet.context_norm == "group"
    assert (sr.trainer.batch_size, sr.trainer.accumulate_grad_batches) == (64, 1)
    assert sr.trainer.precision == "bf16" and sr.trainer.optim.warmup_steps == 10000
    assert sr.lowres == 64 and params.data.pyramid == [64, 256]
    assert params.data.min_resolution == 256 and params.data.source == "webdataset"
    assert params.data.source_path == [
        "datasets/laion_aesthetic/wdinfo-selene.pkl",
        "datasets/coyo-700m/wdinfo-selene.pkl",
    ]
    assert params.data.source_root == "/datasets"  # NeMo's local_root_path
    assert params.conditioning.embed_dim == 1024 and params.conditioning.token_length == 128
    # the base stage of params.yaml is untouched
    assert params.stage("base64").model.preset == "small_res_64"


def test_global_batch_becomes_gradient_accumulation(tmp_path: Path) -> None:
    cfg = yaml.safe_load((CONF / "base64-500m.yaml").read_text())
    cfg["trainer"] |= {"devices": 4, "num_nodes": 2}
    cfg["model"] |= {"micro_batch_size": 16, "global_batch_size": 512}
    src = tmp_path / "big.yaml"
    src.write_text(yaml.safe_dump(cfg))
    params = validate(import_config(src), None)
    t = params.stage("base64").trainer
    assert (t.batch_size, t.devices, t.num_nodes, t.accumulate_grad_batches) == (16, 4, 2, 4)
    cfg["model"]["global_batch_size"] = 500
    src.write_text(yaml.safe_dump(cfg))
    errors = import_config(src).errors
    assert any("model.global_batch_size" in e and "accumulate_grad_batches" in e for e in errors)


@pytest.mark.parametrize(
    ("monitor", "ours"), [("reduced_train_loss", "train/loss_avg"), ("val_loss", "heldout/loss")]
)
def test_nemos_checkpoint_monitor_is_mapped(monitor: str, ours: str, tmp_path: Path) -> None:
    cfg = yaml.safe_load((CONF / "base64-500m-edm.yaml").read_text())
    cfg["exp_manager"]["checkpoint_callback_params"]["monitor"] = monitor
    src = tmp_path / "monitor.yaml"
    src.write_text(yaml.safe_dump(cfg))
    imp = import_config(src)
    assert imp.values["stages.base64.trainer.keep.monitor"] == ours
    assert validate(imp, None).stage("base64").trainer.keep.monitor == ours


def test_inference_pipeline_imports_nemos_sampling_settings() -> None:
    imp = import_config(CONF / "inference_pipeline.yaml")
    assert imp.errors == [] and imp.kind == "inference"
    params = validate(imp, REPO / "params.yaml")
    got = {n: (s.sampling.steps, s.sampling.guidance_scale) for n, s in params.stages.items()}
    assert got == {"base64": (30, 7.5), "sr256": (20, 8.0), "sr1024": (20, 7.5)}
    assert params.sample.num_images == 4 and params.sample.output_res == 64
    assert len(params.sample.prompts) == 11 and params.sample.out_dir == "output/imagen_output"
    assert all(s.sampling.thresholding == "dynamic" for s in params.stages.values())


def test_fid_config_imports_the_sweep() -> None:
    imp = import_config(CONF / "imagen_fid_images.yaml")
    assert imp.errors == [] and imp.kind == "fid"
    params = validate(imp, REPO / "params.yaml")
    assert params.evaluate.guidance_scales == [1, 1.5, 2, 3, 4, 5, 6, 7]
    assert params.evaluate.depth == "sr256" and params.evaluate.num_images == 30000
    assert params.stage("sr256").sampling.steps == 20
    skipped = " ".join(n for k, n, _ in imp.notes if k == "unmapped")
    assert "models.0.restore_from_path" in skipped and "infer.customized_model.base_ckpt" in skipped


def _bad(tmp_path: Path, edit: Any, name: str = "base64-500m.yaml") -> Path:
    cfg = yaml.safe_load((CONF / name).read_text())
    edit(cfg)
    path = tmp_path / f"bad-{name}"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "edit, nemo, ours",
    [
        (
            lambda c: c["model"]["unet"].update(embed_dm=256),
            "model.unet.embed_dm",
            "stages.base64.model.unet.embed_dm",
        ),
        (
            lambda c: c["model"]["unet"].update(embed_dim="wide"),
            "model.unet.embed_dim",
            "stages.base64.model.unet.embed_dim",
        ),
        (lambda c: c["trainer"].update(max_step=10), "trainer.max_step", "no params key"),
        (
            lambda c: c["model"]["optim"].update(lr="fast"),
            "model.optim.lr",
            "stages.base64.trainer.optim.lr",
        ),
        (
            lambda c: c["model"]["preconditioning"].update(p_meen=0.0),
            "model.preconditioning.p_meen",
            "stages.base64.model.preconditioning.p_meen",
        ),
        (
            lambda c: c["model"]["unet"].update(image_size=100),
            "model.unet.image_size",
            "stages.base64.model.unet.image_size",
        ),
    ],
    ids=[
        "misspelt-unet-key",
        "unet-type",
        "misspelt-trainer-key",
        "lr-type",
        "precond-key",
        "indivisible-resolution",
    ],
)
def test_bad_input_names_the_nemo_key_and_the_params_key(
    tmp_path: Path, edit: Any, nemo: str, ours: str
) -> None:
    run = cli("--config", str(_bad(tmp_path, edit)), "--out", str(tmp_path / "p.yaml"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert nemo in run.stderr and ours in run.stderr, run.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_interpolations_resolve_as_omegaconf_would(tmp_path: Path) -> None:
    src = tmp_path / "c.yaml"
    src.write_text(
        "a: {b: 3, c: '${.b}', d: {e: '${..b}'}}\nf: '${a.d.e}'\ng: 'x-${a.b}-y'\nh: 1e-8\n"
    )
    cfg = read_nemo_yaml(src)
    assert cfg == {"a": {"b": 3, "c": 3, "d": {"e": 3}}, "f": 3, "g": "x-3-y", "h": 1e-8}
    src.write_text("a: '${nothing.here}'\n")
    with pytest.raises(ConfigError, match="names no key"):
        read_nemo_yaml(src)


def test_an_imported_base_stage_trains_at_full_size(tmp_path: Path) -> None:
    """params.yaml's demo trains its base stage at 32 px first (trainer.progressive); a NeMo
    base config imported over it trains every step at its own 64 px, as NeMo does."""
    out = tmp_path / "nemo-base64.yaml"
    run = cli("--config", str(CONF / "base64-500m.yaml"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert load_params(REPO / "params.yaml").stage("base64").trainer.progressive is not None
    base = load_params(REPO / "params.yaml", profile_overrides([str(out)])).stage("base64")
    assert base.trainer.progressive is None and not base.trainer.ema_warmup
