"""Checkpoints: nothing a run trained is lost, resuming tolerates changes that do not alter the
state, the keeping rule is bounded, a truncated file is set aside, fine-tuning takes weights.

Tiny real stages trained for a few steps on the CPU; real checkpoint files in tmp folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_train import batches, tiny_stage
from tiny import REPO

from imagen.checkpoint import save_stage
from imagen.config import ConfigError, StageConfig
from imagen.mlops.tracking import StageRun
from imagen.train import ImagenStage, Progress, build_trainer, choose_resume, settings_hash
from imagen.train.checkpoints import LAST_CKPT, read_info
from imagen.train.finetune import init_weights
from imagen.train.keep import keep_interval
from imagen.train.listing import checkpoint_rows
from imagen.train.resume import resume_note

STEPS = {"trainer.checkpoint_every_n_steps": 2, "trainer.log_every_n_steps": 1}


def train(stage: StageConfig, out: Path, steps: int) -> ImagenStage:
    """Fit ``steps`` optimiser steps into ``out`` with the stage's keeping rule."""
    stage = stage.model_copy(
        update={"trainer": stage.trainer.model_copy(update={"max_steps": steps})}
    )
    module = ImagenStage(stage)
    progress = Progress(stage, out, None, StageRun(), monitor_every=keep_interval(stage))
    trainer = build_trainer(stage, out, [progress], logger=False, terminal=False)
    data = torch.utils.data.DataLoader(batches(stage, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=data)
    return module


def _hash(stage: StageConfig) -> str:
    return settings_hash(stage.model_dump(mode="json"))


TOLERATED = {
    "trainer.devices": 2,
    "trainer.num_nodes": 2,
    "trainer.num_workers": 3,
    "trainer.batch_size": 3,
    "trainer.max_steps": 999,
    "trainer.log_every_n_steps": 7,
    "trainer.sample_every_n_steps": 7,
    "trainer.checkpoint_every_n_steps": 7,
    "trainer.precision": "bf16",
    "trainer.ema_decay": 0.5,
    "trainer.keep.top_k": 9,
    "model.unet.gradient_checkpointing": True,
    "sampling.steps": 9,
}
RELEVANT = {
    "trainer.optim.lr": 0.5,
    "trainer.optim.warmup_steps": 99,
    "trainer.precision": "16",
    "model.unet.embed_dim": 32,
    "model.preconditioning.p_mean": -1.2,
    "trainer.init_from": "models/x.ckpt",
}


def test_only_state_relevant_keys_change_the_settings_hash() -> None:
    base = _hash(tiny_stage())
    for key, value in TOLERATED.items():
        assert _hash(tiny_stage(**{key: value})) == base, key
    for key, value in RELEVANT.items():
        assert _hash(tiny_stage(**{key: value})) != base, key


def test_keeping_rule_keeps_last_best_k_and_archive(tmp_path: Path, capsys) -> None:
    stage = tiny_stage(
        **STEPS, **{"trainer.keep.top_k": 2, "trainer.keep.archive_every_n_steps": 4}
    )
    train(stage, tmp_path, 8)
    folder = tmp_path / "checkpoints"
    h = _hash(stage)
    archive = {f"step={s:07d}-settings={h}-archive.ckpt" for s in (4, 8)}
    best = {p.name for p in folder.glob(f"step=*-settings={h}.ckpt")}
    assert {p.name for p in folder.iterdir()} == {LAST_CKPT, *archive, *best}
    assert len(best) == 2  # candidates at steps 2, 4, 6, 8: two removed by the rule
    state = torch.load(folder / LAST_CKPT, weights_only=True)["callbacks"]
    (kept,) = [v for k, v in state.items() if "'role': 'best'" in k]
    assert {Path(p).name for p in kept["best_k_models"]} == best  # lowest train/loss_avg
    removed = [line for line in capsys.readouterr().err.splitlines() if "removed" in line]
    assert all(line.endswith("(not among the best 2 by train/loss_avg (min))") for line in removed)
    assert not any(name in line for line in removed for name in best | archive)


def test_changed_settings_set_last_aside_never_overwriting(tmp_path: Path) -> None:
    a = tiny_stage(**STEPS)
    b = tiny_stage(**STEPS, **{"trainer.optim.lr": 1e-4})
    folder = tmp_path / "checkpoints"
    set_aside = []
    for _ in range(2):  # two runs of `a` to the same step, each followed by a run of `b`
        train(a, tmp_path, 2)
        choice = choose_resume(folder, b, report=False)
        assert choice.path is None
        (msg,) = choice.messages
        assert "trainer.optim.lr 0.002 -> 0.0001" in msg
        assert "-S stages.base64.trainer.init_from=" in msg
        set_aside.append(msg.split("kept as ")[1].split(". To fine-tune")[0])
    assert set_aside[0] != set_aside[1] and all(Path(p).is_file() for p in set_aside)
    assert Path(set_aside[1]).name == f"step={2:07d}-settings={_hash(a)}-last-1.ckpt"
    # the original settings find their state again
    assert choose_resume(folder, a, report=False).path == Path(set_aside[1])
    rows = {r["file"]: r for r in checkpoint_rows(folder, b)}
    assert rows[Path(set_aside[0]).name]["differs"] == "trainer.optim.lr 0.002 -> 0.0001"


def test_changes_that_keep_the_state_resume(tmp_path: Path) -> None:
    train(tiny_stage(**STEPS), tmp_path, 2)
    folder = tmp_path / "checkpoints"
    for key, value in TOLERATED.items():
        choice = choose_resume(folder, tiny_stage(**{**STEPS, key: value}), report=False)
        assert choice.path == folder / LAST_CKPT and not choice.messages, key
    now = tiny_stage(**{**STEPS, "trainer.devices": 2, "trainer.max_steps": 9})
    note = resume_note(choose_resume(folder, now, report=False).saved, now)
    assert note is not None and "trainer.devices 1 -> 2" in note and "trainer.max_steps" in note
    assert "new pass, shard order seeded by the step" in note
    choice = choose_resume(folder, tiny_stage(**STEPS, **{"trainer.precision": "16"}), report=False)
    assert choice.path is None and "trainer.precision fp32 -> fp16-scaler" in choice.messages[0]


def test_truncated_last_is_set_aside_and_the_newest_good_one_resumes(tmp_path: Path) -> None:
    stage = tiny_stage(**STEPS)
    train(stage, tmp_path, 4)
    folder = tmp_path / "checkpoints"
    last = folder / LAST_CKPT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (folder / ".last.ckpt.abc123.tmp").write_bytes(b"half a write")
    choice = choose_resume(folder, stage, report=False)
    assert choice.path == folder / f"step={4:07d}-settings={_hash(stage)}.ckpt"
    assert choice.step == 4 and read_info(choice.path).step == 4
    assert not last.exists() and not list(folder.glob(".*.tmp"))
    (corrupt,) = folder.glob("last.ckpt.corrupt-*")
    msg = " ".join(choice.messages)
    assert f"{last} cannot be read" in msg and str(corrupt) in msg


def _net(module: ImagenStage) -> dict[str, torch.Tensor]:
    return module.net.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_takes_weights_and_ema_with_a_fresh_optimiser(tmp_path: Path) -> None:
    source = train(tiny_stage(**STEPS), tmp_path / "a", 2)
    ckpt = tmp_path / "a" / "checkpoints" / LAST_CKPT
    over = {"trainer.optim.lr": 1e-4, "trainer.init_from": str(ckpt), "trainer.max_steps": 1}
    ft = tiny_stage(**STEPS, **over)
    module = ImagenStage(ft)
    info = init_weights(module, str(ckpt))
    assert info["kind"] == "checkpoint" and info["step"] == 2
    assert info["took"] == "its weights and EMA weights"
    assert _same(_net(module), _net(source))
    assert _same(module.ema.module.state_dict(), source.ema.module.state_dict())
    assert not _same(_net(module), source.ema.module.state_dict())  # two different tensors sets
    trainer = build_trainer(ft, tmp_path / "b", [], logger=False, terminal=False)
    trainer.fit(module, torch.utils.data.DataLoader(batches(ft, 1), batch_size=None))
    opt = trainer.optimizers[0]
    assert trainer.global_step == 1 and opt.param_groups[0]["lr"] < 1e-4  # warm-up anew
    assert all(int(s["step"]) == 1 for s in opt.state.values())  # fresh AdamW moments
    # a model file (EMA weights only) and a folder holding one
    save_stage(tmp_path / "m", source.stage, source.ema_state_dict(), step=2)
    for spec in (tmp_path / "m", tmp_path / "m" / "model.pt"):
        module = ImagenStage(ft)
        assert init_weights(module, str(spec))["kind"] == "model"
        assert _same(_net(module), source.ema_state_dict())


def test_fine_tune_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    train(tiny_stage(**STEPS), tmp_path, 2)
    other = ImagenStage(tiny_stage(**{"model.unet.embed_dim": 32}))
    with pytest.raises(ConfigError, match=r"does not fit stages\.base64\.model.*of another shape"):
        init_weights(other, str(tmp_path / "checkpoints" / LAST_CKPT))
    with pytest.raises(ConfigError, match="no such file"):
        init_weights(other, str(tmp_path / "nothing.ckpt"))


@pytest.mark.slow
def test_fine_tune_from_a_registered_model(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from imagen.mlops.registry import register_stage_models
    from imagen.text import build_default_encoder

    source = ImagenStage(tiny_stage())
    save_stage(tmp_path / "m", source.stage, source.ema_state_dict(), step=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    encoder = build_default_encoder(source.stage.model.conditioning, tmp_path / "encoder")
    register_stage_models(run_id, {"base64": tmp_path / "m"}, encoder, tracking_uri=uri)
    module = ImagenStage(tiny_stage())
    info = init_weights(module, "models:/imagen-base64@champion", tracking_uri=uri)
    assert info["kind"] == "model" and info["step"] == 5
    assert _same(_net(module), source.ema_state_dict())


def test_fine_tune_from_a_nemo_archive(tmp_path: Path) -> None:
    from test_nemo_load import megatron_state_dict, nemo_model_block, nemo_precond, write_nemo
    from test_nemo_parity import REGULAR

    from imagen.nemo.convert import model_config_from_nemo
    from imagen.nemo.load import read_nemo_checkpoint

    block = nemo_model_block("base", REGULAR, False)
    path = write_nemo(tmp_path / "base.nemo", block, megatron_state_dict(nemo_precond(block)))
    stage = StageConfig(name="base64", resolution=64, model=model_config_from_nemo(block))
    module = ImagenStage(stage)
    info = init_weights(module, str(path))
    assert info["kind"] == "nemo" and info["took"] == "its weights (as weights and EMA)"
    _, net, _ = read_nemo_checkpoint(path)
    assert _same(_net(module), net.state_dict())
    assert _same(module.ema.module.state_dict(), net.state_dict())
    with pytest.raises(ConfigError, match=r"trainer\.init_from=.*does not fit"):
        init_weights(ImagenStage(tiny_stage()), str(path))


def test_a_source_outside_data_init_is_named_as_invisible_to_dvc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """dvc.yaml's train stages depend on data/init/: a source there is tracked, one elsewhere
    works but the log says DVC cannot see it change."""
    from imagen.train.finetune import resolve_source

    monkeypatch.chdir(tmp_path)
    source = ImagenStage(tiny_stage())
    save_stage(tmp_path / "data/init/base64", source.stage, source.ema_state_dict(), step=3)
    save_stage(tmp_path / "elsewhere", source.stage, source.ema_state_dict(), step=3)
    assert resolve_source("data/init/base64", "base64").name == "model.pt"
    assert "outside" not in capsys.readouterr().out
    resolve_source(str(tmp_path / "elsewhere"), "base64")
    assert "outside data/init/" in capsys.readouterr().out
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    assert "data/init" in deps and (REPO / "data/init").is_dir()
