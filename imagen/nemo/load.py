"""Load a NeMo Imagen checkpoint as this project's denoiser, and ``imagen import-nemo``.

Accepted files:

* a ``.nemo`` archive (a tar, optionally gzipped) holding ``model_config.yaml`` (NeMo's
  ``model:`` block) and ``model_weights.ckpt`` (a state dict, keys ``model.model.unet.*``);
* a MegatronImagen Lightning ``.ckpt`` (its ``state_dict``), with the model config given as
  ``config=`` (a model_config.yaml path or a mapping);
* NeMo's EMA weights: NeMo's checkpoint callback writes them, with the EMA callback on, as
  ``<name>-EMA.ckpt`` beside each ``<name>.ckpt`` (its ``state_dict`` holds the EMA weights);
  used when present and ``ema=True``. A ``.nemo`` holds the weights the model had when NeMo
  saved it (NeMo writes no EMA copy into it).

Every tensor file is read with ``torch.load(weights_only=True)``: nothing in a checkpoint is
executed. A file whose pickle needs other classes (NeMo's Lightning checkpoints pickle
OmegaConf configs) is refused with what to export instead.

``imagen import-nemo FILE --stage NAME --out DIR`` writes ``DIR/NAME/model.pt``, a stage model
that ``imagen sample --models DIR`` samples from.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from imagen.config import ModelConfig
from imagen.nemo.convert import NemoWeightsError, load_nemo_weights, model_config_from_nemo

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"

EXPORT_HINT = (
    "export the weights alone from NeMo: torch.save(torch.load(ckpt)['state_dict'], "
    "'weights.ckpt') (or the .nemo archive, whose model_weights.ckpt is a plain state dict), "
    "and pass the model config as config=model_config.yaml"
)


class NemoLoadError(ValueError):
    """A NeMo checkpoint that cannot be read; the message says why and what to do."""


class NemoDenoiser(nn.Module):
    """The project's denoiser around NeMo weights: ``den(x, sigma, text_embed=..., text_mask=...,
    lowres=None) -> D(x; sigma)``, in inference mode.

    x (B, C, H, W), sigma (B,) or a float, text_embed (B, L, D), text_mask (B, L) bool, lowres
    (B, C, h, w) at its own size (SR stages). With NeMo's noise_cond_aug the low-res image is
    noised at NeMo's inference level (sigma_aug 0.002) from ``generator``.
    """

    def __init__(self, denoiser: nn.Module, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        text_embed: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        lowres: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from imagen.diffusion import sr_condition

        cond: dict[str, Any] = {"text_embed": text_embed, "text_mask": text_mask}
        if self.config.is_sr:
            if lowres is None:
                raise ValueError("a super-resolution stage needs lowres (B, C, h, w)")
            lr = lowres.to(x.device)
            cond.update(sr_condition(lr, self.config, training=False, generator=self.generator))
        elif lowres is not None:
            raise ValueError("lowres was given to a base (text-to-64) stage")
        return self.denoiser(x, sigma, **cond)


def _torch_load(data: bytes | Path, what: str) -> Any:
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise NemoLoadError(
            f"{what}: its pickle needs classes beyond tensors and plain containers ({e}); "
            f"nothing from it was run. {EXPORT_HINT}"
        ) from None
    except (EOFError, RuntimeError) as e:
        raise NemoLoadError(f"{what}: truncated or not a torch file ({e})") from None


def _read_nemo(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config mapping, state dict) from a .nemo tar."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if CONFIG_MEMBER not in members or WEIGHTS_MEMBER not in members:
                raise NemoLoadError(
                    f"{path}: a .nemo archive holds {CONFIG_MEMBER} and {WEIGHTS_MEMBER}; "
                    f"found {sorted(members)}"
                )

            def read(name: str) -> bytes:
                f = tar.extractfile(members[name])
                assert f is not None
                return f.read()

            cfg = yaml.safe_load(read(CONFIG_MEMBER)) or {}
            state = _torch_load(read(WEIGHTS_MEMBER), f"{path}:{WEIGHTS_MEMBER}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise NemoLoadError(f"{path}: truncated or not a .nemo (tar) archive ({e})") from None
    if isinstance(cfg, Mapping) and "model" in cfg and "unet" not in cfg:
        cfg = cfg["model"]
    return dict(cfg), _state_dict(state, path)


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise NemoLoadError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def _config_mapping(config: str | Path | Mapping[str, Any] | None, path: Path) -> dict[str, Any]:
    if config is None:
        raise NemoLoadError(
            f"{path}: a Lightning .ckpt does not carry a readable model config; pass "
            "config=<model_config.yaml> (NeMo's `model:` block), or load the .nemo archive"
        )
    if not isinstance(config, Mapping):
        config = yaml.safe_load(Path(config).read_text()) or {}
    if "model" in config and "unet" not in config:
        config = config["model"]
    return dict(config)


def read_nemo_checkpoint(
    path: str | Path,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    ema: bool = True,
) -> tuple[ModelConfig, nn.Module, bool]:
    """(ModelConfig, the project's UNet with the checkpoint's weights, EMA weights used)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such NeMo checkpoint")
    used_ema = False
    if tarfile.is_tarfile(path):
        cfg, state = _read_nemo(path)
        if config is not None:
            cfg = _config_mapping(config, path)
    else:
        cfg = _config_mapping(config, path)
        ema_file = path.with_name(f"{path.stem}-EMA{path.suffix}")
        if ema and ema_file.exists():
            path, used_ema = ema_file, True
        state = _state_dict(_torch_load(path, str(path)), path)
    model = model_config_from_nemo(cfg)
    from imagen.nn import build_unet

    net = build_unet(model)
    try:
        load_nemo_weights(net, state, model.unet_type)
    except NemoWeightsError as e:
        raise NemoLoadError(f"{path}: {e}") from None
    return model, net, used_ema


def load_nemo_denoiser(
    path: str | Path,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> NemoDenoiser:
    """A NeMo ``.nemo`` / ``.ckpt`` as the project's denoiser module, in inference mode.

    ``den(x, sigma, text_embed=..., text_mask=..., lowres=None)`` returns D(x; sigma) as NeMo's
    EDMPrecond / ContinousDDPMPrecond would (SR stages: NeMo's inference augmentation level).
    """
    from imagen.diffusion import build_denoiser

    model, net, _ = read_nemo_checkpoint(path, config=config, ema=ema)
    den = NemoDenoiser(build_denoiser(model, net), model)
    return den.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        nargs="?",
        help="a .nemo archive or a MegatronImagen .ckpt (omit with --config "
        "alone to import a NeMo config as a params profile)",
    )
    parser.add_argument("--stage", choices=["base64", "sr256", "sr1024"], default=None)
    parser.add_argument(
        "--out",
        default="models",
        help="models folder; writes OUT/STAGE/model.pt (%(default)s). With --config alone: the "
        "profile file (default profiles/nemo-<config name>.yaml)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="model_config.yaml (for a .ckpt); alone (no FILE): a NeMo Imagen config "
        "(base64-500m.yaml, inference_pipeline.yaml, ...) to turn into a params profile",
    )
    parser.add_argument("--no-ema", action="store_true", help="ignore NeMo's EMA weights")
    parser.add_argument(
        "--resolution", type=int, default=None, help="output size (default: the stage's)"
    )
    parser.add_argument(
        "--lowres", type=int, default=None, help="SR: low-res input size (default: the stage's)"
    )


def main(args: argparse.Namespace, params: Any = None) -> int:
    if args.file is None:
        if args.config is None:
            print("imagen import-nemo: give a checkpoint FILE or --config", file=sys.stderr)
            return 2
        from imagen.nemo.config_import import main as import_config_main

        return import_config_main(args)
    if args.stage is None:
        print("imagen import-nemo: --stage is needed for a checkpoint", file=sys.stderr)
        return 2
    from imagen.checkpoint import save_stage
    from imagen.config import STAGE_RESOLUTIONS, StageConfig

    try:
        model, net, used_ema = read_nemo_checkpoint(
            args.file, config=args.config, ema=not args.no_ema
        )
    except (NemoLoadError, FileNotFoundError) as e:
        print(f"imagen import-nemo: {e}", file=sys.stderr)
        return 2
    res, lowres = STAGE_RESOLUTIONS[args.stage]
    if lowres is not None and args.lowres is not None:
        lowres = args.lowres
    if model.is_sr != (lowres is not None):
        print(
            f"imagen import-nemo: a {model.unet_type} UNet cannot be the {args.stage} stage",
            file=sys.stderr,
        )
        return 2
    # sampling: NeMo's inference defaults for the stage (steps, guidance, sampler)
    stage = StageConfig.model_validate(
        {
            "name": args.stage,
            "resolution": args.resolution or (res if model.is_sr else model.unet.image_size),
            "lowres": lowres,
            "model": model,
        }
    )
    extra = {"source": str(args.file), "nemo_ema": used_ema}
    out = save_stage(Path(args.out) / args.stage, stage, net.state_dict(), extra=extra)
    print(f"imported {args.file} ({model.unet_type}, EMA: {used_ema}) -> {out}")
    return 0
