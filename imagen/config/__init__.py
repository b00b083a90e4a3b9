"""Typed, validated configuration: params.yaml -> pydantic objects.

params.yaml is the one file a user edits. Its layout mirrors NeMo's per-stage config files, with
one difference: the cascade has three stages, so ``stages.<name>.model`` and
``stages.<name>.trainer`` hold the per-stage values and the top-level ``model`` / ``trainer``
blocks hold defaults shared by all stages (a stage's keys win).

- :mod:`imagen.config.base`   the error type, the strict base model, the stage names
- :mod:`imagen.config.model`  one stage's ``model`` block (conditioning, UNet, preconditioning)
- :mod:`imagen.config.run`    trainer, sampling, data, evaluation, MLflow; the resolved Params
- :mod:`imagen.config.load`   reading, merging, presets, validation (:func:`load_params`)
- :mod:`imagen.config.encoders` the text encoders encoder_path may name, what a folder says

This package does no model maths and reads no file but the params file it is given and, for an
unset ``embed_dim`` / ``token_length``, the text encoder folder's JSON config; the UNet tables
live in :mod:`imagen.presets`.
"""

from imagen.config.base import STAGE_RESOLUTIONS, STAGES, ConfigError, StageName
from imagen.config.load import deep_merge, flatten, load_params, params_hash, resolve_params
from imagen.config.model import (
    DEFAULT_ENCODER_PATH,
    AttentionType,
    ConditioningConfig,
    DDPMConfig,
    EDMConfig,
    EncoderConfig,
    ModelConfig,
    NoiseAugConfig,
    UNetConfig,
    UNetType,
    validate_unet,
)
from imagen.config.run import (
    DataConfig,
    EvaluateConfig,
    EvaluatorConfig,
    KeepConfig,
    MlflowConfig,
    OptimConfig,
    Params,
    ProgressiveConfig,
    SampleConfig,
    SamplingConfig,
    StageConfig,
    StageOverride,
    TrainerConfig,
)

__all__ = [
    "DEFAULT_ENCODER_PATH",
    "STAGES",
    "STAGE_RESOLUTIONS",
    "STAGE_SAMPLING",
    "AttentionType",
    "ConditioningConfig",
    "ConfigError",
    "DDPMConfig",
    "DataConfig",
    "EDMConfig",
    "EncoderConfig",
    "EvaluateConfig",
    "EvaluatorConfig",
    "KeepConfig",
    "MlflowConfig",
    "ModelConfig",
    "NoiseAugConfig",
    "OptimConfig",
    "Params",
    "ProgressiveConfig",
    "SampleConfig",
    "SamplingConfig",
    "StageConfig",
    "StageName",
    "StageOverride",
    "TrainerConfig",
    "UNetConfig",
    "UNetType",
    "deep_merge",
    "flatten",
    "load_params",
    "params_hash",
    "resolve_params",
    "validate_unet",
]
