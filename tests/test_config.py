"""params.yaml validation: every bad value names its full key path and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagen.config import ConfigError, load_params, resolve_params
from imagen.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
IMAGEN = ROOT / ".venv" / "bin" / "imagen"


def base(model: dict | None = None, **stage: object) -> dict:
    """A minimal params mapping: base64 on the small preset, plus the given stage keys."""
    return {"stages": {"base64": {"model": {"preset": "small_res_64", **(model or {})}, **stage}}}


def with_sr(**unet: object) -> dict:
    raw = base()
    raw["stages"]["sr256"] = {"model": {"preset": "small_res_256", "unet": unet}}
    return raw


BAD = {
    "unknown attention_type": (
        base({"unet": {"attention_type": "bogus"}}),
        "stages.base64.model.unet.attention_type",
        ["'self'", "'cross'", "'stacked'", "'fused'"],
    ),
    "num_resblocks vs channel_mult": (
        base({"unet": {"num_resblocks": [1, 2]}}),
        "stages.base64.model.unet.num_resblocks",
        ["channel_mult has 4"],
    ),
    "efficient num_resblocks vs channel_mult": (
        with_sr(num_resblocks=[1, 1]),
        "stages.sr256.model.unet.num_resblocks",
        ["one ResBlock count per level"],
    ),
    "image_size not divisible": (
        base({"unet": {"image_size": 60, "attention_resolutions": [15]}}),
        "stages.base64.model.unet.image_size",
        ["not divisible by the total down-sampling factor 8"],
    ),
    "negative drop_rate": (
        base({"conditioning": {"drop_rate": -0.1}}),
        "stages.base64.model.conditioning.drop_rate",
        ["greater than or equal to 0"],
    ),
    "misspelt key": (
        base({"unet": {"embed_dims": 32}}),
        "stages.base64.model.unet.embed_dims",
        ["unknown key"],
    ),
    "wrong type": (
        base({"unet": {"embed_dim": "big"}}),
        "stages.base64.model.unet.embed_dim",
        ["valid integer"],
    ),
    "unknown preset": (
        base({"preset": "huge"}),
        "stages.base64.model.preset",
        ["unknown preset 'huge'", "500m_res_64", "small_res_64"],
    ),
    "unknown stage": (
        {**base(), "stages": {**base()["stages"], "sr512": {}}},
        "stages.sr512",
        ["unknown stage", "sr256", "sr1024"],
    ),
    "DDPM key under EDM": (
        base({"preconditioning_type": "EDM", "preconditioning": {"noise_schedule": "cosine"}}),
        "stages.base64.model.preconditioning.noise_schedule",
        ["unknown key"],
    ),
    "bad EDM value": (
        base({"preconditioning": {"sigma_data": -1}}),
        "stages.base64.model.preconditioning.sigma_data",
        ["greater than 0"],
    ),
    "atnn_enabled_at wrong length": (
        with_sr(atnn_enabled_at=[0, 1]),
        "stages.sr256.model.unet.atnn_enabled_at",
        ["channel_mult has 4"],
    ),
    "attention_resolutions not a level": (
        base({"unet": {"attention_resolutions": [12]}}),
        "stages.base64.model.unet.attention_resolutions",
        ["allowed: [8, 16, 32, 64]"],
    ),
    "bad precision": (
        base(trainer={"precision": "fp8"}),
        "stages.base64.trainer.precision",
        ["'bf16'", "'32'"],
    ),
    "unknown pooling": (
        base({"unet": {"feature_pooling_type": "max"}}),
        "stages.base64.model.unet.feature_pooling_type",
        ["'attention'", "'mean'"],
    ),
    "even init conv kernel": (
        base({"unet": {"init_conv_kernel_size": 4}}),
        "stages.base64.model.unet.init_conv_kernel_size",
        ["must be odd"],
    ),
    "stride below 2": (
        with_sr(stride=1),
        "stages.sr256.model.unet.stride",
        ["greater than or equal to 2"],
    ),
    "SR net for the base stage": (
        base({"unet_type": "sr", "unet": {"num_resblocks": [1, 1, 1, 1]}}),
        "stages.base64.model.unet_type",
        ["allowed: 'base'"],
    ),
    "word tokenizer on a caption folder": (
        {
            **base(),
            "data": {"source": "folder", "source_path": "photos"},
            "model": {"conditioning": {"encoder": {"tokenizer": "word"}}},
        },
        "model.conditioning.encoder.tokenizer",
        ["'byt5'", "data.source is 'folder'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_names_key_path_and_what_is_allowed(case):
    raw, path, allowed = BAD[case]
    with pytest.raises(ConfigError) as err:
        resolve_params(raw)
    msg = str(err.value)
    assert f"{path}:" in msg, msg
    for text in allowed:
        assert text in msg, msg


def test_word_tokenizer_setting_is_moot_with_a_real_t5_folder(tmp_path):
    """params.yaml selects the word tokenizer for the embedded demo; pointing encoder_path at a
    real T5 (a folder without the built-encoder marker) for a caption folder is accepted."""
    t5 = tmp_path / "t5-large"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "d_model": 1024}')
    raw = {
        **base(),
        "data": {"source": "folder", "source_path": "photos"},
        "model": {"conditioning": {"encoder_path": str(t5), "encoder": {"tokenizer": "word"}}},
    }
    cond = resolve_params(raw).conditioning
    assert cond.encoder_path == str(t5)
    assert (cond.embed_dim, cond.token_length) == (1024, 128)  # unset: read from the folder


def test_embed_dim_that_disagrees_with_the_encoder_folder_is_refused(tmp_path):
    """An explicit embed_dim that is not the folder's width would fail at the first batch: it is
    refused up front with the key's name."""
    t5 = tmp_path / "t5-large"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "d_model": 1024}')
    raw = {
        **base(),
        "data": {"source": "folder", "source_path": "photos"},
        "model": {"conditioning": {"encoder_path": str(t5), "embed_dim": 256}},
    }
    with pytest.raises(ConfigError, match=r"model\.conditioning\.embed_dim: 256.*1024"):
        resolve_params(raw)


def test_tokenizer_and_token_length_follow_the_data_source():
    """Unset, the tokenizer is word for the embedded captions and bytes for anyone else's, and
    token_length follows it, so `-S data.source=folder -S data.source_path=DIR` alone works."""
    embedded = resolve_params(base()).conditioning
    assert (embedded.encoder.tokenizer, embedded.token_length) == ("word", 24)
    own = resolve_params({**base(), "data": {"source": "folder", "source_path": "photos"}})
    assert (own.conditioning.encoder.tokenizer, own.conditioning.token_length) == ("byt5", 128)
    for stage in own.stages.values():
        assert stage.model.conditioning.encoder.tokenizer == "byt5"
    explicit = base()
    explicit["model"] = {"conditioning": {"token_length": 40, "encoder": {"tokenizer": "byt5"}}}
    cond = resolve_params(explicit).conditioning
    assert (cond.encoder.tokenizer, cond.token_length) == ("byt5", 40)


def test_encoder_path_auto_picks_the_built_t5_or_minilm_from_the_data_source():
    """params.yaml's encoder_path auto: the word T5 built here for the embedded captions; the
    packaged pretrained all-MiniLM-L6-v2 (384 wide, 32 tokens) for a folder or webdataset,
    unless encoder.tokenizer or embed_dim asks for the built encoder; precache prints why."""
    from imagen.config.encoders import MINILM

    shipped = ROOT / "params.yaml"
    assert yaml.safe_load(shipped.read_text())["model"]["conditioning"]["encoder_path"] == "auto"
    embedded = load_params(shipped).conditioning
    assert (embedded.encoder_path, embedded.encoder.tokenizer) == ("data/encoder", "word")
    assert (embedded.embed_dim, embedded.token_length, embedded._chosen) == (256, 24, None)
    own = ["data.source=folder", "data.source_path=photos"]
    for source in ("folder", "webdataset"):
        params = load_params(shipped, [f"data.source={source}", "data.source_path=photos"])
        for stage in params.stages.values():
            cond = stage.model.conditioning
            assert (cond.encoder_path, cond.embed_dim, cond.token_length) == (MINILM, 384, 32)
            assert "all-MiniLM-L6-v2" in cond._chosen and "encoder.tokenizer" in cond._chosen
    byt5 = load_params(shipped, [*own, "model.conditioning.encoder.tokenizer=byt5"]).conditioning
    assert (byt5.encoder_path, byt5.embed_dim, byt5.token_length) == ("data/encoder", 256, 128)
    width = load_params(shipped, [*own, "model.conditioning.embed_dim=256"]).conditioning
    assert (width.encoder_path, width.encoder.tokenizer) == ("data/encoder", "byt5")
    longer = load_params(shipped, [*own, "model.conditioning.token_length=64"]).conditioning
    assert (longer.encoder_path, longer.token_length) == (MINILM, 64)


def test_own_data_recipe_replaces_the_demo_keys_for_a_users_data_only(tmp_path):
    """params.yaml's own_data block: merged over the demo's keys for a folder or webdataset,
    ignored (but still checked) for the embedded data; a command-line override wins over it;
    `imagen train` is told which keys it set."""
    shipped = ROOT / "params.yaml"
    raw = yaml.safe_load(shipped.read_text())
    own = raw["own_data"]["stages"]["base64"]["model"]["preconditioning"]
    demo = raw["stages"]["base64"]["model"]["preconditioning"]
    demo_prog = raw["stages"]["base64"]["trainer"]["progressive"]
    assert own["p_mean"] != demo["p_mean"]
    embedded = load_params(shipped)
    assert embedded.stage("base64").model.preconditioning.p_mean == demo["p_mean"]
    assert embedded.own_data_note() is None
    folder = ["data.source=folder", "data.source_path=photos"]
    for source in ("folder", "webdataset"):
        params = load_params(shipped, [f"data.source={source}", "data.source_path=photos"])
        pre = params.stage("base64").model.preconditioning
        assert (pre.p_mean, pre.p_std) == (own["p_mean"], own["p_std"])
        prog = params.stage("base64").trainer.progressive  # merged key by key into the demo's
        assert prog.model_dump() == {
            **demo_prog,
            **raw["own_data"]["stages"]["base64"]["trainer"]["progressive"],
        }
        # fewer steps in all than the demo, some of them at the full 64 px
        steps = params.stage("base64").trainer.max_steps
        assert prog.steps < steps < embedded.stage("base64").trainer.max_steps
        note = params.own_data_note("base64")
        assert f"stages.base64.model.preconditioning.p_mean={own['p_mean']}" in note
        assert f"stages.base64.trainer.max_steps={steps}" in note
        assert params.own_data_note("sr256") is None  # nothing of it reaches the SR stages
    cli = load_params(shipped, [*folder, "stages.base64.model.preconditioning.p_mean=0.1"])
    assert cli.stage("base64").model.preconditioning.p_mean == 0.1
    assert "p_mean" not in cli.own_data_note("base64") and "p_std" in cli.own_data_note()
    # `dvc exp run -S own_data....` edits the recipe itself
    edited = load_params(shipped, [*folder, "own_data.stages.base64.trainer.max_steps=11"])
    assert edited.stage("base64").trainer.max_steps == 11
    assert load_params(shipped, [*folder, "own_data={}"]).own_data_note() is None
    assert load_params(shipped, [*folder, "own_data=null"]).own_data_note() is None
    # `dvc exp run -S stages.base64...` edits the demo's key in params.yaml, which own_data
    # still replaces for a folder: the note shows the value it did not use, and where to set it
    raw_edit = yaml.safe_load(shipped.read_text())
    raw_edit["stages"]["base64"]["trainer"]["max_steps"] = 11600
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_edit))
    note = load_params(tmp_path / "params.yaml", folder).own_data_note("base64")
    own_steps = raw["own_data"]["stages"]["base64"]["trainer"]["max_steps"]
    assert f"stages.base64.trainer.max_steps={own_steps} (not 11600)" in note
    assert "own_data.<key>" in note
    # a misspelt key in the block is named even while the embedded data ignores it
    bad = "own_data.stages.base64.model.preconditioning.p_maen=1"
    with pytest.raises(ConfigError, match=r"(?s)own_data.*preconditioning\.p_maen: unknown key"):
        load_params(shipped, [bad])
    with pytest.raises(ConfigError, match=r"own_data: must be a mapping"):
        load_params(shipped, ["own_data=3"])


def test_preset_applies_and_explicit_keys_override_it():
    params = resolve_params(base({"unet": {"embed_dim": 24, "attention_type": "cross"}}))
    unet = params.stages["base64"].model.unet
    preset = PRESETS["small_res_64"]["unet"]
    assert unet.embed_dim == 24 and unet.attention_type == "cross"
    assert unet.channel_mult == preset["channel_mult"]
    assert unet.attention_resolutions == preset["attention_resolutions"]
    plain = resolve_params(base()).stages["base64"].model.unet
    assert plain.embed_dim == preset["embed_dim"]


def test_seed_spellings_are_accepted():
    params = resolve_params(base({"unet": {"dropout": False}}))
    assert params.stages["base64"].model.unet.dropout == 0.0
    for key in ("atnn_enabled_at", "attn_enabled_at"):
        sr = resolve_params(with_sr(**{key: [0, 1, 1, 1]})).stages["sr256"].model.unet
        assert sr.atnn_enabled_at == [0, 1, 1, 1]


def test_paper_preset_resolves():
    raw = base({"preset": "500m_res_64", "conditioning": {"embed_dim": 1024}})
    unet = resolve_params(raw).stages["base64"].model.unet
    assert (unet.embed_dim, unet.cond_dim, unet.attention_type) == (256, 512, "fused")


def test_shipped_params_yaml_loads():
    params = load_params(ROOT / "params.yaml")
    assert set(params.stages) == {"base64", "sr256", "sr1024"}
    assert params.stages["sr256"].model.is_sr


def test_load_params_override_is_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(base()))
    assert (
        load_params(path, ["stages.base64.model.unet.embed_dim=8"])
        .stages["base64"]
        .model.unet.embed_dim
        == 8
    )
    with pytest.raises(ConfigError, match=r"stages\.base64\.model\.unet\.attention_type"):
        load_params(path, ["stages.base64.model.unet.attention_type=bogus"])


def test_cli_rejects_bad_override_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    exe = [str(IMAGEN)] if IMAGEN.exists() else [sys.executable, "-m", "imagen.cli"]
    proc = subprocess.run(
        [
            *exe,
            "ingest",
            "--params",
            str(ROOT / "params.yaml"),
            "-S",
            "stages.base64.model.unet.attention_type=bogus",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "stages.base64.model.unet.attention_type" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_a_reversed_guidance_interval_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"stages\.base64\.sampling\.guidance_interval"):
        load_params(ROOT / "params.yaml", ["stages.base64.sampling.guidance_interval=[2, 1]"])
    ok = load_params(ROOT / "params.yaml", ["stages.base64.sampling.guidance_interval=[1, 80]"])
    assert ok.stage("base64").sampling.guidance_interval == (1.0, 80.0)
