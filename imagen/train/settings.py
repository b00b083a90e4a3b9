"""Which stage settings a training state depends on, and its settings hash.

A checkpoint resumes under a changed config when no *state-relevant* key changed. A key is
state-relevant when the saved tensors mean something else under a new value (the UNet's shape,
the preconditioning, the text conditioning) or when resuming would silently keep the saved
value instead of the new one (the optimiser and its learning-rate schedule are restored from
the checkpoint). Everything else may change between a checkpoint and its resumption: devices,
num_nodes, num_workers, batch size, intervals, max_steps, seed, EMA decay, sampling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from imagen.config import flatten

# Key paths (a trailing "." covers the whole block) that define what a saved state means.
STATE_KEYS: tuple[str, ...] = (
    "name",
    "resolution",
    "lowres",
    "model.",  # UNet shape, preconditioning, conditioning, noise augmentation
    "trainer.optim.",  # optimiser + schedule: restored from the checkpoint on resume
    "trainer.precision",  # compared by precision class (see _PRECISION_STATE)
    "trainer.init_from",  # where the weights started
)
# Inside "model.": how the same network is computed, not which network it is.
COMPUTE_ONLY: tuple[str, ...] = (
    "model.unet.gradient_checkpointing",
    "model.unet.flash_attention",
    "model.channels_last",
    "model.inductor",
    "model.preset",  # a name; the values it expands to are compared
)
# fp32 and bf16 autocast keep the same fp32 weights and optimiser state; fp16 adds a grad scaler.
_PRECISION_STATE = {
    "32": "fp32",
    "32-true": "fp32",
    "bf16": "fp32",
    "bf16-mixed": "fp32",
    "16": "fp16-scaler",
    "16-mixed": "fp16-scaler",
}


def is_state_key(key: str) -> bool:
    """Whether a flattened stage-config key is state-relevant (see the module docstring)."""
    if any(key == c or key.startswith(c + ".") for c in COMPUTE_ONLY):
        return False
    return any(key.startswith(k) if k.endswith(".") else key == k for k in STATE_KEYS)


def state_settings(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The state-relevant part of a stage config (``model_dump(mode="json")``), flattened."""
    out = {k: v for k, v in flatten(stage).items() if is_state_key(k) and v is not None}
    if "trainer.precision" in out:
        out["trainer.precision"] = _PRECISION_STATE.get(str(out["trainer.precision"]), "?")
    return out


def settings_hash(stage: Mapping[str, Any]) -> str:
    """8 hex digits naming the state-relevant settings (the ``settings=`` of checkpoint names)."""
    blob = json.dumps(state_settings(stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def changed_settings(then: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple]:
    """State-relevant keys whose values differ: key -> (then, now)."""
    a, b = state_settings(then), state_settings(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def all_changes(then: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple]:
    """Every key whose value differs (state-relevant or not): key -> (then, now)."""
    a, b = flatten(then), flatten(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe(changes: Mapping[str, tuple], limit: int = 6) -> str:
    """``key a -> b, ...`` for a message (at most ``limit`` keys, then ``+N more``)."""
    items = [f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return ", ".join(items) + (f", +{more} more" if more > 0 else "")


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."
