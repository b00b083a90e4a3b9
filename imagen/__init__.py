"""Imagen cascaded text-to-image diffusion (64 -> 256 -> 1024) as an orchestrated MLOps workflow."""

__version__ = "0.1.0"
