"""Caption-agreement scores and Frechet features for the embedded dataset, without weights.

Where no Inception or CLIP weights exist, evaluation of the embedded default uses this module:
:class:`EmbeddedEvaluator` reads the attributes of :mod:`imagen.embedded.dataset` back out of an
image analytically (no training, deterministic), scores them against the attributes a caption
asked for, and gives a fixed feature vector per image for a Frechet distance.

How an image is read (all at a working size of 64 px, whatever the input size):

1. resize (area average), then a light 3x3 blur so pixel noise does not reach the decisions;
2. background = per-channel median of the two-pixel border; ``light`` if its luma > 0.5;
3. object mask ``w = clip((|x - bg| - 0.15) / 0.2, 0, 1)`` (RGB distance to the background;
   every palette color lies >= 0.5 from both backgrounds, gradients stay under 0.1);
4. shape by analysis-by-synthesis: for each shape, a template of the mask's area centered on the
   mask's centroid is drawn with the dataset's own signed distance functions; the shape whose
   template has the highest soft IoU with the mask wins;
5. size from the radius that shape needs to cover the mask's area (threshold at the geometric
   mean of the two nominal radii), position as the nearest nominal bounding-box center,
   color as the nearest palette color to the mean color inside the eroded mask.

:meth:`EmbeddedEvaluator.features` concatenates soft versions of these statistics (attribute
probabilities, moments, IoUs, mask edge softness, gradient energy), a coarse joint RGB
histogram and a 4x4 luma thumbnail: :data:`NUM_FEATURES` numbers, each standardized by its mean
and standard deviation on 256 fixed reference renders (so real data has unit scale in every
feature and a shift in edge softness counts as much as one in color). The module's ``forward`` is
``features`` and it carries ``num_features``, so it plugs into torchmetrics as
``FrechetInceptionDistance(feature=EmbeddedEvaluator())`` (feed uint8 images, ``normalize=False``).

Images are tensors (B, 3, H, W): uint8 in [0, 255], or floats in ``input_range`` ((-1, 1) by
default, the diffusion models' range).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from imagen.embedded.dataset import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOR_RGB,
    KEYWORDS,
    POSITION_XY,
    SIZE_RADIUS,
    render,
    sample_scene,
    shape_sdf,
)

__all__ = [
    "NUM_FEATURES",
    "EmbeddedEvaluator",
    "chance_levels",
    "images_to_tensor",
    "parse_caption",
]

WORK_SIZE = 64
_SHAPES = ATTRIBUTES["shape"]
# Area of each shape with bounding-box half-side r, divided by r^2.
_AREA_COEF = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
# Vertical offset of the area centroid below the bounding-box center, divided by r.
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "diamond": 0.0}
_SIZE_SPLIT = math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"])
_PALETTE = np.array([COLOR_RGB[c] for c in ATTRIBUTES["color"]], np.float32)  # (6, 3)
_ANCHORS = np.array([POSITION_XY[p] for p in ATTRIBUTES["position"]], np.float32)  # (5, 2)
_MASK_LOW, _MASK_HIGH = 0.15, 0.35
_HIST_BINS = 3
NUM_FEATURES = (
    3 + 3 + 3  # background color, object mean color, object color std
    + 1 + 2 + 3  # area, centroid, second central moments
    + len(_SHAPES)  # template IoUs
    + 2  # mask edge softness, gradient energy
    + len(ATTRIBUTES["color"]) + len(ATTRIBUTES["size"]) + len(ATTRIBUTES["position"])
    + len(ATTRIBUTES["background"])  # soft attribute probabilities
    + _HIST_BINS**3  # joint RGB histogram
    + 16  # 4x4 luma thumbnail
)  # fmt: skip


def chance_levels() -> dict[str, float]:
    """Accuracy of a random guess per attribute (uniform values), and their mean (agreement)."""
    levels = {name: 1.0 / len(values) for name, values in ATTRIBUTES.items()}
    levels["agreement"] = float(np.mean(list(levels.values())))
    return levels


def images_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """PIL images of one size -> uint8 tensor (B, 3, H, W)."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def parse_caption(caption: str, strict: bool = False) -> dict[str, str]:
    """Recover the attributes a caption of the embedded grammar names.

    An attribute is returned when exactly one of its values is named; with ``strict`` a missing
    or ambiguous attribute raises ``ValueError`` naming it.
    """
    words = set(_WORD.findall(caption.lower()))
    found: dict[str, str] = {}
    for name, values in KEYWORDS.items():
        hits = [value for value, keys in values.items() if words.intersection(keys)]
        if len(hits) == 1:
            found[name] = hits[0]
        elif strict:
            what = f"ambiguous ({', '.join(hits)})" if hits else "missing"
            raise ValueError(f"caption {caption!r}: attribute {name!r} is {what}")
    return found


_REFERENCE_SEED, _REFERENCE_NUM = 20_240_101, 256
_reference_cache: tuple[Tensor, Tensor] | None = None


def _reference_statistics() -> tuple[Tensor, Tensor]:
    """Mean and (floored) standard deviation of the raw features on fixed reference renders.

    Dividing by them gives every feature unit scale on real data, so that a Frechet distance
    weighs a shift in edge softness as much as one in color; computed once per process (~0.5 s).
    """
    global _reference_cache
    if _reference_cache is None:
        scenes = [sample_scene(i, seed=_REFERENCE_SEED) for i in range(_REFERENCE_NUM)]
        images = images_to_tensor([render(sc, WORK_SIZE) for sc in scenes])
        raw = EmbeddedEvaluator(standardize=False).features(images).double()
        mean, std = raw.mean(dim=0), raw.std(dim=0)
        _reference_cache = (mean.float(), std.clamp_min(0.02).float())
    return _reference_cache


class EmbeddedEvaluator(nn.Module):
    """Attribute predictions, caption-agreement scores and Frechet features for images."""

    num_features: int = NUM_FEATURES

    def __init__(
        self, input_range: tuple[float, float] = (-1.0, 1.0), standardize: bool = True
    ) -> None:
        super().__init__()
        lo, hi = input_range
        if not hi > lo:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
        self.input_range = (float(lo), float(hi))
        self.standardize = standardize
        mean, scale = _reference_statistics() if standardize else (None, None)
        self.register_buffer("feature_mean", mean, persistent=False)
        self.register_buffer("feature_scale", scale, persistent=False)

    # ------------------------------------------------------------------ preprocessing
    def _prepare(self, images: Tensor) -> np.ndarray:
        """(B, 3, H, W) uint8 or float -> (B, 64, 64, 3) float32 in [0, 1], resized and blurred."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.detach().to("cpu")
        h, w = x.shape[-2:]
        if h % WORK_SIZE == 0 and w % WORK_SIZE == 0 and h >= WORK_SIZE and w >= WORK_SIZE:
            # Exact area average over f x f blocks, in chunks to bound memory at 1024 px.
            fh, fw = h // WORK_SIZE, w // WORK_SIZE
            x = torch.cat(
                [
                    c.reshape(-1, 3, WORK_SIZE, fh, WORK_SIZE, fw).float().mean(dim=(3, 5))
                    for c in x.split(16)
                ]
            )
            h = w = WORK_SIZE
        else:
            x = x.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        else:
            lo, hi = self.input_range
            x = (x - lo) / (hi - lo)
        x = x.clamp(0.0, 1.0)
        if (h, w) != (WORK_SIZE, WORK_SIZE):
            mode = "area" if h >= WORK_SIZE and w >= WORK_SIZE else "bilinear"
            x = F.interpolate(x, size=(WORK_SIZE, WORK_SIZE), mode=mode)
        # Separable [1, 2, 1] / 4 blur with replicated edges.
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        x = (x[..., :-2] + 2 * x[..., 1:-1] + x[..., 2:]) / 4
        x = (x[..., :-2, :] + 2 * x[..., 1:-1, :] + x[..., 2:, :]) / 4
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    # ------------------------------------------------------------------ measurement
    def _measure(self, images: Tensor) -> dict[str, np.ndarray]:
        x = self._prepare(images)  # (B, n, n, 3)
        b, n = x.shape[0], WORK_SIZE
        border = np.concatenate(
            [x[:, :2].reshape(b, -1, 3), x[:, -2:].reshape(b, -1, 3)]
            + [x[:, 2:-2, :2].reshape(b, -1, 3), x[:, 2:-2, -2:].reshape(b, -1, 3)],
            axis=1,
        )
        bg = np.median(border, axis=1)  # (B, 3)
        dist = np.linalg.norm(x - bg[:, None, None, :], axis=-1)  # (B, n, n)
        w = np.clip((dist - _MASK_LOW) / (_MASK_HIGH - _MASK_LOW), 0.0, 1.0)  # object mask
        mass = w.sum(axis=(1, 2)) + 1e-6
        area = mass / (n * n)  # fraction of the image

        coords = (np.arange(n, dtype=np.float32) + 0.5) / n
        gx, gy = coords[None, None, :], coords[None, :, None]  # (1, 1, n), (1, n, 1)
        mx = (w * gx).sum(axis=(1, 2)) / mass
        my = (w * gy).sum(axis=(1, 2)) / mass
        dxm, dym = gx - mx[:, None, None], gy - my[:, None, None]
        sxx = (w * dxm**2).sum(axis=(1, 2)) / mass
        syy = (w * dym**2).sum(axis=(1, 2)) / mass
        sxy = (w * dxm * dym).sum(axis=(1, 2)) / mass

        # Analysis by synthesis: each shape's template, sized to the mask's area and placed so
        # its centroid sits on the mask's centroid; soft IoU = sum(min) / sum(max).
        ious, radii, centers = [], [], []
        for shape in _SHAPES:
            r = np.sqrt(area / _AREA_COEF[shape])  # (B,)
            cx, cy = mx, my - _CENTROID_DY[shape] * r
            sd = shape_sdf(shape, gx - cx[:, None, None], gy - cy[:, None, None], r[:, None, None])
            t = np.clip(0.5 - sd * n, 0.0, 1.0)
            ious.append(
                np.minimum(w, t).sum(axis=(1, 2)) / (np.maximum(w, t).sum(axis=(1, 2)) + 1e-6)
            )
            radii.append(r)
            centers.append(np.stack([cx, cy], axis=-1))
        iou = np.stack(ious, axis=-1)  # (B, S)
        best = iou.argmax(axis=-1)
        rows = np.arange(b)
        radius = np.stack(radii, axis=-1)[rows, best]  # (B,)
        center = np.stack(centers, axis=1)[rows, best]  # (B, 2)

        # Color from the eroded mask (3x3 minimum): edge pixels mix object and background.
        padded = np.pad(w, ((0, 0), (1, 1), (1, 1)), mode="edge")
        core = np.min([padded[:, i : i + n, j : j + n] for i in range(3) for j in range(3)], axis=0)
        use_core = core.sum(axis=(1, 2)) > 4.0  # fall back to the full mask for specks
        wf = np.where(use_core[:, None, None], core, w)[..., None] ** 2
        obj_rgb = (wf * x).sum(axis=(1, 2)) / (wf.sum(axis=(1, 2)) + 1e-6)  # (B, 3)
        obj_std = np.sqrt(
            (wf * (x - obj_rgb[:, None, None]) ** 2).sum(axis=(1, 2)) / (wf.sum(axis=(1, 2)) + 1e-6)
        )
        luma = x @ np.array([0.299, 0.587, 0.114], np.float32)  # (B, n, n)
        grad = np.abs(np.diff(luma, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(luma, axis=2)).mean(
            axis=(1, 2)
        )
        return {
            "image": x,
            "luma": luma,
            "bg": bg,
            "obj_rgb": obj_rgb,
            "obj_std": obj_std,
            "area": area,
            "centroid": np.stack([mx, my], axis=-1),
            "moments": np.stack([sxx, syy, sxy], axis=-1),
            "iou": iou,
            "shape": best,
            "radius": radius,
            "center": center,
            "softness": (4.0 * w * (1.0 - w)).mean(axis=(1, 2)),
            "gradient": grad,
        }

    @staticmethod
    def _probabilities(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Soft per-attribute probabilities (B, V) from the measurements."""

        def softmax(logits: np.ndarray) -> np.ndarray:
            z = np.exp(logits - logits.max(axis=-1, keepdims=True))
            return z / z.sum(axis=-1, keepdims=True)

        color_d = np.linalg.norm(m["obj_rgb"][:, None] - _PALETTE[None], axis=-1)
        pos_d = np.linalg.norm(m["center"][:, None] - _ANCHORS[None], axis=-1)
        bg_rgb = np.array([BACKGROUND_RGB[v] for v in ATTRIBUTES["background"]], np.float32)
        luma_w = np.array([0.299, 0.587, 0.114], np.float32)
        bg_luma = m["bg"] @ luma_w
        ref_luma = bg_rgb @ luma_w  # light, dark
        size_logit = (np.log(m["radius"] + 1e-6) - math.log(_SIZE_SPLIT)) / 0.1
        return {
            "shape": softmax(m["iou"] / 0.03),
            "color": softmax(-color_d / 0.05),
            "size": softmax(np.stack([-size_logit, size_logit], axis=-1)),
            "position": softmax(-pos_d / 0.04),
            "background": softmax(-np.abs(bg_luma[:, None] - ref_luma[None]) / 0.1),
        }

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, str]]:
        """The attribute values read from each image."""
        probs = self._probabilities(self._measure(images))
        picks = {name: p.argmax(axis=-1) for name, p in probs.items()}
        b = len(next(iter(picks.values())))
        return [
            {name: ATTRIBUTES[name][int(picks[name][i])] for name in ATTRIBUTES} for i in range(b)
        ]

    @torch.no_grad()
    def score(self, images: Tensor, attributes: list[dict[str, str]]) -> dict[str, Tensor]:
        """Per-attribute correctness (B,) in {0, 1} and ``agreement``, their mean per image.

        ``attributes`` holds what each caption asked for (e.g. from :func:`parse_caption`); an
        attribute a caption does not name is left out of that image's agreement (its entry is
        NaN in the per-attribute tensor).
        """
        predictions = self.predict(images)
        if len(attributes) != len(predictions):
            raise ValueError(f"got {len(predictions)} images but {len(attributes)} attribute dicts")
        out: dict[str, Tensor] = {}
        for name, values in ATTRIBUTES.items():
            col = []
            for pred, want in zip(predictions, attributes, strict=True):
                if name not in want:
                    col.append(math.nan)
                    continue
                if want[name] not in values:
                    raise ValueError(
                        f"attribute {name!r}: unknown value {want[name]!r}; expected {values}"
                    )
                col.append(float(pred[name] == want[name]))
            out[name] = torch.tensor(col, dtype=torch.float32)
        stacked = torch.stack([out[name] for name in ATTRIBUTES], dim=-1)  # (B, A)
        out["agreement"] = stacked.nanmean(dim=-1)
        return out

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, num_features) float32 features for a Frechet distance."""
        m = self._measure(images)
        probs = self._probabilities(m)
        x, b = m["image"], m["image"].shape[0]
        bins = np.minimum((x * _HIST_BINS).astype(np.int64), _HIST_BINS - 1)
        index = (bins[..., 0] * _HIST_BINS + bins[..., 1]) * _HIST_BINS + bins[..., 2]
        hist = np.stack(
            [np.bincount(index[i].ravel(), minlength=_HIST_BINS**3) for i in range(b)]
        ).astype(np.float32)
        hist = np.sqrt(hist / index[0].size)  # Hellinger-style scaling of the fractions
        thumb = m["luma"].reshape(b, 4, WORK_SIZE // 4, 4, WORK_SIZE // 4).mean(axis=(2, 4))
        parts = [
            m["bg"],
            m["obj_rgb"],
            m["obj_std"],
            np.sqrt(m["area"])[:, None],
            m["centroid"],
            np.sqrt(np.abs(m["moments"])) * np.sign(m["moments"]) * 4.0,
            m["iou"],
            m["softness"][:, None] * 10.0,
            m["gradient"][:, None] * 10.0,
            probs["color"],
            probs["size"],
            probs["position"],
            probs["background"],
            hist,
            thumb.reshape(b, 16),
        ]
        feats = np.concatenate([p.reshape(b, -1).astype(np.float32) for p in parts], axis=1)
        assert feats.shape[1] == NUM_FEATURES, feats.shape
        out = torch.from_numpy(feats)
        if self.feature_mean is not None:
            out = (out - self.feature_mean.cpu()) / self.feature_scale.cpu()
        return out.to(images.device)

    def forward(self, images: Tensor) -> Tensor:
        """Features (so the module can serve as torchmetrics' FID ``feature`` extractor)."""
        return self.features(images)
