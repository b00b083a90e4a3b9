"""The stage entry point: ``imagen train --stage NAME`` builds the pieces, fits, writes outputs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from imagen.checkpoint import save_stage
from imagen.config import STAGES, ConfigError, Params
from imagen.mlops.tracking import stage_run
from imagen.train.callbacks import GridFromFirstBatch, KeyRecorder, Progress
from imagen.train.checkpoints import LAST_CKPT, resume_path
from imagen.train.grids import SampleGrid
from imagen.train.logger import NullRun, StageRunLogger
from imagen.train.module import ImagenStage, NonFiniteLossError
from imagen.train.trainer import build_trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=list(STAGES), help="stage to train")
    parser.add_argument(
        "--parent-run-id",
        default=None,
        help="MLflow parent run (default: $IMAGEN_PARENT_RUN_ID, else .imagen/parent_run)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <models_dir>/<stage>)")
    parser.add_argument(
        "--record-keys",
        action="store_true",
        help="write ranks/rank<r>.json: the sample keys each rank trained on, its weights' hash",
    )


def train_stage(
    params: Params,
    stage_name: str,
    out: Path,
    *,
    parent_run_id: str | None = None,
    record_keys: bool = False,
) -> dict[str, Any]:
    """Train (or resume) one stage into ``out``; returns the metrics written to metrics.json."""
    from imagen.data.loader import ImagenDataModule

    stage = params.stage(stage_name)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(stage.trainer.seed + rank_zero_only.rank, workers=True, verbose=False)
    is_zero = rank_zero_only.rank == 0
    wall0 = time.perf_counter()
    ctx = (
        stage_run(
            params,
            stage_name,
            parent_run_id=parent_run_id,
            resume_file=out / "mlflow_run.json",
            tags={"imagen.out": str(out)},
        )
        if is_zero
        else NullRun()
    )
    with ctx as run:
        module = ImagenStage(stage)
        grid = SampleGrid(params, stage) if is_zero else None
        progress = Progress(stage, out, grid, run)
        callbacks: list[Callback] = [progress]
        if grid is not None:
            callbacks.append(GridFromFirstBatch(grid))
        if record_keys:
            callbacks.append(KeyRecorder(out))
        trainer = build_trainer(stage, out, callbacks, logger=StageRunLogger(run))
        data = ImagenDataModule(params, stage, split="train")
        ckpt = resume_path(out, stage)
        if ckpt is not None and is_zero:
            print(f"imagen train: resuming {stage_name} from {ckpt}", file=sys.stderr, flush=True)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
        final = out / "checkpoints" / LAST_CKPT
        # the final state, also when max_steps was already reached before this run
        trainer.save_checkpoint(final, weights_only=False)
        if not trainer.is_global_zero:
            return {}
        if grid is not None and progress.start_step < trainer.global_step:
            progress.sample(trainer, module)
        from imagen.nn import count_parameters

        wall = time.perf_counter() - wall0
        losses = [v for _, v in progress.history[-5:]]
        metrics = {
            "stage": stage_name,
            "steps": int(trainer.global_step),
            "final_loss": float(sum(losses) / len(losses)) if losses else None,
            "first_loss": float(progress.history[0][1]) if progress.history else None,
            "images_per_s": progress.images / max(progress.train_seconds, 1e-9),
            "train_seconds": progress.train_seconds,
            "wall_seconds": wall,
            "parameters": count_parameters(module.net),
            "skipped_nonfinite": int(module.skipped_nonfinite),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }
        save_stage(
            out,
            stage,
            module.ema_state_dict(),
            step=trainer.global_step,
            extra={"metrics": metrics, "mlflow_run_id": run.run_id},
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_loss_csv(out / "loss.csv", progress.history)
        run.log_metrics(
            {f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
            step=int(trainer.global_step),
        )
        run.log_artifact(out / "metrics.json")
        run.log_artifact(out / "model.pt")
        run.log_artifact(final, "checkpoints")
        return metrics


def write_loss_csv(path: Path, history: list[tuple[int, float]]) -> None:
    """``step,loss`` rows for `dvc plots` (after a resume, the history came from the ckpt)."""
    path.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in history))


def main(args: argparse.Namespace, params: Params) -> int:
    stage_name = args.stage
    params.stage(stage_name)  # a clear error for a stage missing from params.yaml
    out = Path(args.out) if args.out else Path(params.models_dir) / stage_name
    try:
        metrics = train_stage(
            params,
            stage_name,
            out,
            parent_run_id=args.parent_run_id,
            record_keys=getattr(args, "record_keys", False),
        )
    except NonFiniteLossError as e:
        print(f"imagen train --stage {stage_name}: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
