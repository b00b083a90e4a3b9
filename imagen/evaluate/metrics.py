"""The two numbers of the FID-CLIP sweep: fidelity (a Frechet distance) and caption alignment.

- :class:`Fidelity`: torchmetrics' FrechetInceptionDistance with local Inception-v3 weights
  (``fid``), or the same Frechet distance over the embedded evaluator's features
  (``fd_embedded``, which is not FID and is labelled so everywhere).
- :class:`Alignment`: torchmetrics' CLIPScore with a local CLIP folder (``clip_score``), or
  the embedded evaluator's share of caption attributes read back from the image
  (``caption_agreement_embedded``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.config import ConfigError

FD_EMBEDDED = "fd_embedded"
FD_EMBEDDED_LABEL = (
    "FD-embedded-evaluator (Frechet distance of embedded-evaluator features; not FID)"
)
AGREEMENT = "caption_agreement_embedded"


class Fidelity:
    """A Frechet distance through torchmetrics: FID (Inception) or FD over evaluator features.

    The real images' statistics are computed once; :meth:`compute` takes one scale's images.
    """

    def __init__(self, inception_path: str | None = None, feature: nn.Module | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if inception_path:
            path = Path(inception_path)
            if not path.exists():
                raise ConfigError(f"evaluate.inception_path: {path} does not exist")
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

            if not _TORCH_FIDELITY_AVAILABLE:
                raise ConfigError(
                    "evaluate.inception_path is set, but FID with Inception needs torch-fidelity "
                    "(and torchvision): install the optional extra with "
                    "`pip install 'imagen-cascade[inception]'` (or `pip install torch-fidelity`), "
                    "or set evaluate.inception_path: null to use the embedded evaluator's "
                    "Frechet distance (fd_embedded)"
                )
            self.name, self.label = "fid", "FID (Inception-v3, torchmetrics)"
            self.metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(path),
                reset_real_features=False,
            )
        else:
            if feature is None:
                from imagen.embedded.evaluator import EmbeddedEvaluator

                feature = EmbeddedEvaluator()
            self.name, self.label = FD_EMBEDDED, FD_EMBEDDED_LABEL
            self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)

    def set_real(self, images: Tensor, batch_size: int = 64) -> None:
        """Real images, uint8 (N, 3, H, W)."""
        for i in range(0, len(images), batch_size):
            self.metric.update(images[i : i + batch_size], real=True)

    def compute(self, fake: Tensor, batch_size: int = 64) -> float:
        """Distance of generated uint8 images (N, 3, H, W) to the real ones."""
        self.metric.reset()  # keeps the real statistics (reset_real_features=False)
        for i in range(0, len(fake), batch_size):
            self.metric.update(fake[i : i + batch_size], real=False)
        return float(self.metric.compute())


class _TensorFeatures(nn.Module):
    """A transformers CLIPModel whose ``get_*_features`` return tensors.

    transformers 5 returns output objects (the projected embedding in ``pooler_output``) where
    torchmetrics' CLIPScore expects tensors; this adapter keeps the real model underneath.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )


def clip_model_loader(path: str | Path) -> Callable[[], tuple[nn.Module, Any]]:
    """A loader for torchmetrics' CLIPScore(model_name_or_path=...) from a local CLIP folder
    (``save_pretrained`` of a CLIPModel and its CLIPProcessor)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"evaluate.clip_path: {path} is not a CLIP model folder (no config.json); save one "
            "with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained (e.g. "
            "openai/clip-vit-large-patch14 downloaded elsewhere), or set clip_path: null"
        )

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CLIPModel.from_pretrained(str(path)).eval()
            processor = CLIPProcessor.from_pretrained(str(path))
        return _TensorFeatures(model), processor

    return load


class Alignment:
    """Caption-image alignment: CLIP score (torchmetrics) or the embedded caption agreement.

    The embedded evaluator's per-attribute agreements are added whenever the captions name
    embedded attributes.
    """

    def __init__(self, clip_path: str | None = None) -> None:
        from imagen.embedded.evaluator import EmbeddedEvaluator

        self.evaluator = EmbeddedEvaluator()
        self.clip = None
        if clip_path:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(model_name_or_path=clip_model_loader(clip_path))
            self.name, self.label = "clip_score", "CLIP score (torchmetrics, 100 x cosine)"
        else:
            self.name, self.label = AGREEMENT, "caption agreement (embedded evaluator, 0..1)"

    def compute(
        self,
        images: Tensor,
        captions: Sequence[str],
        attributes: Sequence[dict[str, str]],
        batch_size: int = 64,
    ) -> dict[str, float]:
        """Metrics for uint8 images (N, 3, H, W) against their captions."""
        out: dict[str, float] = {}
        if self.clip is not None:
            self.clip.reset()
            for i in range(0, len(images), batch_size):
                self.clip.update(images[i : i + batch_size], list(captions[i : i + batch_size]))
            out["clip_score"] = float(self.clip.compute())
        if any(attributes):
            scores = self.evaluator.score(images, list(attributes))
            agreement = float(scores.pop("agreement").nanmean())
            out[AGREEMENT] = agreement
            for name, values in scores.items():
                if not torch.isnan(values).all():
                    out[f"agreement_{name}"] = float(values.nanmean())
        elif self.clip is None:
            raise ConfigError(
                "evaluate: the held-out captions name no embedded attributes, so caption "
                "agreement cannot be measured; set evaluate.clip_path to a local CLIP folder"
            )
        return out


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def mean_abs_laplacian(images: Tensor) -> float:
    """Mean |Laplacian| of (N, 3, H, W) images (any range): high-frequency energy per pixel.

    Against real images of the same size it says whether samples are clean (about 1x), blurred
    (below) or carry residual sampling noise (well above).
    """
    x = images.float().mean(1, keepdim=True)  # (N, 1, H, W) grey
    return torch.nn.functional.conv2d(x, _LAPLACIAN.view(1, 1, 3, 3)).abs().mean().item()
