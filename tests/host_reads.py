"""The host-read counter of the package (imagen.nn.host_reads), where the tests import it."""

from __future__ import annotations

from imagen.nn.host_reads import READ_OPS, HostReads

__all__ = ["READ_OPS", "HostReads"]
