"""Counting host reads: every ``.item()``, ``bool()``, ``int()`` or ``float()`` of a tensor runs
``aten._local_scalar_dense`` (``aten.is_nonzero`` / ``aten.item`` on the way), which waits for
the device: a stall of the GPU's queue, a graph break under torch.compile. The tests and
``bench/bench_gpu.py`` count them with :class:`HostReads`."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READ_OPS = frozenset(
    {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    }
)


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count``: the host reads inside (one per
    value read: the ``_local_scalar_dense`` each read ends in)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
