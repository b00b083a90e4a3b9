"""GPU backend settings of a training run: NeMo's ``allow_tf32`` and ``trainer.benchmark`` as
params keys that ``imagen import-nemo`` maps, set for the run and restored after, and outside
the resume settings hash; training grids sample in bf16 autocast where ``sample.precision``
says so (a CPU run of bf16 against fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import batches, tiny_stage
from tiny import shrink

from imagen.config import resolve_params
from imagen.nemo.config_import import import_config, validate
from imagen.train import ImagenStage, build_trainer
from imagen.train.grids import SampleGrid
from imagen.train.settings import settings_hash
from imagen.train.trainer import tf32

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "data" / "nemo_conf"


def test_import_nemo_maps_tf32_and_cudnn_benchmark() -> None:
    imp = import_config(CONF / "base64-500m.yaml")  # allow_tf32: True, trainer.benchmark: False
    assert imp.errors == []
    assert imp.values["stages.base64.trainer.allow_tf32"] is True
    assert imp.values["stages.base64.trainer.benchmark"] is False
    unmapped = {key for kind, key, _ in imp.notes if kind == "unmapped"}
    assert not {"allow_tf32", "trainer.benchmark"} & unmapped
    trainer = validate(imp, REPO / "params.yaml").stage("base64").trainer
    assert trainer.allow_tf32 is True and trainer.benchmark is False


def test_backend_and_loader_keys_keep_the_settings_hash() -> None:
    """A checkpoint resumes after these change: they do not change what its state means."""
    plain = tiny_stage().model_dump(mode="json")
    changed = tiny_stage(
        **{
            "trainer.allow_tf32": True,
            "trainer.benchmark": True,
            "trainer.num_workers": 3,
            "trainer.shuffle_buffer": 7,
        }
    ).model_dump(mode="json")
    assert settings_hash(changed) == settings_hash(plain)
    other_net = tiny_stage(**{"model.unet.embed_dim": 8}).model_dump(mode="json")
    assert settings_hash(other_net) != settings_hash(plain)  # the hash does see the state


def test_tf32_is_set_for_the_run_and_restored() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    with tf32(not before[0]):
        assert matmul.allow_tf32 is (not before[0]) and cudnn.allow_tf32 is (not before[0])
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    with tf32(None):  # null: PyTorch's settings untouched
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before


def test_the_trainer_sets_cudnn_benchmark(tmp_path: Path) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        build_trainer(tiny_stage(**{"trainer.benchmark": True}), tmp_path, [])
        assert torch.backends.cudnn.benchmark is True
        build_trainer(tiny_stage(**{"trainer.benchmark": False}), tmp_path, [])
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def _grid(precision: str, stage_name: str) -> tuple[SampleGrid, Any]:
    raw = shrink(Path("/nonexistent"), {"sample": {"precision": precision}})
    params = resolve_params(raw)  # no held-out shards: the grid takes a batch
    stage = params.stage(stage_name)
    grid = SampleGrid(params, stage)
    grid.fill_from_batch(batches(stage, 1, batch=4)[0])
    return grid, stage


@pytest.mark.parametrize("stage_name", ["base64", "sr256"])
def test_training_grids_in_bf16_stay_close_to_fp32(stage_name: str) -> None:
    grid32, stage = _grid("32", stage_name)
    grid16, _ = _grid("bf16", stage_name)
    torch.manual_seed(0)
    module = ImagenStage(stage)
    with torch.no_grad():  # wake the zero-initialised layers so the net's output matters
        for p in module.ema.module.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    a, b = grid32.images(module, seed=3), grid16.images(module, seed=3)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    diff = (a - b).abs()
    assert float(diff.mean()) < 0.03, float(diff.mean())
    assert float(diff.max()) > 0  # autocast really ran in bf16
    assert torch.equal(grid32.images(module, seed=3), a)  # fp32 grids are repeatable
    assert not _grid("auto", stage_name)[0].params.sample.bf16_on("cpu")  # fp32 on the CPU
    assert _grid("auto", stage_name)[0].params.sample.bf16_on("cuda")
