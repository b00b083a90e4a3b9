"""The offline image-text evaluator (``imagen evaluator``) and the sweep on any captions.

A real dual encoder trained on real shards written by ``imagen ingest``; its held-out scores
beside their chance levels; ``imagen evaluate`` on captions the embedded grammar does not know,
which needs nothing but the trained evaluator; a damaged evaluator file is refused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from tiny import imagen, make_project, make_tiny_cascade

from imagen.config import ConfigError
from imagen.evaluate.dual import (
    DualEncoder,
    alignment_scores,
    chance_top_k,
    hash_captions,
    load_dual,
    save_dual,
)
from imagen.evaluate.dual_stage import train_evaluator


def test_alignment_scores_count_identical_captions_as_matches() -> None:
    captions = ["cat", "dog", "cat", "owl"]
    # rows: images; columns: captions. Image 0's own caption ties with the identical caption 2.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.9, 0.95],  # one mismatch (owl) above its own: AUC 1/2, not top-1
            [0.2, 0.8, 0.3, 0.1],  # own caption best: AUC 1
            [0.5, 0.6, 0.4, 0.0],  # dog above; cat (0) is identical, not a mismatch: AUC 1/2
            [0.3, 0.2, 0.1, -0.2],  # own caption worst: AUC 0
        ]
    )
    s = alignment_scores(sim, captions, ks=(1, 2))
    assert s["auc"] == pytest.approx((0.5 + 1 + 0.5 + 0) / 4)
    assert s["top1"] == pytest.approx(1 / 4)  # only image 1; image 0's best is owl
    assert s["top2"] == pytest.approx(3 / 4)  # images 0 (cat at 2nd), 1, 2 (cat at 2nd)
    assert s["clip_score"] == pytest.approx(100 * (0.9 + 0.8 + 0.4 + 0.0) / 4)
    # chance: a random ranking finds one of the two "cat" captions at top-1 half the time
    assert chance_top_k(captions, 1) == pytest.approx((0.5 + 0.25 + 0.5 + 0.25) / 4)
    assert s["top1_chance"] == pytest.approx(chance_top_k(captions, 1), abs=1e-4)


def test_caption_features_hash_the_same_in_every_process() -> None:
    idx, off = hash_captions(["Ein roter Apfel", "猫の顔"], 1 << 13)
    # crc32, not Python's salted hash(): the values are fixed numbers
    again, _ = hash_captions(["ein ROTER apfel", "猫の顔"], 1 << 13)
    assert torch.equal(idx, again) and off.tolist() == [0, int(off[1])]
    assert int(off[1]) > 3 and len(idx) > int(off[1])  # words, pairs and trigrams for each


@pytest.mark.slow
def test_evaluator_trains_on_ingested_shards_and_scores_held_out_pairs(tmp_path: Path) -> None:
    """`imagen evaluator` on real shards: matched held-out pairs score above mismatched ones."""
    root = tmp_path / "p"
    make_project(
        root,
        {
            "data": {"num_train": 96, "num_holdout": 16, "pyramid": [32]},
            "evaluator": {"steps": 80, "batch_size": 32, "resolution": 32, "quality_pairs": 16},
        },
    )
    res = imagen(root, "evaluator")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "held-out real pairs: AUC" in res.stdout
    metrics = json.loads((root / "models/evaluator/metrics.json").read_text())
    held = metrics["heldout"]
    assert metrics["training_pairs"] == 96 and held["pairs"] == 16
    # the embedded colours are learned in 80 steps; chance is .5
    assert held["auc"] > 0.75, held
    assert held["top5"] > held["top5_chance"], held
    model = load_dual(root / "models/evaluator/evaluator.pt")
    assert isinstance(model, DualEncoder) and model.cfg.resolution == 32


def _holdout_folder(shards: Path, captions: list[str]) -> None:
    shards.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", len(captions)), ("holdout", 4)):
        with wds.TarWriter(str(shards / f"{split}-000000.tar")) as sink:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (40 * i % 255, 90, 200 - 30 * i % 200)).save(buf, "PNG")
                caption = captions[i % len(captions)]
                sink.write({"__key__": f"{split}{i}", "png": buf.getvalue(), "txt": caption})


@pytest.mark.slow
def test_evaluate_on_captions_outside_the_embedded_grammar(tmp_path: Path) -> None:
    """The sweep on a user's captions: the trained evaluator gives both axes, named for it."""
    from imagen.evaluate.stage import evaluate

    params = make_tiny_cascade(tmp_path, overrides={"evaluate": {"sr_pairs": 0}})
    captions = ["grinning face emoji", "steam locomotive", "flag of japan", "red apple"] * 2
    _holdout_folder(Path(params.data.shards_dir), captions)
    with pytest.raises(FileNotFoundError, match="imagen evaluator"):
        evaluate(params, log=None, register_models=False)
    train_evaluator(params, log=lambda _m: None)
    metrics = evaluate(params, log=None, register_models=False)
    assert metrics["fidelity_metric"] == "fd_dual"
    assert metrics["alignment_metric"] == "caption_auc_dual"
    row = metrics["scales"][0]
    assert {"fd_dual", "caption_auc_dual", "clip_score_dual", "top1_dual"} <= set(row)
    assert "caption_agreement_embedded" not in row  # nothing in these captions to read back
    assert metrics["chance_dual"]["caption_auc_dual"] == 0.5
    assert metrics["evaluator_quality"]["heldout"]["pairs"] == 4
    assert 0.0 <= row["caption_auc_dual"] <= 1.0 and row["fd_dual"] >= 0.0
    # the cascade picture shows the base stage at the sweep's best scale
    assert metrics["cascade"]["base64_guidance"] == metrics["best"]["guidance_scale"]


def test_a_damaged_evaluator_file_is_refused_not_executed(tmp_path: Path) -> None:
    path = save_dual(DualEncoder(), tmp_path / "evaluator.pt")
    assert isinstance(load_dual(path), DualEncoder)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(ConfigError, match="not a readable evaluator"):
        load_dual(path)

    class Boom:
        def __reduce__(self):  # a pickle that would run a command if it were unpickled
            return (print, ("executed",))

    torch.save({"format": "imagen-dual-encoder/1", "config": Boom()}, path)
    with pytest.raises(ConfigError, match="not a readable evaluator"):
        load_dual(path)


def test_own_data_probe_distances_and_ranks() -> None:
    """bench/own_data_probe.py's plain-pixel yardsticks: the Frechet formula and own-image ranks."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("probe", root / "bench" / "own_data_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    assert probe.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    # a shifted copy: the distance is the squared shift (the covariances are equal)
    assert probe.frechet(a + 2.0, a) == pytest.approx(12.0, rel=1e-6)
    real = torch.eye(4, dtype=torch.float64)
    fake = real[[2, 0]] + 0.1  # near real image 2, then near real image 0
    assert probe.own_image_ranks(fake, real, own=[2, 1]).tolist() == [1, 2]
    images = torch.full((2, 3, 64, 64), 255, dtype=torch.uint8)
    assert probe.pix16(images).shape == (2, 768) and float(probe.pix16(images).max()) == 1.0
