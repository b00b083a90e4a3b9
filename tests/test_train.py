"""Training a stage: every optimisation flag takes a real step; the CLI trains a tiny stage
end to end on shards made by the real ingest/precache and logs it to MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import imagen, make_project, shrink
from tiny import run as run_cmd

from imagen.checkpoint import load_stage, read_stage
from imagen.config import StageConfig, deep_merge, resolve_params
from imagen.train import ImagenStage, build_trainer, lightning_precision, update_ema


def tiny_stage(name: str = "base64", **over: Any) -> StageConfig:
    """A toy stage built from the repository's params.yaml (dotted overrides on the stage)."""
    raw = shrink(Path("/nonexistent"))
    block: dict[str, Any] = {}
    for key, value in over.items():
        node = block
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    raw["stages"][name] = deep_merge(raw["stages"][name], block)
    return resolve_params(raw).stage(name)


def batches(stage: StageConfig, n: int, batch: int = 2) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    s = stage.model.unet.image_size
    cond = stage.model.conditioning
    out = []
    for i in range(n):
        b = {
            "image": torch.rand(batch, 3, s, s, generator=g) * 2 - 1,
            "text_embed": torch.randn(batch, cond.token_length, cond.embed_dim, generator=g),
            "text_mask": torch.arange(cond.token_length).expand(batch, -1) < 5,
            "caption": ["a red disk"] * batch,
            "key": [f"{i}-{j}" for j in range(batch)],
        }
        if stage.model.is_sr:
            low = s * stage.lowres // stage.resolution
            b["lowres"] = torch.rand(batch, 3, low, low, generator=g) * 2 - 1
        out.append(b)
    return out


def one_step(stage: StageConfig, tmp_path: Path) -> tuple[ImagenStage, Any]:
    module = ImagenStage(stage)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = build_trainer(stage, tmp_path, [], logger=False)
    trainer.fit(
        module, train_dataloaders=torch.utils.data.DataLoader(batches(stage, 2), batch_size=None)
    )
    assert trainer.global_step == 1
    after = module.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    assert all(torch.isfinite(v).all() for v in after.values())
    return module, trainer


ONE_STEP = {
    "fp32": {},
    "activation checkpointing": {"model.unet.gradient_checkpointing": True},
    "bf16": {"trainer.precision": "bf16"},
    "flash attention": {"model.unet.flash_attention": True},
    "channels_last": {"model.channels_last": True},
    "all together": {
        "model.unet.gradient_checkpointing": True,
        "trainer.precision": "bf16",
        "model.unet.flash_attention": True,
        "model.channels_last": True,
    },
}


@pytest.mark.parametrize("flags", list(ONE_STEP.values()), ids=list(ONE_STEP))
def test_each_optimisation_takes_a_step(flags: dict[str, Any], tmp_path: Path) -> None:
    stage = tiny_stage("base64", **{"trainer.max_steps": 1, **flags})
    module, trainer = one_step(stage, tmp_path)
    if stage.trainer.precision == "bf16":
        assert str(trainer.precision) == "bf16-mixed"
    if stage.model.channels_last:
        conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the EMA followed the first optimiser step
    assert int(module.ema.n_averaged) == 1


def test_sr_stage_step_with_noise_augmented_lowres(tmp_path: Path) -> None:
    aug = {"enabled": True, "kind": "cosine_vp", "max_level": 0.5}
    over = {"trainer.max_steps": 1, "trainer.precision": "bf16", "model.noise_cond_aug": aug}
    stage = tiny_stage("sr256", **over)
    module, _ = one_step(stage, tmp_path)
    batch = batches(stage, 1, batch=64)[0]
    cond = module.condition(batch)
    level = cond["aug_level"]
    assert level.shape == (64,) and level.min() >= 0 and level.max() <= 0.5
    assert level.std() > 0.05  # a random level per sample
    drop = cond["drop_text"].float().mean()
    assert 0 < drop < 0.4  # drop_rate 0.1
    # the demo's SR stages diffuse the residual to the clean (un-augmented) low-res image
    assert stage.model.lowres_residual and torch.equal(cond["lowres_image"], batch["lowres"])
    assert not torch.equal(cond["lowres"], batch["lowres"])


@pytest.mark.slow
def test_inductor_compiles_the_unet(tmp_path: Path) -> None:
    stage = tiny_stage("base64", **{"trainer.max_steps": 1, "model.inductor": True})
    module, _ = one_step(stage, tmp_path)
    assert not any("_orig_mod" in k for k in module.state_dict())  # keys stay loadable


def test_precision_names() -> None:
    assert lightning_precision("bf16") == "bf16-mixed"
    assert lightning_precision("32") == "32-true"
    assert lightning_precision("bf16-mixed") == "bf16-mixed"


def _eval_loss(net: torch.nn.Module, stage: StageConfig, batch: dict[str, Any]) -> float:
    from imagen.diffusion import build_denoiser

    den = build_denoiser(stage.model, net.eval())
    cond = {"text_embed": batch["text_embed"], "text_mask": batch["text_mask"]}
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(sum(den.loss(batch["image"], cond, generator=g) for _ in range(8)) / 8)


@pytest.mark.slow
def test_cli_trains_base_stage_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from imagen.data.holdout import holdout_batches
    from imagen.nn import build_unet

    params = make_project(tmp_path)
    res = run_cmd(
        [sys.executable, "-m", "imagen.cli", "train", "--stage", "base64",
         "-S", "stages.base64.trainer.max_steps=30",
         "-S", "stages.base64.trainer.optim.warmup_steps=20",
         # rank the kept checkpoints by the held-out loss (NeMo's default: the training loss)
         "-S", "stages.base64.trainer.keep.monitor=heldout/loss"],
        tmp_path, 300, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    out = tmp_path / "models" / "base64"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["images_per_s"] > 0
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "samples").glob("step_*.png"))
    # model.pt: EMA weights, loads with weights_only, and produces finite samples
    stage, state, info = read_stage(out / "model.pt")
    assert info["step"] == 30
    torch.load(out / "model.pt", weights_only=True)
    net, _ = load_stage(out / "model.pt")
    from imagen.diffusion import build_denoiser, sample

    monkeypatch.chdir(tmp_path)  # the params' data folders are relative
    b = holdout_batches(resolve_params_at(tmp_path), 8, "base64")[0]
    x = sample(
        build_denoiser(stage.model, net),
        (2, 3, 16, 16),
        {"text_embed": b["text_embed"][:2], "text_mask": b["text_mask"][:2]},
        stage.sampling,
    )
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    # the loss fell: the trained EMA weights beat the initial weights on held-out data
    torch.manual_seed(params.stages["base64"].trainer.seed)
    init = build_unet(stage.model)
    assert _eval_loss(net, stage, b) < _eval_loss(init, stage, b)
    # MLflow: the run has the config, per-step loss/lr/throughput, samples and the model
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stages.base64.trainer.max_steps"] == "30"
    for key in ("train/loss_avg", "train/lr", "train/images_per_s"):
        assert len(client.get_metric_history(run_id, key)) >= 5, key
    lr = [m.value for m in client.get_metric_history(run_id, "train/lr")]
    assert lr[0] < lr[-1] == pytest.approx(2e-3)  # linear warm-up to the configured lr
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "metrics.json", "samples", "checkpoints"} <= names
    # the held-out loss at fixed noise levels, at every best-k candidate step (10, 20, 30)
    heldout = {m.step: m.value for m in client.get_metric_history(run_id, "heldout/loss")}
    assert sorted(heldout) == [10, 20, 30]
    sigmas = params.stages["base64"].trainer.heldout_loss.sigmas
    bands = [client.get_metric_history(run_id, f"heldout/loss_sigma_{s:g}") for s in sigmas]
    for step, value in heldout.items():
        per = [next(m.value for m in band if m.step == step) for band in bands]
        assert value == pytest.approx(sum(per) / len(per))
    assert metrics["heldout_loss"] == pytest.approx(heldout[30])
    # ... which ranked the kept checkpoints: the two lowest of the three
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (kept,) = [v for k, v in state.items() if "'role': 'best'" in k]
    kept_steps = {int(Path(p).name.split("-")[0][len("step=") :]) for p in kept["best_k_models"]}
    assert kept_steps == set(sorted(heldout, key=heldout.get)[:2])
    # the data set it trained on, and the machine it ran on
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert dataset.name == "embedded" and json.loads(dataset.profile) == manifest["counts"]
    assert len(dataset.digest) == 16
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics


def resolve_params_at(root: Path):
    from imagen.config import load_params

    return load_params(root / "params.yaml")


@pytest.mark.slow
def test_unreachable_tracking_server_still_trains(tmp_path: Path) -> None:
    make_project(tmp_path)
    res = imagen(
        tmp_path,
        "train",
        "--stage",
        "base64",
        "-S",
        "mlflow.tracking_uri=http://127.0.0.1:9",
        "-S",
        "stages.base64.trainer.max_steps=4",
        "-S",
        "stages.base64.trainer.checkpoint_every_n_steps=2",
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert "cannot be reached" in res.stdout
    out = tmp_path / "models" / "base64"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_nemos_fixed_decay_unless_warmed_up(warmup: bool) -> None:
    """NeMo: w_ema <- d w_ema + (1 - d) w with a fixed d; trainer.ema_warmup uses
    min(d, (1+n)/(10+n)), so the first update moves the EMA most of the way to the weights."""
    module = ImagenStage(tiny_stage(**{"trainer.ema_decay": 0.99, "trainer.ema_warmup": warmup}))
    net = module.denoiser.net
    before = [p.detach().clone() for p in module.ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    module.ema.update_parameters(net)  # the first update copies the weights (n = 0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    module.ema.update_parameters(net)  # n = 1: decay 0.99 fixed, or min(0.99, 2/11)
    d = min(0.99, 2 / 11) if warmup else 0.99
    for b, e in zip(before, module.ema.module.parameters(), strict=True):
        expected = d * (b + 1.0) + (1 - d) * (b + 2.0)
        torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-5)
    # what training calls (on the device, no host read) computes the same; its first update
    # copies the weights too
    trained = ImagenStage(module.stage)
    for shift in (1.0, 2.0):
        with torch.no_grad():
            for p, b in zip(trained.net.parameters(), before, strict=True):
                p.copy_(b + shift)
        update_ema(trained.ema, trained.net, 0.99, warmup)
    for a, e in zip(module.ema.module.parameters(), trained.ema.module.parameters(), strict=True):
        torch.testing.assert_close(e, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_learning_rate_warms_up_then_holds_as_nemo_or_decays_when_asked(decay: str) -> None:
    """NeMo's WarmupHoldPolicy: linear warm-up, then the rate holds. optim.decay cosine (a
    departure) falls from lr after warm-up to decay_to x lr at max_steps, halfway between
    them at the middle, and the schedule's state resumes where it was."""
    keys = {
        "trainer.max_steps": 110,
        "trainer.optim.lr": 1e-3,
        "trainer.optim.warmup_steps": 10,
        "trainer.optim.decay": decay,
        "trainer.optim.decay_to": 0.2,
    }

    def run(module: ImagenStage, steps: int, state: dict | None = None) -> tuple[list, dict]:
        conf = module.configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        if state is not None:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs, {"opt": opt.state_dict(), "sched": sched.state_dict()}

    lrs, _ = run(ImagenStage(tiny_stage(**keys)), 111)
    assert lrs[0] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-3)
    if decay == "none":
        assert lrs[60] == lrs[110] == pytest.approx(1e-3)
    else:
        assert lrs[60] == pytest.approx(0.6e-3) and lrs[110] == pytest.approx(0.2e-3)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    first, state = run(ImagenStage(tiny_stage(**keys)), 40)
    rest, _ = run(ImagenStage(tiny_stage(**keys)), 71, state)
    assert first + rest == pytest.approx(lrs)
