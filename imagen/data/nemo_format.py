"""NeMo's precached-embedding shards: the ``pickle`` member, read without running code.

NeMo's Imagen trains from webdataset samples ``<key>.jpg``, ``<key>.txt`` and ``<key>.pickle``,
the pickle holding ``{precached_key: {"encodings": array (n_tokens, embed_dim)}}`` (its
PickleTransform pads or trims that to token_length). This module reads and writes that member.

A pickle can run any code while it loads (a ``__reduce__`` naming ``os.system``, say), so
:func:`safe_loads` unpickles with an allowlist: dicts, lists, tuples, sets, plain scalars and
strings (pickle opcodes, no imports), numpy arrays, dtypes and scalars (the reconstruction
helpers numpy's own pickles name), and ``_codecs.encode`` (how protocol 2 stores bytes).
Any other global is refused before it is imported, and the record is reported as bad with the
name it asked for; nothing from it is executed.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

PICKLE_MEMBER = "pickle"

# (module, name) pairs numpy's and CPython's pickles of plain arrays use. numpy 2 moved
# numpy.core to numpy._core; pickles written by either name the module they were made with.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class BadRecord(ValueError):
    """A sample whose NeMo pickle cannot be used; ``reason`` is a short stable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise BadRecord(
                "unsafe_pickle",
                f"the pickle asks for {module}.{name}, which is not a container, scalar or "
                "numpy array; refused without importing or calling it",
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        elif module.startswith("numpy._core.") and not hasattr(np, "_core"):
            module = "numpy.core." + module.removeprefix("numpy._core.")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise BadRecord("unsafe_pickle", "the pickle refers to a persistent object")


def safe_loads(blob: bytes) -> Any:
    """Unpickle ``blob`` allowing only containers, plain scalars and numpy arrays.

    Raises :class:`BadRecord` (reason ``unsafe_pickle`` or ``unreadable_pickle``).
    """
    try:
        return _AllowlistUnpickler(io.BytesIO(blob)).load()
    except BadRecord:
        raise
    except Exception as e:  # truncated, not a pickle, a bad opcode...
        raise BadRecord("unreadable_pickle", f"{type(e).__name__}: {e}"[:200]) from None


def read_encodings(blob: bytes, precached_key: str, embed_dim: int | None = None) -> np.ndarray:
    """The ``(n_tokens, embed_dim)`` float32 encodings of one NeMo pickle member.

    Raises :class:`BadRecord` naming why the record cannot be used: an unsafe or unreadable
    pickle, no ``precached_key`` (reason ``missing_precached_key``), no ``encodings`` array, or
    an array of the wrong kind or width (``bad_encodings``).
    """
    data = safe_loads(blob)
    if not isinstance(data, Mapping):
        raise BadRecord("bad_encodings", f"the pickle holds a {type(data).__name__}, not a dict")
    if precached_key not in data:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise BadRecord(
            "missing_precached_key",
            f"no {precached_key!r} (model.conditioning.precached_key) in the pickle; "
            f"its keys: {keys}",
        )
    entry = data[precached_key]
    arr = entry.get("encodings") if isinstance(entry, Mapping) else None
    if not isinstance(arr, np.ndarray):
        raise BadRecord(
            "bad_encodings", f"{precached_key!r} has no 'encodings' array (NeMo's layout)"
        )
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise BadRecord(
            "bad_encodings",
            f"encodings have shape {arr.shape} and dtype {arr.dtype}; "
            "expected a numeric (n_tokens, embed_dim) array",
        )
    if embed_dim is not None and arr.shape[1] != embed_dim:
        raise BadRecord(
            "bad_encodings",
            f"encodings are {arr.shape[1]} wide but model.conditioning.embed_dim is {embed_dim}",
        )
    return arr.astype(np.float32)


def encodings_pickle(emb: np.ndarray, precached_key: str) -> bytes:
    """One NeMo pickle member: ``{precached_key: {"encodings": emb}}`` (unpadded tokens)."""
    arr = np.ascontiguousarray(emb)
    return pickle.dumps({precached_key: {"encodings": arr}}, protocol=4)


def has_nemo_encodings(sample: Mapping[str, Any]) -> bool:
    """Whether a webdataset sample carries a NeMo ``pickle`` member."""
    return PICKLE_MEMBER in sample
