"""Fine-tuning: ``trainer.init_from`` starts a new run from existing weights.

The source is a stage training checkpoint (``.ckpt``: weights and EMA weights), a stage model
file (``model.pt`` or a folder holding one: EMA weights), a registered model
(``models:/imagen-base64@champion``, or the cascade ``models:/imagen-cascade@champion`` whose
artifacts hold every stage), or a NeMo ``.nemo`` / MegatronImagen ``.ckpt`` (through
:mod:`imagen.nemo`). Only weights are taken: the optimiser, the learning-rate schedule and the
step counter start fresh. A source whose UNet does not fit ``stages.<stage>.model`` is refused
naming the first tensor that does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagen.checkpoint import MODEL_FILE, read_stage
from imagen.config import ConfigError, StageConfig
from imagen.train.module import ImagenStage

_NET, _EMA = "denoiser.net.", "ema.module."
INIT_DIR = Path("data/init")  # a dependency of every train stage in dvc.yaml


def resolve_source(spec: str, stage_name: str, tracking_uri: str | None = None) -> Path:
    """The local file behind ``trainer.init_from`` (a registry URI is downloaded first)."""
    if spec.startswith(("models:/", "runs:/")):
        return _download(spec, stage_name, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"trainer.init_from={spec}: no such file")
    if not path.resolve().is_relative_to(INIT_DIR.resolve()):
        print(
            f"imagen train: trainer.init_from={spec} is outside {INIT_DIR}/, which dvc.yaml's "
            f"train stages depend on: DVC will not retrain when it changes (copy it there)",
            flush=True,
        )
    return path


def _download(uri: str, stage_name: str, tracking_uri: str | None) -> Path:
    from mlflow.exceptions import MlflowException

    from imagen.mlops.client import download

    try:  # from the configured server; no process-wide MLflow setting changes
        local = Path(download(uri, tracking_uri))
    except (MlflowException, OSError) as e:
        raise ConfigError(f"trainer.init_from={uri}: cannot be downloaded ({e})") from e
    # a stage model (model.pt at the top) or the cascade pyfunc (artifacts/<stage>/model.pt)
    for candidate in (local / MODEL_FILE, local / "artifacts" / stage_name / MODEL_FILE, local):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"trainer.init_from={uri}: holds no {stage_name} {MODEL_FILE}")


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict | None, int | None]:
    """A Lightning state dict of this project -> (UNet weights, EMA weights, EMA count)."""
    net = {k[len(_NET) :]: v for k, v in state.items() if k.startswith(_NET)}
    ema = {k[len(_EMA) :]: v for k, v in state.items() if k.startswith(_EMA)}
    count = state.get("ema.n_averaged")
    return net, ema or None, int(count) if count is not None else None


def _load_nemo(module: ImagenStage, path: Path, spec: str) -> dict[str, Any]:
    """Weights of a NeMo ``.nemo`` (or a MegatronImagen ``.ckpt`` with a model_config.yaml
    beside it; its ``-EMA.ckpt`` sibling when present) through :mod:`imagen.nemo`."""
    try:
        from imagen.nemo.load import NemoLoadError, read_nemo_checkpoint
    except ImportError as e:
        raise ConfigError(
            f"trainer.init_from={spec}: a NeMo checkpoint needs imagen.nemo (the NeMo "
            f"checkpoint loader), which this installation lacks ({e})"
        ) from e
    config = path.with_name("model_config.yaml")
    config_arg = config if path.suffix != ".nemo" and config.is_file() else None
    try:
        _, net, used_ema = read_nemo_checkpoint(path, config=config_arg, ema=True)
    except NemoLoadError as e:
        raise ConfigError(f"trainer.init_from={spec}: {e}") from e
    state = net.state_dict()
    _load(module.net, state, "UNet", spec, module.stage)
    _load(module.ema.module, state, "EMA UNet", spec, module.stage)
    took = "its EMA weights" if used_ema else "its weights"
    return {"kind": "nemo", "step": None, "took": f"{took} (as weights and EMA)"}


def _read_weights(path: Path) -> tuple[dict, dict | None, int | None, dict[str, Any]] | None:
    """(UNet, EMA, EMA count, info) from a project file; None for a foreign (NeMo) file."""
    if path.suffix == ".pt":
        _, state, meta = read_stage(path)
        return state, None, None, {"kind": "model", "step": meta["step"]}
    if path.suffix == ".nemo":
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "imagen" not in ckpt:
        return None
    net, ema, count = _split(ckpt["state_dict"])
    info = {"kind": "checkpoint", "step": int(ckpt.get("global_step", 0))}
    return net, ema, count, info


def _load(target: torch.nn.Module, state: dict, what: str, spec: str, stage: StageConfig) -> None:
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shape:
        first = (missing or extra or shape)[0]
        raise ConfigError(
            f"trainer.init_from={spec}: its {what} does not fit stages.{stage.name}.model "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(shape)} of another shape; "
            f"first {first!r})"
        )
    target.load_state_dict(state)


def init_weights(module: ImagenStage, spec: str, tracking_uri: str | None = None) -> dict:
    """Load ``spec``'s weights (and EMA weights) into ``module``; returns what was loaded."""
    stage = module.stage
    path = resolve_source(spec, stage.name, tracking_uri)
    read = _read_weights(path)
    if read is None:
        info = _load_nemo(module, path, spec)
    else:
        net, ema, count, info = read
        info["took"] = (
            "its weights and EMA weights" if ema else "its EMA weights (as weights and EMA)"
        )
        _load(module.net, net, "UNet", spec, stage)
        _load(module.ema.module, ema or net, "EMA UNet", spec, stage)
        # a count > 0 keeps AveragedModel from overwriting the loaded EMA at the first update
        module.ema.n_averaged.fill_(max(1, count or 1))
    return {"source": spec, "file": str(path), **info}
