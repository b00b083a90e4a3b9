"""Counting host reads: every .item(), bool(), int() or float() of a tensor runs the one op
``aten._local_scalar_dense``, which waits for the device (a sync on a GPU, a graph break under
torch.compile)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count``: the host reads inside."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
