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
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from imagen.checkpoint import MODEL_FILE, save_stage
from imagen.config import STAGES, ConfigError, Params, StageConfig
from imagen.mlops.tracking import StageRun, stage_run
from imagen.train.callbacks import GridFromFirstBatch, KeyRecorder, LogLines, Progress
from imagen.train.checkpoints import LAST_CKPT, CheckpointWriteError, read_info
from imagen.train.grids import SampleGrid
from imagen.train.heldout import HeldoutLoss
from imagen.train.keep import keep_interval, keeping_rule
from imagen.train.logger import NullRun, StageRunLogger
from imagen.train.module import ImagenStage, NonFiniteLossError
from imagen.train.preempt import EXIT_PREEMPTED, Preempted
from imagen.train.resume import ResumeChoice, choose_resume, resume_note
from imagen.train.trainer import build_trainer, tf32


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


def _seed(stage: StageConfig, resume_step: int) -> None:
    """Seed this rank; a resumed run draws other noise and data order than its first part."""
    seed = (stage.trainer.seed * 1_000_003 + resume_step) * 1009 + rank_zero_only.rank
    pl.seed_everything(seed % 2**31, workers=True, verbose=False)


def _data(params: Params, stage: StageConfig, resume_step: int) -> Any:
    """The training data; after a resume the shard order is reshuffled (seeded by the step), so
    the first steps' samples are not replayed; every rank draws the same order and takes its
    own share, whatever the number of ranks (docs/training.md)."""
    from imagen.data.datamodule import ImagenDataModule

    if resume_step:
        t = stage.trainer.model_copy(update={"seed": stage.trainer.seed + resume_step})
        stage = stage.model_copy(update={"trainer": t})
    return ImagenDataModule(params, stage, split="train", start_step=resume_step)


def _run_context(
    params: Params, stage_name: str, out: Path, parent_run_id: str | None, is_zero: bool
) -> Any:
    if not is_zero:
        return NullRun()
    return stage_run(
        params,
        stage_name,
        parent_run_id=parent_run_id,
        resume_file=out / "mlflow_run.json",
        tags={"imagen.out": str(out)},
    )


def _start(module: ImagenStage, resume: ResumeChoice, params: Params, run: StageRun) -> None:
    """Say where training starts: resumed, fine-tuned from ``init_from``, or from scratch."""
    stage = module.stage
    rule = keeping_rule(stage)
    run.set_tags({"imagen.keep_rule": rule})
    run.log_dataset(Path(params.data.shards_dir) / "manifest.json", _dataset_name(params))
    if params.mlflow.system_metrics:
        run.start_system_metrics()
    if resume.path is not None:
        _say(f"resuming {stage.name} from {resume.path} (step {resume.step})")
        note = resume_note(resume.saved, stage)
        if note:
            _say(note)
    elif stage.trainer.init_from:
        from imagen.mlops.client import tracking_uri
        from imagen.train.finetune import init_weights

        src = init_weights(module, stage.trainer.init_from, tracking_uri(params))
        run.set_tags({f"imagen.init_from.{k}": v for k, v in src.items() if v is not None})
        _say(f"fine-tuning {stage.name} from {src['source']} ({src['file']}, step {src['step']}: "
             f"{src['took']}); fresh optimiser and schedule")  # fmt: skip
    _say(rule)
    own = params.own_data_note(stage.name)
    if own:
        _say(own)
        run.set_tags({"imagen.own_data": own})
    p, t = stage.trainer.progressive, stage.trainer
    if p is not None:
        size = stage.model.unet.image_size
        if p.steps >= t.max_steps:
            _say(f"every step trains at {p.resolution} px (trainer.progressive.steps {p.steps} "
                 f">= max_steps {t.max_steps}); none at {size} px")  # fmt: skip
        else:
            _say(f"steps 1-{p.steps} train at {p.resolution} px, {stage.step_batch_size(0)} "
                 f"images a step (trainer.progressive); the rest at {size} px")  # fmt: skip


def _dataset_name(params: Params) -> str:
    """The training data's name in MLflow: the source kind and, for a user's data, its path."""
    data = params.data
    return data.source if not data.source_path else f"{data.source}:{data.source_path}"


def _say(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"imagen train: {text}", file=sys.stderr, flush=True)


def _callbacks(
    params: Params, stage: StageConfig, out: Path, run: StageRun, record_keys: bool
) -> tuple[Progress, list[Callback]]:
    grid = SampleGrid(params, stage) if rank_zero_only.rank == 0 else None
    heldout = HeldoutLoss(params, stage) if stage.trainer.heldout_loss.num else None
    progress = Progress(stage, out, grid, run, monitor_every=keep_interval(stage), heldout=heldout)
    callbacks: list[Callback] = [progress]
    if grid is not None:
        callbacks.append(GridFromFirstBatch(grid))
    if record_keys:
        callbacks.append(KeyRecorder(out))
    if not sys.stderr.isatty():
        callbacks.append(LogLines(stage))
    return progress, callbacks


def train_stage(
    params: Params,
    stage_name: str,
    out: Path,
    *,
    parent_run_id: str | None = None,
    record_keys: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or fine-tune) one stage into ``out``; returns the metrics written to
    metrics.json (an empty dict on ranks other than zero)."""
    stage = params.stage(stage_name)
    out.mkdir(parents=True, exist_ok=True)
    is_zero = rank_zero_only.rank == 0
    resume = choose_resume(out / "checkpoints", stage, apply=is_zero, report=is_zero)
    _seed(stage, resume.step)
    wall0 = time.perf_counter()
    with (
        _run_context(params, stage_name, out, parent_run_id, is_zero) as run,
        tf32(stage.trainer.allow_tf32),
    ):
        module = ImagenStage(stage)
        _start(module, resume, params, run)
        progress, callbacks = _callbacks(params, stage, out, run, record_keys)
        trainer = build_trainer(stage, out, callbacks, logger=StageRunLogger(run))
        try:
            trainer.fit(
                module,
                datamodule=_data(params, stage, resume.step),
                ckpt_path=resume.path,
                weights_only=True,
            )
        except Preempted as e:
            run.set_tags({"imagen.preempted_at_step": e.step})
            run.final_status = "KILLED"  # a re-run resumes this run
            raise
        final = out / "checkpoints" / LAST_CKPT
        # the final state, also when max_steps was already reached before this run
        trainer.save_checkpoint(final, weights_only=False)
        ema = module.ema_state_dict()  # sharded: gathered on rank zero (every rank calls it)
        if not trainer.is_global_zero:
            return {}
        module.hold_full_ema(ema if module.sharded else None)
        if progress.grid is not None and progress.start_step < trainer.global_step:
            progress.sample(trainer, module)
        wall = time.perf_counter() - wall0
        return _finish(stage, out, module, ema, trainer, progress, run, wall)


def _finish(
    stage: StageConfig,
    out: Path,
    module: ImagenStage,
    ema: dict[str, Any],
    trainer: pl.Trainer,
    progress: Progress,
    run: StageRun,
    wall: float,
) -> dict[str, Any]:
    """Write model.pt (``ema``: the EMA weights), metrics.json and loss.csv; log them."""
    from imagen.nn import count_parameters

    losses = [v for _, v in progress.history[-5:]]
    metrics = {
        "stage": stage.name,
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
    if progress.heldout_last:
        metrics["heldout_loss"] = progress.heldout_last["heldout/loss"]
        metrics["heldout_loss_step"] = int(progress.heldout_last["step"])
    extra = {"metrics": metrics, "mlflow_run_id": run.run_id}
    save_stage(out, stage, ema, step=trainer.global_step, extra=extra)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_loss_csv(out / "loss.csv", progress.history)
    numbers = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics(numbers, step=int(trainer.global_step))
    run.log_artifact(out / "metrics.json")
    run.log_artifact(out / MODEL_FILE)
    run.log_artifact(out / "checkpoints" / LAST_CKPT, "checkpoints")
    return metrics


def write_loss_csv(path: Path, history: list[tuple[int, float]]) -> None:
    """``step,loss`` rows for `dvc plots` (after a resume, the history came from the ckpt)."""
    path.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in history))


def _last_good(out: Path) -> str:
    last = out / "checkpoints" / LAST_CKPT
    try:
        return f"the last good checkpoint is {last} (step {read_info(last).step})"
    except Exception:  # noqa: BLE001 - missing or unreadable: say so
        return f"no readable {last}"


def main(args: argparse.Namespace, params: Params) -> int:
    stage_name = args.stage
    params.stage(stage_name)  # a clear error for a stage missing from params.yaml
    out = Path(args.out) if args.out else Path(params.models_dir) / stage_name
    where = f"imagen train --stage {stage_name}"
    try:
        metrics = train_stage(
            params,
            stage_name,
            out,
            parent_run_id=args.parent_run_id,
            record_keys=getattr(args, "record_keys", False),
        )
    except NonFiniteLossError as e:
        print(f"{where}: {e}", file=sys.stderr)
        return 1
    except CheckpointWriteError as e:
        print(f"{where}: {e}; {_last_good(out)}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"{where}: {e}; run the same command to resume", file=sys.stderr)
        # rank zero speaks for the job; other ranks leave quietly (Lightning's own launcher
        # stops every process when one of its children exits non-zero)
        return EXIT_PREEMPTED if rank_zero_only.rank == 0 else 0
    except SIGTERMException:  # before the first step: nothing new to save
        print(f"{where}: SIGTERM before training started", file=sys.stderr)
        return EXIT_PREEMPTED
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
