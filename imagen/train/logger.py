"""The Lightning logger of a stage: metrics go to the stage's MLflow run on rank zero."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from imagen.mlops.tracking import StageRun


class StageRunLogger(Logger):
    """Lightning logger that forwards metrics to the stage's MLflow run (rank zero only)."""

    def __init__(self, run: StageRun) -> None:
        super().__init__()
        self.run = run

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run.run_id or "local"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the whole resolved config is logged when the run starts

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


class NullRun:
    """Stand-in for :func:`stage_run` on ranks other than zero."""

    def __enter__(self) -> StageRun:
        return StageRun()

    def __exit__(self, *exc: Any) -> None:
        return None
