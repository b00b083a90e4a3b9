"""The streaming loader: per-stage shapes, padding and masks, disjoint DDP x worker streams,
aligned SR pairs, online encoding and held-out batches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from imagen.config import Params, ProgressiveConfig, StageConfig, deep_merge, resolve_params
from imagen.data.datamodule import ImagenDataModule
from imagen.data.holdout import holdout_batches
from imagen.data.ingest import ingest
from imagen.data.loader import collate, make_dataset
from imagen.data.precache import precache
from imagen.text import pad_or_trim

REPO = Path(__file__).resolve().parents[1]


def make_params(root: Path, data: dict[str, Any], **cond: Any) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    text = {
        "token_length": 16,
        "embed_dim": 32,
        # bytes: the mask checks below count one token per caption byte
        "encoder": {
            "d_model": 32,
            "num_layers": 1,
            "num_heads": 2,
            "d_ff": 64,
            "tokenizer": "byt5",
        },
    } | cond
    over = {
        "data": {
            "num_holdout": 2,
            "shards_dir": str(root / "shards"),
            "encoded_dir": str(root / "encoded"),
        }
        | data,
        "model": {"conditioning": text},
        "trainer": {"num_workers": 0, "shuffle_buffer": 4},
        "stages": {"base64": {"trainer": {"progressive": None}}},
    }
    return resolve_params(deep_merge(raw, over))


def prepare(root: Path, data: dict[str, Any], **cond: Any) -> Params:
    params = make_params(root, data, **cond)
    ingest(params.data, progress=False)
    precache(params, progress=False)
    return params


@pytest.fixture(scope="module")
def data256(tmp_path_factory: pytest.TempPathFactory) -> Params:
    root = tmp_path_factory.mktemp("data256")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return prepare(root, {"num_train": 6, "image_size": 256, "samples_per_shard": 4})


@pytest.fixture
def in_project(data256: Params, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.chdir(Path(data256.data.shards_dir).parent)  # data/encoder lives there
    return data256


@pytest.mark.parametrize(
    ("stage", "image", "lowres"), [("base64", 64, None), ("sr256", 64, 16), ("sr1024", 64, 16)]
)
def test_batch_shapes_per_stage(in_project: Params, stage: str, image: int, lowres: int) -> None:
    params = in_project
    st = params.stage(stage).model_copy(deep=True)
    st.trainer.batch_size = 3
    dm = ImagenDataModule(params, st)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    # what crosses the worker boundary: uint8 images, the stored fp16 tokens unpadded
    assert raw["image"].dtype == torch.uint8 and "text_embed" not in raw
    assert raw["text_tokens"].dtype == torch.float16
    assert raw["text_tokens"].shape == (int(raw["text_lens"].sum()), 32)
    batch = dm.on_after_batch_transfer(raw, 0)  # what the training step reads
    assert batch["image"].shape == (3, 3, image, image) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    if lowres is None:
        assert "lowres" not in batch
    else:
        assert batch["lowres"].shape == (3, 3, lowres, lowres)
    assert batch["text_embed"].shape == (3, 16, 32) and batch["text_embed"].dtype == torch.float32
    mask = batch["text_mask"]
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    for i, cap in enumerate(batch["caption"]):
        n = min(len(cap.encode()) + 1, 16)  # ByT5: one token per byte + </s>, truncated
        assert mask[i].sum() == n and mask[i, :n].all()
        assert (batch["text_embed"][i, n:] == 0).all() and batch["text_embed"][
            i, :n
        ].abs().sum() > 0
    assert len(batch["key"]) == 3 and all(k.startswith("train-") for k in batch["key"])


def test_training_stream_repeats_past_an_epoch(in_project: Params) -> None:
    st = in_project.stage("base64").model_copy(deep=True)
    st.trainer.batch_size = 4
    batches = list(itertools.islice(iter(ImagenDataModule(in_project, st).train_dataloader()), 4))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 16 and len(set(keys)) == 6  # 6 training samples, seen again and again


def test_pad_or_trim() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    padded, mask = pad_or_trim(x, 8)
    assert padded.shape == (8, 2) and mask.tolist() == [True] * 6 + [False] * 2
    assert torch.equal(padded[:6], x) and (padded[6:] == 0).all()
    trimmed, mask = pad_or_trim(x, 4)
    assert torch.equal(trimmed, x[:4]) and mask.all()


def first_batch(params: Params, stage: StageConfig) -> dict[str, Any]:
    """The data module's first training batch, finished as the training step sees it."""
    dm = ImagenDataModule(params, stage)
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


def test_sr_pairs_are_aligned(in_project: Params) -> None:
    st = in_project.stage("sr256").model_copy(deep=True)
    st.trainer.batch_size = 6
    _assert_aligned(first_batch(in_project, st))


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_finished_batches_equal_normalising_and_padding_in_the_worker(
    in_project: Params, stage: str
) -> None:
    """uint8 + unpadded fp16 through the loader, finished after the transfer, give exactly the
    float32 images and zero-padded features that decoding to float and padding gave."""
    import io

    import numpy as np
    from PIL import Image

    from imagen.data.loader import finish_batch, pick_image, resize_image, to_tensor
    from imagen.text import from_storage

    st = in_project.stage(stage)
    ds = make_dataset(in_project, st, "train", epochs=1, train=False)  # centre crops
    pairs = list(ds.decoded())
    batch = finish_batch(collate([ex for _, ex in pairs]), 16)
    cond = in_project.conditioning
    for i, (sample, _) in enumerate(pairs):
        res = ds.pyramid.res
        with Image.open(io.BytesIO(pick_image(sample, res))) as im:
            full = resize_image(im.convert("RGB"), res)
        c, o = ds.pyramid.crop, (res - ds.pyramid.crop) // 2
        assert torch.equal(batch["image"][i], to_tensor(full.crop((o, o, o + c, o + c))))
        stored = np.load(io.BytesIO(sample[f"{cond.precached_key}.npy"]))
        embed, mask = pad_or_trim(from_storage(stored), 16)
        assert torch.equal(batch["text_embed"][i], embed)
        assert torch.equal(batch["text_mask"][i], mask)
    assert batch["text_embed"].dtype == torch.float32 and "text_tokens" not in batch


def _assert_aligned(batch: dict[str, Any]) -> None:
    low = batch["lowres"].shape[-1]
    down = F.interpolate(batch["image"], size=low, mode="bicubic", antialias=True)
    aligned = (down - batch["lowres"]).abs().mean()
    shifted = (down[..., 2:, 2:] - batch["lowres"][..., :-2, :-2]).abs().mean()
    assert aligned < 0.05, aligned
    assert aligned < 0.5 * shifted, (aligned, shifted)


def test_several_crops_per_decoded_image(in_project: Params) -> None:
    """Each decoded image gives crops_per_image random crops, and a crop shuffle spreads
    them over batches (one image's crops in one batch would be a batch of near-duplicates)."""
    st = in_project.stage("sr256").model_copy(deep=True)
    st.trainer.batch_size, st.trainer.crops_per_image, st.trainer.shuffle_buffer = 6, 3, 0
    dm = ImagenDataModule(in_project, st)
    loader = [dm.on_after_batch_transfer(b, 0) for b in itertools.islice(dm.train_dataloader(), 3)]
    keys = [k for b in loader for k in b["key"]]
    assert {keys.count(k) for k in keys[:6]} & {2, 3, 4, 5, 6}  # each image cropped again
    batches_of = {k: {i for i, b in enumerate(loader) if k in b["key"]} for k in set(keys)}
    assert any(len(v) > 1 for v in batches_of.values())  # an image's crops in several batches
    assert any(len(set(b["key"])) > 2 for b in loader)  # unspread: 2 images x 3 crops a batch
    batch = loader[0]
    key = next(k for k in batch["key"] if keys.count(k) > 1)
    rows = [
        (b["image"][i], b["text_embed"][i])
        for b in loader
        for i, k in enumerate(b["key"])
        if k == key
    ]
    assert not all(torch.equal(rows[0][0], r[0]) for r in rows[1:])  # random crops
    assert all(torch.equal(rows[0][1], r[1]) for r in rows[1:])  # of one captioned image
    _assert_aligned(batch)  # every crop keeps its low-res partner
    held = holdout_batches(in_project, 2, st, batch_size=2)[0]
    assert len(set(held["key"])) == 2  # evaluation: one centre crop per image


def _keys_seen(params: Params, rank: int, world: int, mp: pytest.MonkeyPatch) -> list[str]:
    mp.setenv("RANK", str(rank))  # what torchrun / Lightning DDP give each process
    mp.setenv("WORLD_SIZE", str(world))
    ds = make_dataset(params, params.stage("base64"), "train", epochs=1)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize("per_shard", [1, 5])  # 10 shards (dealt out) / 2 shards (< 4 streams)
def test_ddp_ranks_and_workers_see_disjoint_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_shard: int
) -> None:
    monkeypatch.chdir(tmp_path)
    params = prepare(tmp_path, {"num_train": 10, "image_size": 64, "samples_per_shard": per_shard})
    seen = [_keys_seen(params, rank, 2, monkeypatch) for rank in range(2)]
    all_keys = [k for s in seen for k in s]
    assert len(all_keys) == len(set(all_keys)) == 10  # disjoint, and together the whole set
    assert all(seen)


def test_online_encoding_encodes_captions_on_the_fly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    params = prepare(tmp_path, {"num_train": 4, "image_size": 64}, online_encoding=True)
    st = params.stage("base64").model_copy(deep=True)
    st.trainer.batch_size = 2
    dm = ImagenDataModule(params, st)
    batch = next(iter(dm.train_dataloader()))
    assert "text_embed" not in batch  # raw shards: captions only
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["text_embed"].shape == (2, 16, 32) and batch["text_mask"].shape == (2, 16)


def test_holdout_batches(in_project: Params) -> None:
    batches = holdout_batches(in_project, 2, "sr256", batch_size=1)
    assert len(batches) == 2
    assert [b["key"][0] for b in batches] == ["holdout-0000000", "holdout-0000001"]
    b = batches[0]
    assert b["image"].shape == (1, 3, 64, 64) and b["lowres"].shape == (1, 3, 16, 16)
    assert b["text_embed"].shape == (1, 16, 32) and b["attributes"][0]
    again = holdout_batches(in_project, 2, "sr256", batch_size=1)  # center crops: repeatable
    assert torch.equal(again[0]["image"], b["image"])


def test_stage_decodes_the_smallest_stored_copy_that_covers_it() -> None:
    """Ingest stores a pyramid; base64 must not decode the 1024 px image to train at 64."""
    import io

    from PIL import Image

    from imagen.data.ingest import _pyramid
    from imagen.data.loader import pick_image

    img = Image.new("RGB", (256, 256), (200, 10, 10))
    sample = {"png": b"full", **_pyramid(img, [64, 128, 256, 512], "png")}
    assert sorted(k for k in sample if k != "png") == ["128.png", "64.png"]  # >= 256 skipped
    assert Image.open(io.BytesIO(pick_image(sample, 64))).size == (64, 64)
    assert Image.open(io.BytesIO(pick_image(sample, 100))).size == (128, 128)
    assert pick_image(sample, 256) == b"full"
    assert pick_image({"txt": b"x"}, 64) is None


def test_progressive_steps_train_on_downsampled_images(in_project: Params) -> None:
    """trainer.progressive: the loader draws the larger batch; the first steps train on that
    many images area-downsampled, the later ones on trainer.batch_size full-size images."""
    from imagen.data.loader import progressive_batch

    st = in_project.stage("base64").model_copy(deep=True)
    st.trainer.batch_size = 2
    st.trainer.progressive = ProgressiveConfig(resolution=32, steps=3, batch_size=4)
    st = StageConfig.model_validate(st.model_dump())
    batch = first_batch(in_project, st)
    assert batch["image"].shape == (4, 3, 64, 64)
    low = progressive_batch(st, dict(batch), step=2)
    assert low["image"].shape == (4, 3, 32, 32) and len(low["caption"]) == 4
    assert torch.allclose(low["image"], F.avg_pool2d(batch["image"], 2), atol=1e-6)
    full = progressive_batch(st, dict(batch), step=3)
    assert full["image"].shape == (2, 3, 64, 64) and full["key"] == batch["key"][:2]
    assert torch.equal(full["image"], batch["image"][:2])
    assert torch.equal(full["text_embed"], batch["text_embed"][:2])


@pytest.mark.parametrize(
    ("stage", "value", "message"),
    [
        ("sr256", {"resolution": 32, "steps": 1}, "only a base stage"),
        ("base64", {"resolution": 48, "steps": 1}, "trainer.progressive.resolution: 48"),
        ("base64", {"resolution": 64, "steps": 1}, "smaller than the UNet's image_size 64"),
    ],
)
def test_progressive_config_errors_name_the_key(stage: str, value: dict, message: str) -> None:
    from imagen.config import ConfigError, load_params

    sets = [f"stages.{stage}.trainer.progressive={json.dumps(value)}"]
    with pytest.raises(ConfigError, match="progressive") as err:
        load_params(REPO / "params.yaml", sets)
    assert message in str(err.value) and f"stages.{stage}" in str(err.value)


def test_lightning_trains_the_progressive_steps_small(in_project: Params, tmp_path: Path) -> None:
    """The data module's batch hook is what a real fit trains on: 2 steps at 32 px with 4
    images, then 2 at 64 px with 2 (the tiny base UNet of the project's preset, 64 px)."""
    from pytorch_lightning import Callback

    from imagen.train import ImagenStage, build_trainer

    st = in_project.stage("base64").model_copy(deep=True)
    st.model.unet = st.model.unet.model_copy(
        update={"embed_dim": 8, "attention_resolutions": [8], "num_attn_heads": 1}
    )
    st.trainer.max_steps, st.trainer.batch_size = 4, 2
    st.trainer.progressive = ProgressiveConfig(resolution=32, steps=2, batch_size=4)
    st.trainer.sample_every_n_steps = st.trainer.checkpoint_every_n_steps = 100
    st = StageConfig.model_validate(st.model_dump())
    seen: list[tuple[int, ...]] = []

    class Shapes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, idx) -> None:
            seen.append(tuple(batch["image"].shape))

    trainer = build_trainer(st, tmp_path, [Shapes()], logger=False)
    trainer.fit(ImagenStage(st), datamodule=ImagenDataModule(in_project, st))
    assert seen == [(4, 3, 32, 32)] * 2 + [(2, 3, 64, 64)] * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_decodes_only_what_each_step_trains_on(in_project: Params, workers: int) -> None:
    """trainer.progressive: 4 images a step for 3 steps, then 2 (not 4 of which 2 are unused),
    whatever the number of workers; a resumed run's loader starts at its step."""
    st = in_project.stage("base64").model_copy(deep=True)
    st.trainer.batch_size, st.trainer.num_workers = 2, workers
    st.trainer.progressive = ProgressiveConfig(resolution=32, steps=3, batch_size=4)
    st = StageConfig.model_validate(st.model_dump())

    def sizes(start: int) -> list[int]:
        loader = ImagenDataModule(in_project, st, start_step=start).train_dataloader()
        return [len(b["key"]) for b in itertools.islice(loader, 5)]

    assert sizes(0) == [4, 4, 4, 2, 2]
    assert sizes(2) == [4, 2, 2, 2, 2]


def test_shuffling_mixes_shards(in_project: Params) -> None:
    """The default buffer (twice data.samples_per_shard) draws the first batch from both of
    the two shards (4 + 2 samples); a buffer of 0 reads one shard after the other."""
    st = in_project.stage("base64").model_copy(deep=True)
    st.trainer.batch_size = 4

    def shards_in_first_batch(buffer: int | None) -> set[int]:
        st.trainer.shuffle_buffer = buffer
        batch = next(iter(ImagenDataModule(in_project, st).train_dataloader()))
        return {int(k.split("-")[1]) // 4 for k in batch["key"]}

    assert shards_in_first_batch(None) == {0, 1}
    assert len(shards_in_first_batch(0)) == 1


def test_num_workers_default_from_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagen.data.loader import resolve_num_workers

    st = resolve_params(yaml.safe_load((REPO / "params.yaml").read_text())).stage("base64")
    assert st.trainer.num_workers is None  # the default: resolved at run time
    for cores, local, workers in [(2, "", 1), (16, "", 8), (16, "4", 3), (1, "", 1)]:
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert resolve_num_workers(st) == workers, (cores, local)
    st.trainer.num_workers = 3
    assert resolve_num_workers(st) == 3


def test_the_training_order_is_the_same_on_every_run(in_project: Params) -> None:
    """The shuffle buffer is seeded (trainer.seed + data.seed): two runs draw the same samples
    in the same order, and another seed draws another order."""
    st = in_project.stage("base64").model_copy(deep=True)
    st.trainer.batch_size = 4

    def keys(stage: StageConfig) -> list[str]:
        loader = ImagenDataModule(in_project, stage).train_dataloader()
        return [k for b in itertools.islice(iter(loader), 3) for k in b["key"]]

    first = keys(st)
    assert keys(st) == first
    st.trainer.seed += 1
    assert keys(st) != first


def test_evaluating_and_sampling_do_not_import_lightning() -> None:
    """Lightning costs seconds to import: the stages that do not train start without it."""
    import subprocess
    import sys

    code = (
        "import sys, imagen.evaluate.stage, imagen.evaluate.dual_stage, imagen.sample.cascade;"
        "print('pytorch_lightning' in sys.modules);"
        "import imagen.data.datamodule;"
        "print('pytorch_lightning' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert out == ["False", "True"]
