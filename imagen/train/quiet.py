"""Lightning's messages that say nothing about this project's runs, kept out of the log."""

from __future__ import annotations

import logging
import warnings

# (message regex, category) of warnings that do not apply to step-based stage training
_IGNORED = (
    r".*val_dataloader.*validation_step.*",  # the data module also serves held-out batches
    r".*Checkpoint directory .* exists and is not empty.*",  # the keeping rule owns that folder
    r".*does not have many workers.*",  # num_workers is the user's choice (0 on small CPUs)
    r".*`training_step` returned `None`.*",  # trainer.nan_policy=skip skips a batch on purpose
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning vs. torch internals
    # a `dvc exp run --temp` / queued experiment resumes in another folder: the files are kept
    r".*The dirpath has changed from .*",
)


def quiet_lightning() -> None:
    """Drop Lightning's start-up tips and the warnings that do not apply here."""
    for pattern in _IGNORED:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
