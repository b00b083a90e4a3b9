"""The MLflow model registry: the three stage models and the ``imagen-cascade`` pyfunc model.

After evaluation the cascade is published in two forms, both in the tracking server's model
registry (the SQLite backend by default):

- ``imagen-base64``, ``imagen-sr256``, ``imagen-sr1024``: each stage model file
  (``models/<stage>/model.pt``: EMA weights + resolved stage config, loaded with
  ``weights_only=True``) as an MLflow ``pyfunc`` model with a signature (the stage and the text
  encoder; an SR stage takes a ``lowres`` column of base64 PNGs beside the prompts), at the
  evaluate run's artifacts ``stages/<stage>``.
- ``imagen-cascade``: the same :class:`CascadePyfunc` over all stages plus the T5 text encoder
  folder. No torch module is pickled: the python model object holds no weights, and
  :meth:`CascadePyfunc.load_context` rebuilds the networks from the state dicts. The model
  carries the ``imagen`` package in its ``code_paths`` (``code/imagen``), so it loads wherever
  its pip requirements are installed, with or without this repository; when the package is
  also installed, MLflow puts the bundled copy first on ``sys.path``.

Which version is ``champion`` is :mod:`imagen.mlops.promote`'s business (new versions are
``challenger``; the champion moves on evidence). Then::

    model = mlflow.pyfunc.load_model("models:/imagen-cascade@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle on the left"]}),
                        params={"depth": "sr256", "seed": 0})
    # out: DataFrame[prompt, stage, width, height, image]; image = base64-encoded PNG

and ``mlflow models serve -m models:/imagen-cascade@champion --env-manager local`` answers
``POST /invocations`` with ``{"dataframe_records": [{"prompt": "..."}], "params": {...}}``
(or ``{"inputs": ["...", "..."]}``) with ``{"predictions": [{"prompt", "stage", "width",
"height", "image"}, ...]}``.

Predict params (all optional): ``depth`` (base64 | sr256 | sr1024; default: every stage
logged), ``seed`` (0), ``steps`` (0 = each stage's own), ``guidance_scale`` (< 0 = each
stage's own), ``batch_size`` (4), ``all_stages`` (false: only the last stage's image per
prompt; true: one row per prompt and stage), ``negative_prompt`` ("": none; else the negative
prompt of every prompt: classifier-free guidance's unconditional branch is conditioned on it).
A DataFrame input may also carry a ``negative`` column, one negative prompt per row.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch

from imagen.checkpoint import MODEL_FILE
from imagen.config import STAGES
from imagen.mlops.pyfunc_io import negatives_of, prompts_of

__all__ = [
    "CASCADE_MODEL",
    "CascadePyfunc",
    "STAGE_MODELS",
    "decode_png",
    "load_registered_cascade",
    "log_cascade_model",
    "pyfunc_signature",
    "register_models",
    "register_stage_models",
]

STAGE_MODELS: dict[str, str] = {s: f"imagen-{s}" for s in STAGES}
CASCADE_MODEL = "imagen-cascade"
ENCODER_ARTIFACT = "encoder"
PYFUNC_ARTIFACT = "imagen-cascade"
MODEL_SCRIPT = '''"""The imagen-cascade pyfunc model (MLflow models-from-code: nothing pickled)."""

import mlflow

from imagen.mlops.registry import CascadePyfunc

mlflow.models.set_model(CascadePyfunc())
'''


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------
def encode_png(image: Any) -> str:
    """A PIL image -> base64 PNG text."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> Any:
    """Base64 PNG text (a prediction's ``image``) -> an RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def _lowres(model_input: Any) -> torch.Tensor | None:
    """The ``lowres`` column (base64 PNGs) of an input DataFrame -> (N, 3, h, w) in [-1, 1],
    every image at the first one's size; None without such a column."""
    import numpy as np
    import pandas as pd

    if not isinstance(model_input, pd.DataFrame) or "lowres" not in model_input.columns:
        return None
    cells = [c for c in model_input["lowres"] if isinstance(c, str) and c]
    if not cells:
        return None
    try:
        images = [decode_png(c) for c in cells]
    except Exception as e:
        raise ValueError(f"input column 'lowres': not base64-encoded images ({e})") from e
    size = images[0].size
    arrays = [np.asarray(im.resize(size) if im.size != size else im) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class CascadePyfunc(mlflow.pyfunc.PythonModel):
    """``imagen-cascade`` and the stage models: prompts -> base64 PNG images.

    The artifacts (stage folders ``base64``, ``sr256``, ``sr1024`` with a model.pt, and
    ``encoder``) are loaded in :meth:`load_context`; the object itself holds no weights. A
    model holding only super-resolution stages (``imagen-sr256``, ``imagen-sr1024``) takes a
    ``lowres`` column of base64 PNGs beside the prompts and super-resolves them.
    """

    # MLflow inspects predict's type hints when a subclass is created and, finding none, warns
    # under its own "once" filter (which a filter of ours cannot override). predict has none on
    # purpose: the explicit signature (pyfunc_signature) validates inputs instead.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from imagen.sample.cascade import Cascade

        files = {s: context.artifacts[s] for s in STAGES if s in context.artifacts}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cascade = Cascade.from_files(
            files, encoder_path=context.artifacts.get(ENCODER_ARTIFACT), device=device
        )

    # No type hints on predict: MLflow would read them as an input schema of their own.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd

        from imagen.images import to_pil

        p = dict(params or {})
        prompts = prompts_of(model_input)
        steps = int(p.get("steps") or 0) or None
        guidance = p.get("guidance_scale")
        guidance = None if guidance is None or float(guidance) < 0 else float(guidance)
        lowres = _lowres(model_input)
        negative = negatives_of(model_input) or (p.get("negative_prompt") or None)
        if lowres is None and "base64" not in self.cascade.stages:
            raise ValueError(
                "this model starts at a super-resolution stage: give a 'lowres' column of "
                "base64 PNG images beside 'prompt'"
            )
        images = self.cascade.generate(
            prompts,
            depth=p.get("depth") or self.cascade.depth,
            steps=steps,
            guidance=guidance,
            seed=int(p.get("seed") or 0),
            batch_size=int(p.get("batch_size") or 4),
            lowres=lowres,
            negative=negative,
        )
        stages = list(images) if p.get("all_stages") else [list(images)[-1]]
        rows = []
        for i, prompt in enumerate(prompts):
            for stage in stages:
                img = to_pil(images[stage][i])
                rows.append(
                    {
                        "prompt": prompt,
                        "stage": stage,
                        "width": img.width,
                        "height": img.height,
                        "image": encode_png(img),
                    }
                )
        return pd.DataFrame(rows, columns=["prompt", "stage", "width", "height", "image"])


def pyfunc_signature(depth: str, lowres: bool = False) -> Any:
    """The pyfunc's signature.

    Input: one string column (a DataFrame "prompt" column or a list of strings); with
    ``lowres`` (a model of SR stages only) the columns "prompt" and "lowres" (base64 PNG).
    Output: prompt, stage, width, height, image (base64 PNG). Params: depth, seed, steps,
    guidance_scale, batch_size, all_stages, negative_prompt.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = (
        Schema([ColSpec("string", "prompt"), ColSpec("string", "lowres")])
        if lowres
        else Schema([ColSpec("string")])
    )
    return ModelSignature(
        inputs=inputs,
        outputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("string", "stage"),
                ColSpec("long", "width"),
                ColSpec("long", "height"),
                ColSpec("string", "image"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("depth", "string", depth),
                ParamSpec("seed", "long", 0),
                ParamSpec("steps", "long", 0),
                ParamSpec("guidance_scale", "double", -1.0),
                ParamSpec("batch_size", "long", 4),
                ParamSpec("all_stages", "boolean", False),
                ParamSpec("negative_prompt", "string", ""),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """What the pyfunc needs at load time (pinned to the versions that logged it)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in (
        "torch",
        "transformers",
        "pydantic",
        "pillow",
        "numpy",
        "pandas",
        "pyyaml",
        "sentencepiece",
        "mlflow",
    ):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# --------------------------------------------------------------------------------------------
# Logging and registering
# --------------------------------------------------------------------------------------------
def _stage_file(path: str | Path) -> Path:
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    # the registry of the same server, whatever the process-wide registry URI says
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _new_version(
    client: Any,
    name: str,
    source: str,
    run_id: str,
    alias: str | None,
    tags: Mapping[str, Any] | None,
    description: str,
) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def register_stage_models(
    run_id: str,
    files: Mapping[str, str | Path],
    encoder_path: str | Path,
    *,
    tracking_uri: str | None = None,
    alias: str | None = "champion",
    tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Log each stage model file as an MLflow pyfunc model (the stage and the text encoder,
    with a signature) at ``run_id``'s artifacts ``stages/<stage>`` and register it as
    ``imagen-<stage>``; returns stage -> version. ``mlflow.pyfunc.load_model`` opens it:
    base64 takes prompts, an SR stage prompts and a ``lowres`` column of base64 PNGs."""
    client = _client(tracking_uri)
    versions: dict[str, str] = {}
    for stage, path in files.items():
        file = _stage_file(path)
        if not file.exists():
            raise FileNotFoundError(f"{file}: stage model to register not found")
        artifact = f"stages/{stage}"
        _log_pyfunc(client, run_id, {stage: file}, encoder_path, artifact)
        source = f"{client.get_run(run_id).info.artifact_uri}/{artifact}"
        versions[stage] = _new_version(
            client,
            STAGE_MODELS[stage],
            source,
            run_id,
            alias,
            {"imagen.stage": stage, **dict(tags or {})},
            f"Imagen {stage} stage model (pyfunc; artifacts/{stage}/model.pt: EMA weights + "
            "stage config)",
        )
    return versions


def _log_pyfunc(
    client: Any,
    run_id: str,
    files: Mapping[str, Path],
    encoder_path: str | Path,
    artifact_path: str,
) -> None:
    """Save a :class:`CascadePyfunc` of ``files`` (stage -> model.pt) and the encoder, and
    upload it to ``run_id``'s artifacts ``artifact_path``."""
    import imagen

    stages = [s for s in STAGES if s in files]
    with tempfile.TemporaryDirectory(prefix="imagen-pyfunc-") as tmp:
        staged = Path(tmp) / "inputs"
        artifacts: dict[str, str] = {}
        for stage in stages:  # one folder per stage so the three model.pt files do not clash
            (staged / stage).mkdir(parents=True)
            shutil.copy2(_stage_file(files[stage]), staged / stage / MODEL_FILE)
            artifacts[stage] = str(staged / stage)
        encoder = Path(encoder_path)
        if not (encoder / "config.json").exists():
            raise FileNotFoundError(f"{encoder}: not a text encoder folder (no config.json)")
        artifacts[ENCODER_ARTIFACT] = str(encoder)
        code = Path(tmp) / "code" / "imagen"
        shutil.copytree(
            Path(imagen.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__")
        )
        script = Path(tmp) / "imagen_cascade_model.py"
        script.write_text(MODEL_SCRIPT)
        model_dir = Path(tmp) / "model"
        with warnings.catch_warnings():
            # MLflow suggests type hints and an input example; the explicit signature serves
            # instead (an input example would run the whole cascade at logging time).
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                python_model=str(script),
                artifacts=artifacts,
                code_paths=[str(code)],
                signature=pyfunc_signature(stages[-1], lowres="base64" not in stages),
                pip_requirements=pip_requirements(),
                metadata={"stages": stages, "output": "base64 PNG per prompt (column image)"},
            )
        client.log_artifacts(run_id, str(model_dir), artifact_path)


def log_cascade_model(
    run_id: str,
    files: Mapping[str, str | Path],
    encoder_path: str | Path,
    *,
    tracking_uri: str | None = None,
    alias: str | None = "champion",
    tags: Mapping[str, Any] | None = None,
    register: bool = True,
) -> str | None:
    """Save the ``imagen-cascade`` pyfunc model, upload it to ``run_id``'s artifacts
    (``imagen-cascade/``) and register it; returns the version (None when not registering)."""
    stages = [s for s in STAGES if s in files]
    client = _client(tracking_uri)
    _log_pyfunc(client, run_id, {s: _stage_file(files[s]) for s in stages}, encoder_path,
                PYFUNC_ARTIFACT)  # fmt: skip
    if not register:
        return None
    source = f"{client.get_run(run_id).info.artifact_uri}/{PYFUNC_ARTIFACT}"
    return _new_version(
        client,
        CASCADE_MODEL,
        source,
        run_id,
        alias,
        {"imagen.stages": ",".join(stages), **dict(tags or {})},
        "Imagen cascade (pyfunc): prompts -> base64 PNG images; see imagen.mlops.registry",
    )


def register_models(
    run_id: str,
    models_dir: str | Path,
    encoder_path: str | Path,
    *,
    tracking_uri: str | None = None,
    alias: str | None = "champion",
    tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Register every stage found in ``models_dir`` and the cascade pyfunc; name -> version."""
    files = {s: Path(models_dir) / s / MODEL_FILE for s in STAGES}
    files = {s: f for s, f in files.items() if f.exists()}
    if "base64" not in files:
        raise FileNotFoundError(f"{Path(models_dir) / 'base64' / MODEL_FILE}: nothing to register")
    stages = list(files)
    files = {s: files[s] for s in STAGES[: len(stages)] if s in files}  # a prefix only
    out = {
        STAGE_MODELS[s]: v
        for s, v in register_stage_models(
            run_id, files, encoder_path, tracking_uri=tracking_uri, alias=alias, tags=tags
        ).items()
    }
    out[CASCADE_MODEL] = log_cascade_model(
        run_id, files, encoder_path, tracking_uri=tracking_uri, alias=alias, tags=tags
    )
    return out


# --------------------------------------------------------------------------------------------
# Loading a registered cascade for `imagen sample --models models:/...`
# --------------------------------------------------------------------------------------------
def load_registered_cascade(
    uri: str,
    *,
    depth: str = "sr1024",
    tracking_uri: str | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """Download a registered ``imagen-cascade`` pyfunc model (``models:/name@alias`` or
    ``models:/name/version``) and build a :class:`~imagen.sample.Cascade` from its artifacts."""
    from mlflow.exceptions import MlflowException

    from imagen.mlops.client import download
    from imagen.sample.cascade import Cascade, stages_to

    try:
        local = Path(download(uri, tracking_uri))
    except MlflowException as e:
        raise FileNotFoundError(
            f"{uri}: cannot be downloaded from the MLflow registry at {tracking_uri} ({e}); "
            "run `imagen evaluate` to register the cascade"
        ) from e
    folder = local / "artifacts"
    if not folder.is_dir():
        raise FileNotFoundError(f"{uri}: not an imagen-cascade pyfunc model (no artifacts/)")
    files = {s: folder / s for s in stages_to(depth)}
    for stage, f in files.items():
        if not (f / MODEL_FILE).exists():
            raise FileNotFoundError(f"{uri}: holds no {stage} stage (depth {depth!r} needs it)")
    return Cascade.from_files(files, encoder_path=folder / ENCODER_ARTIFACT, device=device)


def load_cascade(
    source: str | Path,
    *,
    depth: str = "sr1024",
    tracking_uri: str | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """A models folder, or a registered model URI (``models:/imagen-cascade@champion``)."""
    from imagen.sample import Cascade

    if str(source).startswith(("models:/", "runs:/")):
        return load_registered_cascade(
            str(source), depth=depth, tracking_uri=tracking_uri, device=device
        )
    return Cascade.from_models_dir(source, depth=depth, device=device)
