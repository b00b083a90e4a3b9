"""The embedded evaluator: caption parsing, attribute accuracy, robustness, Frechet features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from imagen.embedded.dataset import ATTRIBUTES, COLOR_RGB, EmbeddedDataset
from imagen.embedded.evaluator import (
    NUM_FEATURES,
    EmbeddedEvaluator,
    chance_levels,
    images_to_tensor,
    parse_caption,
)


def _batch(num: int, size: int, split: str = "holdout", seed: int = 0):
    data = EmbeddedDataset(num, seed=seed, size=size, split=split)  # type: ignore[arg-type]
    items = [data[i] for i in range(num)]
    return images_to_tensor([it["image"] for it in items]), [it["attributes"] for it in items]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of float images (B, 3, H, W)."""
    k = torch.arange(-8, 9, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(
        F.pad(x, (8, 8, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3
    )
    return F.conv2d(
        F.pad(x, (0, 0, 8, 8), mode="replicate"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3
    )


@pytest.fixture(scope="module")
def evaluator() -> EmbeddedEvaluator:
    return EmbeddedEvaluator()


def test_parse_caption_recovers_every_attribute() -> None:
    for split in ("train", "holdout"):
        data = EmbeddedDataset(300, seed=5, split=split)  # type: ignore[arg-type]
        for i in range(len(data)):
            want = {k: getattr(data.scene(i), k) for k in ATTRIBUTES}
            assert parse_caption(data.caption(i), strict=True) == want, data.caption(i)
    assert parse_caption("a big violet disk at the top on a black backdrop") == {
        "shape": "circle",
        "color": "purple",
        "size": "large",
        "position": "top",
        "background": "dark",
    }
    assert parse_caption("a red thing") == {"color": "red"}
    with pytest.raises(ValueError, match="'shape' is missing"):
        parse_caption("a red thing", strict=True)
    with pytest.raises(ValueError, match="'color' is ambiguous"):
        parse_caption("a red and blue circle, small, left, dark background", strict=True)


@pytest.mark.parametrize("size", [64, 256])
def test_accuracy_on_held_out_images_is_at_least_95_percent_per_attribute(
    evaluator: EmbeddedEvaluator, size: int
) -> None:
    images, attrs = _batch(200, size)
    scores = evaluator.score(images, attrs)
    for name in ATTRIBUTES:
        assert scores[name].shape == (200,)
        assert scores[name].mean() >= 0.95, (name, float(scores[name].mean()))
    assert scores["agreement"].mean() >= 0.97


def test_input_conventions_agree(evaluator: EmbeddedEvaluator) -> None:
    images, attrs = _batch(12, 128)
    as_float = images.float() / 127.5 - 1.0  # [-1, 1]
    assert evaluator.predict(images) == evaluator.predict(as_float) == attrs
    unit = EmbeddedEvaluator(input_range=(0.0, 1.0))
    assert unit.predict(images.float() / 255.0) == attrs
    big, big_attrs = _batch(3, 1024)
    assert evaluator.predict(big) == big_attrs
    odd, odd_attrs = _batch(6, 96)  # not a multiple of the working size
    assert evaluator.predict(odd) == odd_attrs
    assert evaluator.predict(images[0]) == attrs[:1]  # a single (3, H, W) image


def test_pure_noise_scores_near_chance(evaluator: EmbeddedEvaluator) -> None:
    _, attrs = _batch(300, 8)
    noise = torch.randint(0, 256, (300, 3, 64, 64), dtype=torch.uint8)
    scores = evaluator.score(noise, attrs)
    chance = chance_levels()
    assert chance["shape"] == 1 / 4 and chance["color"] == 1 / 6 and chance["position"] == 1 / 5
    assert abs(float(scores["agreement"].mean()) - chance["agreement"]) < 0.08
    for name in ATTRIBUTES:
        assert float(scores[name].mean()) < chance[name] + 0.15, name


def test_robust_to_blur_and_noise_of_a_weak_generator(evaluator: EmbeddedEvaluator) -> None:
    images, attrs = _batch(120, 64)
    x = images.float() / 127.5 - 1.0
    degraded = _blur(x, 1.0) + 0.2 * torch.randn(x.shape)  # ~1 px blur, noise std 0.1 of range
    scores = evaluator.score(degraded.clamp(-1, 1), attrs)
    for name in ATTRIBUTES:
        assert scores[name].mean() >= 0.9, (name, float(scores[name].mean()))


def test_score_skips_attributes_a_caption_does_not_name(evaluator: EmbeddedEvaluator) -> None:
    images, attrs = _batch(4, 64)
    partial = [{"color": attrs[0]["color"]}, attrs[1], {}, {"shape": "square", "size": "small"}]
    scores = evaluator.score(images, partial)
    assert float(scores["agreement"][0]) == 1.0 and float(scores["agreement"][1]) == 1.0
    assert torch.isnan(scores["shape"][0]) and torch.isnan(scores["agreement"][2])
    with pytest.raises(ValueError, match="4 images but 3"):
        evaluator.score(images, attrs[:3])
    with pytest.raises(ValueError, match="'color': unknown value 'teal'"):
        evaluator.score(images, [{"color": "teal"}] * 4)
    with pytest.raises(ValueError, match="shape"):
        evaluator.predict(torch.zeros(2, 1, 64, 64))


def test_features_are_fixed_size_and_deterministic(evaluator: EmbeddedEvaluator) -> None:
    images, _ = _batch(5, 64)
    f = evaluator.features(images)
    assert f.shape == (5, NUM_FEATURES) == (5, evaluator.num_features)
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.equal(f, evaluator(images))
    assert torch.isfinite(evaluator.features(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))).all()


def _blobs(num: int, seed: int = 0) -> torch.Tensor:
    """Soft Gaussian blobs of palette colors on plain backgrounds: a 'blurry generator'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    palette = np.array(list(COLOR_RGB.values()))
    out = np.empty((num, 64, 64, 3), np.float32)
    for i in range(num):
        cx, cy = rng.uniform(0.25, 0.75, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(0.06, 0.14) ** 2))
        bg = np.full(3, 0.9 if rng.random() < 0.5 else 0.12)
        out[i] = bg + (palette[rng.integers(6)] - bg) * blob[..., None]
    return torch.from_numpy(np.round(out * 255).astype(np.uint8)).permute(0, 3, 1, 2)


def test_frechet_distance_with_torchmetrics_separates_real_from_fake() -> None:
    real_a, _ = _batch(200, 64, split="train")
    real_b, _ = _batch(200, 64, split="holdout")

    metric = FrechetInceptionDistance(feature=EmbeddedEvaluator(), reset_real_features=False)
    metric.update(real_a, real=True)

    def fid(fake: torch.Tensor) -> float:
        metric.reset()  # keeps the real features
        metric.update(fake, real=False)
        return float(metric.compute())

    real_vs_real = fid(real_b)
    real_vs_noise = fid(torch.randint(0, 256, (200, 3, 64, 64), dtype=torch.uint8))
    real_vs_blobs = fid(_blobs(200))
    blurred = (_blur(real_b.float(), 2.0)).round().clamp(0, 255).to(torch.uint8)
    real_vs_blurred = fid(blurred)
    assert real_vs_real >= 0.0
    assert real_vs_noise > 100 * real_vs_real, (real_vs_real, real_vs_noise)
    assert real_vs_blobs > 10 * real_vs_real, (real_vs_real, real_vs_blobs)
    assert real_vs_blurred > 4 * real_vs_real, (real_vs_real, real_vs_blurred)
