"""Guidance and x0 thresholding, applied to a denoiser at sampling time.

Training drops the text per sample (:func:`drop_mask` gives the net's ``drop_text``); sampling
runs the conditional and unconditional predictions in one batched forward and extrapolates
(Ho & Salimans 2022), then clips the guided x0 prediction (Saharia et al. 2022, Imagen). Two
named options change the branch it extrapolates away from: negative prompts (their encoding
instead of the null text) and autoguidance (a weaker guide model on the same text, Karras et
al. 2024).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from imagen.diffusion.denoiser import Denoiser, batch_sigma

Thresholding = Literal["dynamic", "static", "none"]


def drop_mask(
    batch_size: int,
    drop_rate: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B,) bool: True where the sample's text is replaced by the null conditioning."""
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=gen_device)
    return (u < drop_rate).to(device) if device is not None else u < drop_rate


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, quantile(|x0|, p)) per sample, clip(x0, ±s)/s."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic threshold percentile must be in (0, 1], got {percentile}")
    flat = x0.reshape(x0.shape[0], -1).abs()
    # Saharia et al. 2022, Sec. 2.3: s = max(1, p-th percentile of |x0|), per sample
    s = torch.quantile(flat.float(), percentile, dim=1).to(x0.dtype).clamp_min(1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Static clipping of x0 to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def apply_threshold(
    x0: torch.Tensor, thresholding: Thresholding = "none", percentile: float = 0.995
) -> torch.Tensor:
    """Dispatch on the configured thresholding ("dynamic", "static" or "none")."""
    if thresholding == "dynamic":
        return dynamic_threshold(x0, percentile)
    if thresholding == "static":
        return static_threshold(x0)
    if thresholding == "none":
        return x0
    raise ValueError(f"thresholding: got {thresholding!r}; allowed: 'dynamic', 'static', 'none'")


def _doubled(cond: Mapping[str, Any]) -> dict[str, Any]:
    """Every tensor in ``cond`` repeated along the batch: [c; c]."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}


def _padded(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, ...) -> (B, length, ...) with zeros after the L tokens (a mask pads False)."""
    if t.shape[1] == length:
        return t
    pad = torch.zeros((t.shape[0], length - t.shape[1], *t.shape[2:]), dtype=t.dtype)
    return torch.cat([t, pad.to(t.device)], dim=1)


def _stacked(cond: Mapping[str, Any], negative: Mapping[str, Any]) -> dict[str, Any]:
    """[cond; cond with the negative prompts' text]: the text tensors padded to one length."""
    out = _doubled(cond)
    pos_e, neg_e = cond["text_embed"], negative["text_embed"]
    pos_m, neg_m = cond.get("text_mask"), negative.get("text_mask")
    if pos_m is None:
        pos_m = torch.ones(pos_e.shape[:2], dtype=torch.bool, device=pos_e.device)
    if neg_m is None:
        neg_m = torch.ones(neg_e.shape[:2], dtype=torch.bool, device=neg_e.device)
    n = max(pos_e.shape[1], neg_e.shape[1])
    pos_e, neg_e = _padded(pos_e, n), _padded(neg_e.to(pos_e.dtype), n)
    pos_m, neg_m = _padded(pos_m.bool(), n), _padded(neg_m.bool(), n)
    null = negative.get("null")
    if null is not None:  # no negative prompt: the null text exactly as plain CFG builds it
        null = null.to(device=pos_e.device, dtype=torch.bool)
        neg_e = torch.where(null[:, None, None], pos_e, neg_e)
        neg_m = torch.where(null[:, None], pos_m, neg_m)
    out["text_embed"] = torch.cat([pos_e, neg_e])
    out["text_mask"] = torch.cat([pos_m, neg_m])
    return out


class GuidedDenoiser:
    """``denoise_fn(x, sigma) -> x0_hat`` with guidance and thresholding.

    Classifier-free guidance (the default, NeMo's): ``out = uncond + w (cond - uncond)`` where
    the conditional half runs with ``drop_text=False`` and the unconditional half with
    ``drop_text=True`` in ONE forward of batch 2B. ``w == 1`` runs only the conditional half,
    ``w == 0`` only the unconditional. With ``negative`` (``text_embed`` (B, L', D),
    ``text_mask`` (B, L') and ``null`` (B,) bool) the unconditional half is conditioned on the
    negative prompts' encoding instead of the null text; a sample whose ``null`` is True keeps
    the null text.

    Autoguidance (``guide``, Karras et al. 2024): ``out = guide + w (cond - guide)``, the guide
    denoiser (a weaker version of the same model) conditioned on the SAME text: two forwards of
    batch B (main and guide) per evaluation, the same count as CFG's one forward of 2B.

    With ``interval = (lo, hi)`` the guidance applies only at noise levels lo < sigma <= hi and
    the other levels take the conditional prediction alone (one forward of batch B).
    ``cond`` holds the net's keyword tensors (text_embed, text_mask, lowres, aug_level) with
    batch size B matching ``x``.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        thresholding: Thresholding = "none",
        percentile: float = 0.995,
        interval: tuple[float, float] | None = None,
        *,
        guide: Denoiser | None = None,
        negative: Mapping[str, Any] | None = None,
    ) -> None:
        if guide is not None and negative is not None:
            raise ValueError(
                "negative prompts replace classifier-free guidance's unconditional branch; "
                "autoguidance (a guide model) has none: use one or the other"
            )
        self.denoiser = denoiser
        self.guide = guide
        self.cond = {k: v for k, v in dict(cond or {}).items() if k != "drop_text"}
        self.negative = dict(negative) if negative is not None else None
        if self.negative is not None and "text_embed" not in self.cond:
            raise ValueError("negative prompts need the conditional text (cond['text_embed'])")
        self.guidance_scale = float(guidance_scale)
        self.interval = interval
        self.thresholding = thresholding
        self.percentile = percentile
        self.nfe = 0  # network evaluations so far (a guided step counts once)

    def _single(self, x: torch.Tensor, sigma: torch.Tensor, drop: bool) -> torch.Tensor:
        drop_text = torch.full((x.shape[0],), drop, dtype=torch.bool, device=x.device)
        return self.denoiser(x, sigma, **self.cond, drop_text=drop_text)

    def _unconditional(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The branch guidance extrapolates away from: the guide, the negative or null text."""
        keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.guide is not None:
            return self.guide(x, sigma, **self.cond, drop_text=keep)
        if self.negative is not None:
            cond = _stacked(self.cond, self.negative)
            cond = {k: v[x.shape[0] :] if torch.is_tensor(v) else v for k, v in cond.items()}
            return self.denoiser(x, sigma, **cond, drop_text=self._null(x))
        return self._single(x, sigma, drop=True)

    def _null(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples whose unconditional branch keeps the null text."""
        null = (self.negative or {}).get("null")
        if null is None:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return null.to(device=x.device, dtype=torch.bool)

    def _both(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) predictions: one forward of 2B for CFG, or the main
        model and the guide, B each, for autoguidance."""
        if self.guide is not None:
            keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            cond = self.denoiser(x, sigma, **self.cond, drop_text=keep)
            return cond, self.guide(x, sigma, **self.cond, drop_text=keep)
        b = x.shape[0]
        if self.negative is not None:
            stacked = _stacked(self.cond, self.negative)
            keep = torch.zeros(b, dtype=torch.bool, device=x.device)
            drop_text = torch.cat([keep, self._null(x)])  # (2B,): False | the null ones
        else:
            stacked = _doubled(self.cond)
            drop_text = torch.arange(2 * b, device=x.device) >= b  # (2B,): False | True
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), **stacked, drop_text=drop_text
        )
        return both[:b], both[b:]

    def guided(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The guided x0 prediction before thresholding."""
        sigma = batch_sigma(sigma, x)
        w: float | torch.Tensor = self.guidance_scale
        if self.interval is not None:  # guide only on lo < sigma <= hi (Kynkaanniemi et al. 2024)
            inside = (sigma > self.interval[0]) & (sigma <= self.interval[1])  # (B,)
            if not bool(inside.any()):
                w = 1.0
            elif not bool(inside.all()):
                w = torch.where(inside, self.guidance_scale, 1.0).to(x.dtype)
                w = w.reshape(-1, *([1] * (x.ndim - 1)))
        self.nfe += 1
        if isinstance(w, float) and w == 1.0:
            return self._single(x, sigma, drop=False)
        if isinstance(w, float) and w == 0.0:
            return self._unconditional(x, sigma)
        cond, uncond = self._both(x, sigma)
        # Ho & Salimans 2022, eq. 6 (in x0 form): D = D_uncond + w (D_cond - D_uncond);
        # autoguidance (Karras et al. 2024, eq. 2) is the same line with D_guide as D_uncond
        return uncond + w * (cond - uncond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return apply_threshold(self.guided(x, sigma), self.thresholding, self.percentile)
