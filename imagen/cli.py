"""The ``imagen`` command: one sub-command per pipeline stage, so each stage also runs alone.

Every sub-command reads params.yaml (``--params``), applies ``--set key.path=value`` overrides,
validates the whole config before doing any work, and then calls the ``main(args, params)`` of
the module that implements it. Modules are imported lazily so ``imagen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name -> (module, one-line help). Each module defines add_arguments(parser) and
# main(args, params) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("imagen.nn.counts", "list the UNet presets with their parameter counts"),
    "ingest": ("imagen.data.ingest", "write webdataset shards + manifest from a source"),
    "precache": ("imagen.data.precache", "encode every caption with the T5 text encoder"),
    "train": ("imagen.train", "train one cascade stage (base64, sr256 or sr1024)"),
    "checkpoints": (
        "imagen.train.listing",
        "list a stage's checkpoints: step, time, size, settings that differ",
    ),
    "finetune": (
        "imagen.lora.command",
        "teach a trained stage a few captioned pictures (LoRA adapters)",
    ),
    "sample": ("imagen.sample.cli", "generate images for prompts with the trained cascade"),
    "evaluator": (
        "imagen.evaluate.dual_stage",
        "train the offline image-text evaluator (dual encoder) on the training split",
    ),
    "evaluate": ("imagen.evaluate.stage", "FID-CLIP sweep over guidance scales; register models"),
    "pipeline": ("imagen.mlops.pipeline", "pipeline helpers: MLflow parent run, UI, status"),
    "registry": (
        "imagen.mlops.promote",
        "the model registry: show the cascade's versions, promote one to champion",
    ),
    "import-nemo": ("imagen.nemo.load", "turn a NeMo .nemo / .ckpt into a stage model"),
}

OFFLINE_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # no per-file download bars in the logs when evaluate registers the cascade
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def _set_threads() -> None:
    import torch

    n = int(os.environ.get("IMAGEN_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, n))


def profile_overrides(files: list[str]) -> list[str]:
    """``key.path=value`` strings from profile files (YAML mappings of dotted keys)."""
    import yaml

    from imagen.config import ConfigError

    out: list[str] = []
    for f in files:
        try:
            data = yaml.safe_load(Path(f).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--profile {f}: {e.strerror}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--profile {f}: expected a mapping of dotted keys to values")
        out += [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in data.items()
        ]
    return out


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``imagen`` parser; only ``command``'s module is imported for its own options, so
    ``imagen --help`` stays fast."""
    parser = argparse.ArgumentParser(
        prog="imagen",
        description=(
            "Imagen cascaded text-to-image diffusion (64 -> 256 -> 1024). Each sub-command is "
            "one pipeline stage; `dvc repro` chains them, the Prefect deployment "
            "imagen/cascade-train runs them, and every run is logged to MLflow."
        ),
        epilog="Run `imagen <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        p.add_argument(
            "--set",
            "-S",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a params.yaml value, e.g. -S stages.base64.trainer.max_steps=10",
        )
        p.add_argument(
            "--profile",
            action="append",
            default=[],
            metavar="FILE",
            help="a YAML mapping of dotted params keys to values (e.g. profiles/learn.yaml), "
            "applied before --set",
        )
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    from imagen.config import ConfigError, load_params

    module = importlib.import_module(args._module)
    try:
        needs_params = args.command not in ("presets", "import-nemo")
        if needs_params:
            args.overrides = [*profile_overrides(args.profile), *args.overrides]
        params = load_params(args.params, args.overrides) if needs_params else None
    except ConfigError as e:
        print(f"imagen {args.command}: {e}", file=sys.stderr)
        return 2
    _set_threads()
    try:
        return int(module.main(args, params) or 0)
    except ConfigError as e:
        print(f"imagen {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imagen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
