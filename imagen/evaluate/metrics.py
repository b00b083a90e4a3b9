"""The two numbers of the FID-CLIP sweep: fidelity (a Frechet distance) and caption alignment.

- :class:`Fidelity`: torchmetrics' FrechetInceptionDistance with local Inception-v3 weights
  (``fid``), or the same Frechet distance over the embedded evaluator's features
  (``fd_embedded``, which is not FID and is labelled so everywhere).
- :class:`Alignment`: torchmetrics' CLIPScore with a local CLIP folder (``clip_score``), or
  the embedded evaluator's share of caption attributes read back from the image
  (``caption_agreement_embedded``).

For any other data set, the offline dual encoder trained on the training split
(:mod:`imagen.evaluate.dual`, the ``evaluator`` stage) gives both axes: ``fd_dual`` over its
image features and ``caption_auc_dual`` (with ``clip_score_dual`` and caption retrieval
``top1_dual`` / ``top5_dual`` beside). It is measured whenever it exists, on every data set.
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
FD_DUAL = "fd_dual"
FD_DUAL_LABEL = "FD-dual-encoder (Frechet distance of the trained evaluator's image features)"
AUC_DUAL = "caption_auc_dual"


class Fidelity:
    """A Frechet distance through torchmetrics: FID (Inception) or FD over evaluator features.

    The real images' statistics are computed once; :meth:`compute` takes one scale's images.
    """

    def __init__(
        self,
        inception_path: str | None = None,
        feature: nn.Module | None = None,
        *,
        name: str = FD_EMBEDDED,
        label: str = FD_EMBEDDED_LABEL,
    ):
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
            self.name, self.label = name, label
            self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)

    @classmethod
    def dual(cls, model: nn.Module) -> Fidelity:
        """The Frechet distance over the trained dual encoder's image features (``fd_dual``)."""
        from imagen.evaluate.dual import DualImageFeatures

        return cls(feature=DualImageFeatures(model), name=FD_DUAL, label=FD_DUAL_LABEL)

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
    """Caption-image alignment, every score that can be measured, one of them the sweep's axis.

    - ``clip_score``: torchmetrics' CLIPScore, when ``clip_path`` names a local CLIP folder;
    - ``caption_agreement_embedded`` (and one ``agreement_<attribute>`` each): the embedded
      evaluator's reading of the attributes the captions name, for the embedded data's captions
      (``embedded``: every caption names its attributes; a user's "red apple" is not read);
    - ``caption_auc_dual``, ``clip_score_dual``, ``top1_dual``, ``top5_dual``: the trained dual
      encoder (``dual``), whenever it is given.

    The axis (``name``) is the first available of CLIP score, the embedded agreement (when
    ``embedded``: every caption names its attributes) and the dual encoder's AUC.
    """

    def __init__(
        self,
        clip_path: str | None = None,
        *,
        dual: nn.Module | None = None,
        embedded: bool = True,
    ) -> None:
        from imagen.embedded.evaluator import EmbeddedEvaluator

        self.evaluator = EmbeddedEvaluator()
        self.clip = None
        self.dual = dual
        self.embedded = embedded
        if clip_path:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(model_name_or_path=clip_model_loader(clip_path))
            self.name, self.label = "clip_score", "CLIP score (torchmetrics, 100 x cosine)"
        elif embedded:
            self.name, self.label = AGREEMENT, "caption agreement (embedded evaluator, 0..1)"
        elif dual is not None:
            self.name = AUC_DUAL
            self.label = (
                "caption AUC (trained dual encoder; own caption above others, 0.5 = chance)"
            )
        else:
            raise ConfigError(
                "evaluate: the held-out captions do not all name embedded attributes and there is "
                "no trained evaluator to measure alignment with; run `imagen evaluator` (the DVC "
                "stage `evaluator`) or set evaluate.clip_path to a local CLIP folder"
            )

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
        if self.embedded and any(attributes):
            scores = self.evaluator.score(images, list(attributes))
            out[AGREEMENT] = float(scores.pop("agreement").nanmean())
            for name, values in scores.items():
                if not torch.isnan(values).all():
                    out[f"agreement_{name}"] = float(values.nanmean())
        if self.dual is not None:
            from imagen.evaluate.dual import alignment_scores, similarities

            scores = alignment_scores(similarities(self.dual, images, captions), captions)
            out[AUC_DUAL] = scores.pop("auc")
            out.update({f"{k}_dual": v for k, v in scores.items() if not k.endswith("chance")})
        return out

    def chance(self, captions: Sequence[str]) -> dict[str, float]:
        """Chance levels of the dual encoder's scores for these captions."""
        if self.dual is None:
            return {}
        from imagen.evaluate.dual import chance_top_k

        out = {AUC_DUAL: 0.5}
        for k in (1, 5):
            if k < len(captions):
                out[f"top{k}_dual"] = round(chance_top_k(captions, k), 4)
        return out


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def mean_abs_laplacian(images: Tensor) -> float:
    """Mean |Laplacian| of (N, 3, H, W) images (any range): high-frequency energy per pixel.

    Against real images of the same size it says whether samples are clean (about 1x), blurred
    (below) or carry residual sampling noise (well above).
    """
    x = images.float().mean(1, keepdim=True)  # (N, 1, H, W) grey
    return torch.nn.functional.conv2d(x, _LAPLACIAN.view(1, 1, 3, 3)).abs().mean().item()
