"""``imagen evaluate``: the FID-CLIP sweep over guidance scales, reports, model registration.

For every classifier-free guidance scale in ``evaluate.guidance_scales`` (NeMo's 1, 1.5, 2, 3,
4, 5, 6, 7 by default) the cascade generates ``evaluate.num_images`` images, up to
``evaluate.depth`` (base64 by default), from held-out captions, and two numbers are measured:

- fidelity, a Frechet distance between generated and held-out real images (lower is better):
  ``fid`` -- torchmetrics' FrechetInceptionDistance with Inception-v3 weights from
  ``evaluate.inception_path`` (needs torch-fidelity) -- or, with no Inception weights,
  ``fd_embedded`` -- the same torchmetrics Frechet distance over the embedded evaluator's
  features (:class:`imagen.embedded.evaluator.EmbeddedEvaluator`). The latter is NOT FID and is
  labelled ``FD-embedded-evaluator`` everywhere.
- alignment of image and caption (higher is better): ``clip_score`` -- torchmetrics' CLIPScore
  with the CLIP model in the local folder ``evaluate.clip_path`` -- or, with no CLIP weights,
  ``caption_agreement_embedded`` -- the embedded evaluator's share of caption attributes
  (shape, color, size, position, background) read back correctly from the image. When captions
  come from the embedded grammar the per-attribute agreements are reported in both cases.

The swept scale is the base64 stage's guidance (Imagen's FID-CLIP curves sweep the base model);
SR stages, when ``depth`` includes them, keep their configured guidance. Every scale uses the
same seed, so the curves compare scales on the same initial noise.

Best trade-off point: the best-aligned scale among those whose fidelity distance is within
``evaluate.tradeoff_tolerance`` (default 25%) of the lowest distance, i.e.
``distance <= (1 + tol) * min``: the point a user picks, fidelity close to the best and as much
alignment as that allows. With tolerance 0 it is the lowest-distance scale. The rule is printed
on fid_clip.png and stored in metrics.json.

Outputs (``evaluate.reports_dir``, default reports/): ``metrics.json`` (every scale, the best
point, the metric names), ``fid_clip.csv`` (columns ``guidance_scale,<fidelity>,<alignment>``
for ``dvc plots``), ``fid_clip.png`` (distance on y against alignment on x, each point labelled
with its scale), ``grids/scale_<w>.png`` (samples with their captions), ``cascade.png`` (a few
prompts through every trained stage, 64 -> 256 -> 1024 side by side). All of it is logged to
the evaluate stage's MLflow run; then the stage models and the ``imagen-cascade`` pyfunc model
are registered (:mod:`imagen.mlops.registry`).
"""

from imagen.data.holdout import HeldOut, load_holdout
from imagen.evaluate.metrics import (
    AGREEMENT,
    FD_EMBEDDED,
    FD_EMBEDDED_LABEL,
    Alignment,
    Fidelity,
    clip_model_loader,
)
from imagen.evaluate.report import plot_fid_clip, write_reports
from imagen.evaluate.stage import add_arguments, evaluate, main
from imagen.evaluate.sweep import SweepResult, best_tradeoff, sweep, untrained_reference

__all__ = [
    "AGREEMENT",
    "FD_EMBEDDED",
    "FD_EMBEDDED_LABEL",
    "Alignment",
    "Fidelity",
    "HeldOut",
    "SweepResult",
    "add_arguments",
    "best_tradeoff",
    "clip_model_loader",
    "evaluate",
    "load_holdout",
    "main",
    "plot_fid_clip",
    "sweep",
    "untrained_reference",
    "write_reports",
]
