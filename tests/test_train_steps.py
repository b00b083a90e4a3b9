"""What a training step promises under the real ``imagen train`` loop and its callbacks:
non-finite losses and gradients are skipped and counted (``nan_policy: skip``) or stop the run
naming the step (``stop``); gradient accumulation changes neither the units of the logged
losses nor the number of log rows, grids and best-k candidates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_train import batches
from tiny import imagen, make_project, shrink

from imagen.config import Params, deep_merge, resolve_params
from imagen.mlops.tracking import StageRun
from imagen.train import ImagenStage, NonFiniteLossError, build_trainer, train_stage
from imagen.train import stage as stage_mod
from imagen.train.grids import SampleGrid


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny project (real shards) for the runs below; each trains into its own folder."""
    root = tmp_path_factory.mktemp("steps")
    make_project(root)
    return root


def _sets(**over: Any) -> list[str]:
    return [a for k, v in over.items() for a in ("-S", f"stages.base64.trainer.{k}={v}")]


@pytest.mark.slow
def test_nan_policy_skip_finishes_and_counts_the_skipped_steps(project: Path) -> None:
    # lr 1e6 blows the weights up within a step or two: every later step is non-finite
    lr = {"optim.lr": 1e6, "optim.warmup_steps": 1}
    args = _sets(nan_policy="skip", max_steps=6, batch_size=4, log_every_n_steps=2,
                 checkpoint_every_n_steps=3, **lr)  # fmt: skip
    res = imagen(project, "train", "--stage", "base64", "--out", "models/skip", *args)
    assert res.returncode == 0, res.stdout[-3000:]
    metrics = json.loads((project / "models/skip/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["skipped_nonfinite"] > 0
    assert "non-finite step(s) so far, the first at step" in res.stdout
    ckpt = torch.load(project / "models/skip/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["imagen"]["skipped_nonfinite"] == metrics["skipped_nonfinite"]
    # a skipped step changes nothing: AdamW counted only the others, the EMA too
    taken = 6 - metrics["skipped_nonfinite"]
    steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {taken} and int(ckpt["state_dict"]["ema.n_averaged"]) == taken
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def _real_callbacks(tmp_path: Path, policy: str) -> tuple[Params, Any, list]:
    """A toy base stage's params and the callbacks ``imagen train`` gives it."""
    over = {"stages": {"base64": {"trainer": {
        "max_steps": 4, "nan_policy": policy, "checkpoint_every_n_steps": 1,
        "log_every_n_steps": 2}}}}  # fmt: skip
    params = resolve_params(shrink(tmp_path, over))
    stage = params.stage("base64")
    _, callbacks = stage_mod._callbacks(params, stage, tmp_path, StageRun(), False)
    return params, stage, callbacks


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_gradients_of_a_finite_loss_are_caught(tmp_path: Path, policy: str) -> None:
    _, stage, callbacks = _real_callbacks(tmp_path, policy)
    module = ImagenStage(stage)
    # the fault: step 1's gradients of one weight are not finite; the loss stays finite
    weight = next(p for p in module.net.parameters() if p.ndim > 1)
    weight.register_hook(lambda g: g * float("nan") if module.trainer.global_step == 1 else g)
    trainer = build_trainer(stage, tmp_path, callbacks, logger=False)
    loader = torch.utils.data.DataLoader(batches(stage, 4), batch_size=None)
    last = tmp_path / "checkpoints" / "last.ckpt"
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="step 1: the gradients are not finite"):
            trainer.fit(module, train_dataloaders=loader)
        assert torch.load(last, weights_only=True)["global_step"] == 1  # the step before
        return
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 4 and module.skipped_nonfinite == 1
    state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {3}  # AdamW skipped the bad step
    assert int(module.ema.n_averaged) == 3
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert torch.load(last, weights_only=True)["imagen"]["skipped_nonfinite"] == 1


def _params(root: Path, **trainer: Any) -> Params:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    return resolve_params(deep_merge(raw, {"stages": {"base64": {"trainer": trainer}}}))


@pytest.mark.slow
def test_accumulation_keeps_loss_units_rows_grids_and_best_k(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    grids: list[int] = []
    write = SampleGrid.write

    def counted(self: SampleGrid, module: Any, step: int, *args: Any) -> Any:
        grids.append(step)
        return write(self, module, step, *args)

    monkeypatch.setattr(SampleGrid, "write", counted)
    runs = {}
    for k in (1, 2):
        grids.clear()
        params = _params(project, accumulate_grad_batches=k, max_steps=4, batch_size=4,
                         log_every_n_steps=2, checkpoint_every_n_steps=2,
                         sample_every_n_steps=2, progress_seconds=3600.0)  # fmt: skip
        out = project / "models" / f"accumulate{k}"
        metrics = train_stage(params, "base64", out)
        rows = [line.split(",") for line in (out / "loss.csv").read_text().splitlines()[1:]]
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
        best = [v for key, v in ckpt["callbacks"].items() if "'role': 'best'" in key][0]
        runs[k] = {"rows": rows, "grids": list(grids), "best": best, "metrics": metrics}
    for k, run in runs.items():
        assert [int(s) for s, _ in run["rows"]] == [2, 4], k  # one row per log step
        assert run["grids"] == [2, 4, 4], k  # one grid per sampling step (and the final one)
        assert run["metrics"]["steps"] == 4
        # the best-k monitor is the logged mean loss of the last log_every_n_steps steps
        scores = sorted(float(v) for v in run["best"]["best_k_models"].values())
        assert scores[0] == pytest.approx(min(float(v) for _, v in run["rows"]), rel=1e-5), k
    # the same units: the mean loss per micro-batch, not divided by k
    ratio = runs[2]["metrics"]["first_loss"] / runs[1]["metrics"]["first_loss"]
    assert 0.75 < ratio < 1.33, ratio


@pytest.mark.parametrize(
    "attention,pooling,null",
    [("self", "attention", True), ("self", "mean", True), ("fused", "attention", True)],
)
def test_unused_parameters_are_exactly_those_without_gradients(
    attention: str, pooling: str, null: bool
) -> None:
    from imagen.diffusion.denoiser import build_denoiser
    from imagen.nn import build_unet
    from imagen.train import unused_parameters

    unet = {"attention_type": attention, "feature_pooling_type": pooling, "use_null_token": null}
    over = {"stages": {"base64": {"model": {"unet": unet}}}}
    stage = resolve_params(shrink(Path("/nonexistent"), over)).stage("base64")
    net = build_unet(stage.model)
    batch = batches(stage, 1)[0]
    cond = {"text_embed": batch["text_embed"], "text_mask": batch["text_mask"]}
    build_denoiser(stage.model, net).loss(batch["image"], cond).backward()
    no_grad = {n for n, p in net.named_parameters() if p.grad is None}
    assert no_grad == set(unused_parameters(net))
    if attention == "self":
        assert "cond.null_token" in no_grad
    module = ImagenStage(stage)  # what a DDP run gets: those are frozen, the rest train
    frozen = {n for n, p in module.net.named_parameters() if not p.requires_grad}
    assert frozen == no_grad
