"""Cascade sampling: text -> 64 px -> 256 px -> 1024 px through the trained stage models."""

from imagen.sample.cascade import Cascade, CascadeStage, cascade_grid, stages_to

__all__ = ["Cascade", "CascadeStage", "cascade_grid", "stages_to"]
