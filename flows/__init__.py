"""Prefect: the flow ``imagen`` and its deployment ``cascade-train`` (one task per DVC stage)."""
