"""The offline image-text evaluator for any data set: a small dual encoder trained contrastively.

With no Inception or CLIP weights on the machine, a user's own images still need the two axes of
the FID-CLIP sweep: a Frechet distance over image features and an image-text alignment score.
:class:`DualEncoder` is a CLIP-style pair of towers (Radford et al. 2021) small enough to train
on the training split in under a minute on a CPU:

- image tower: a strided conv net over 64 px images -> pooled features (the Frechet features)
  -> a linear projection into the joint space;
- text tower: hashed word, word-pair and character-trigram features of the caption (any
  script, no vocabulary file) -> an embedding bag -> an MLP into the joint space.

Trained with the symmetric InfoNCE loss (identical captions in a batch count as positives of
each other). Its own quality is measured on held-out real pairs (:func:`pair_quality`): matched
image-caption pairs must score above mismatched ones, reported as ROC AUC and retrieval top-k
beside their chance levels. Every number it gives is named ``*_dual`` in the reports.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "imagen-dual-encoder/1"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DualConfig:
    """The architecture (saved with the weights)."""

    resolution: int = 64
    width: int = 16  # channels of the first conv; doubled at every stride
    embed_dim: int = 128
    text_buckets: int = 1 << 13
    text_dim: int = 128


# --------------------------------------------------------------------------------------------
# text features
# --------------------------------------------------------------------------------------------
def caption_features(caption: str) -> list[str]:
    """Words, word pairs and the character trigrams of each word (with boundary marks)."""
    words = _WORD.findall(caption.lower())
    feats = [f"w:{w}" for w in words]
    feats += [f"p:{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    for w in words:
        padded = f"<{w}>"
        feats += [f"c:{padded[i : i + 3]}" for i in range(max(1, len(padded) - 2))]
    return feats or ["<empty>"]


def hash_captions(captions: Sequence[str], buckets: int) -> tuple[Tensor, Tensor]:
    """``(indices, offsets)`` for ``nn.EmbeddingBag``; crc32 keeps the hash stable across runs."""
    idx: list[int] = []
    offsets: list[int] = []
    for c in captions:
        offsets.append(len(idx))
        idx += [zlib.crc32(f.encode("utf-8")) % buckets for f in caption_features(c)]
    return torch.tensor(idx, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# the towers
# --------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()
    )


class ImageTower(nn.Module):
    """(B, 3, R, R) images in [-1, 1] -> (B, num_features) pooled conv features."""

    def __init__(self, cfg: DualConfig) -> None:
        super().__init__()
        w = cfg.width
        self.resolution = cfg.resolution
        self.net = nn.Sequential(_conv(3, w), _conv(w, 2 * w), _conv(2 * w, 4 * w))
        self.net.append(_conv(4 * w, 8 * w))
        self.num_features = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return self.net(x).mean(dim=(2, 3))  # (B, 8w)


class TextTower(nn.Module):
    """Hashed caption features -> (B, embed_dim)."""

    def __init__(self, cfg: DualConfig) -> None:
        super().__init__()
        self.buckets = cfg.text_buckets
        self.bag = nn.EmbeddingBag(cfg.text_buckets, cfg.text_dim, mode="mean")
        nn.init.normal_(self.bag.weight, std=0.1)
        self.mlp = nn.Sequential(
            nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU()
        )
        self.out = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def forward(self, indices: Tensor, offsets: Tensor) -> Tensor:
        h = self.bag(indices, offsets)
        return self.out(h + self.mlp(h))


class DualEncoder(nn.Module):
    """Image and caption embeddings in one space; cosine similarity says how well they match."""

    def __init__(self, cfg: DualConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DualConfig()
        self.image = ImageTower(self.cfg)
        self.image_proj = nn.Linear(self.image.num_features, self.cfg.embed_dim)
        self.text = TextTower(self.cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float in [-1, 1]; floats are taken as already in [-1, 1]."""
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1.0
        return images.float()

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, embed_dim), unit norm."""
        return F.normalize(self.image_proj(self.image(self.prepare(images))), dim=-1)

    def embed_captions(self, captions: Sequence[str]) -> Tensor:
        """Captions -> (B, embed_dim), unit norm."""
        idx, off = hash_captions(captions, self.cfg.text_buckets)
        dev = self.logit_scale.device
        return F.normalize(self.text(idx.to(dev), off.to(dev)), dim=-1)

    def loss(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Symmetric InfoNCE; identical captions in the batch are positives of each other."""
        img = self.embed_images(images)
        txt = self.embed_captions(captions)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions], device=logits.device)
        target = (cid[:, None] == cid[None, :]).float()
        target = target / target.sum(1, keepdim=True)
        return 0.5 * (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
        )


class DualImageFeatures(nn.Module):
    """The image tower's pooled features as torchmetrics' FID ``feature`` extractor."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.image.num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.model.image(DualEncoder.prepare(images)).double()


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def similarities(
    model: DualEncoder, images: Tensor, captions: Sequence[str], batch_size: int = 256
) -> Tensor:
    """(N images, N captions) cosine similarities."""
    model.eval()
    img = torch.cat(
        [model.embed_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    return img @ model.embed_captions(list(captions)).T


def chance_top_k(captions: Sequence[str], k: int) -> float:
    """Expected top-k hit rate of a random ranking, where any caption equal to one's own hits."""
    n = len(captions)
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    total = 0.0
    for c in captions:
        m = counts[c]
        miss = 1.0
        for j in range(min(k, n)):  # all k draws avoid the m correct captions
            miss *= max(0.0, (n - m - j) / (n - j))
        total += 1.0 - miss
    return total / n


def alignment_scores(sim: Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict:
    """Scores of images against their own captions (row i's own caption is column i).

    ``clip_score``: 100 x mean max(cos, 0), torchmetrics' CLIPScore formula; ``auc``: the mean
    over images of the share of other captions scored below the image's own (chance .5);
    ``top<k>``: the own caption (or an identical one) among the k best (chance beside it).
    Captions identical to the own one are never counted as mismatches.
    """
    n = sim.shape[0]
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = cid[:, None] == cid[None, :]  # (N, N)
    own = sim.diagonal()[:, None]
    other = ~same
    below = ((sim < own) & other).sum(1).float() + 0.5 * ((sim == own) & other).sum(1).float()
    auc = (below / other.sum(1).clamp(min=1)).mean()
    out: dict[str, float] = {
        "clip_score": float(100 * sim.diagonal().clamp(min=0).mean()),
        "auc": float(auc),
    }
    order = sim.argsort(dim=1, descending=True)
    for k in ks:
        if k >= n:
            continue
        hit = same.gather(1, order[:, :k]).any(1).float().mean()
        out[f"top{k}"] = float(hit)
        out[f"top{k}_chance"] = round(chance_top_k(captions, k), 4)
    return out


def pair_quality(model: DualEncoder, images: Tensor, captions: Sequence[str]) -> dict[str, Any]:
    """The evaluator's own quality on held-out real pairs: AUC and retrieval, chance beside."""
    scores = alignment_scores(similarities(model, images, captions), captions)
    return {"pairs": len(captions), **scores, "auc_chance": 0.5}


# --------------------------------------------------------------------------------------------
# saving and loading (weights only: a state dict and the config, never a pickled object)
# --------------------------------------------------------------------------------------------
def save_dual(model: DualEncoder, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    blob = {"format": FORMAT, "config": asdict(model.cfg), "state_dict": model.state_dict()}
    torch.save({**blob, "extra": extra or {}}, tmp)
    tmp.replace(path)
    return path


def load_dual(path: str | Path) -> DualEncoder:
    """A saved evaluator (``torch.load(weights_only=True)``: nothing in the file is executed)."""
    from imagen.config import ConfigError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no trained evaluator; run `imagen evaluator` (the DVC stage `evaluator`)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != FORMAT:
            raise ValueError(f"format {blob.get('format')!r}, expected {FORMAT!r}")
        model = DualEncoder(DualConfig(**blob["config"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise ConfigError(f"{path}: not a readable evaluator ({type(e).__name__}: {e})") from e
    return model.eval().requires_grad_(False)
