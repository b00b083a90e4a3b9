"""The Prefect flow "imagen-sample" (deployment "sample"): prompts -> images from the cascade.

The flow runs ``imagen sample`` in the project with its output streamed into the run's log, so a
flow run makes exactly the images the command makes with the same options (prompts, negative
prompts, seeds, steps, guidance, sampler, depth, models folder or registered model URI). Each
flow run writes to its own folder, ``<sample.out_dir>/<flow run name>`` unless ``out`` is given,
so no run overwrites another's pictures, and ends with a table artifact: every image with its
prompt, negative prompt, seed and file. Served beside imagen/cascade-train by ``make prefect``::

    prefect deployment run imagen-sample/sample \\
        --param prompts='["a red circle", "a blue square"]' --param negative='["blurry"]'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from imagen.config import STAGES, ConfigError, load_params
from imagen.mlops.pipeline import stream_tail

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEPLOYMENT = "sample"


def sample_command(
    prompts: list[str],
    out: Path,
    *,
    negative: list[str] | None = None,
    models: str | None = None,
    depth: str = "sr1024",
    num_images: int = 1,
    seed: int = 0,
    steps: str | int | None = None,
    guidance: str | float | None = None,
    sampler: str | None = None,
    batch_size: int = 4,
) -> list[str]:
    """The ``imagen sample`` command line for these options; a bad one raises ConfigError
    naming the flow parameter, before any work."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts: give a list of at least one text prompt")
    negative = list(negative or [])
    if len(negative) not in (0, 1, len(prompts)):
        raise ConfigError(
            f"negative: {len(negative)} negative prompts for {len(prompts)} prompts; "
            "give one for all, or one per prompt"
        )
    if depth not in STAGES:
        raise ConfigError(f"depth: {depth!r} is not one of {', '.join(STAGES)}")
    if num_images < 1:
        raise ConfigError(f"num_images: must be at least 1, got {num_images}")
    cmd = [sys.executable, "-m", "imagen.cli", "sample", *prompts, "--out", str(out)]
    cmd += ["--depth", depth, "--num-images", str(num_images), "--seed", str(seed)]
    cmd += ["--batch-size", str(batch_size), "--no-progress"]
    for text in negative:
        cmd += ["--negative", text]
    options = {"--models": models, "--steps": steps, "--guidance": guidance, "--sampler": sampler}
    for option, value in options.items():
        if value is not None:
            cmd += [option, str(value)]
    return cmd


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="imagen sample")
def run_sample(cmd: list[str], root: str) -> None:
    """Run ``cmd`` in ``root``, its output lines in the task's log; raise on failure."""
    rc, tail = stream_tail(cmd, get_run_logger().info, cwd=root)
    if rc != 0:
        raise RuntimeError(f"imagen sample exited with {rc}:\n" + "\n".join(tail))


@flow(name="imagen-sample", log_prints=True)
def sample_flow(
    prompts: list[str],
    negative: list[str] | None = None,
    models: str | None = None,
    depth: str = "sr1024",
    num_images: int = 1,
    seed: int = 0,
    steps: int | str | None = None,
    guidance: float | str | None = None,
    sampler: str | None = None,
    batch_size: int = 4,
    out: str | None = None,
    project_dir: str | None = None,
) -> dict[str, Any]:
    """Generate images for ``prompts`` with the project's trained cascade (``imagen sample``).

    Args:
        prompts: the text prompts.
        negative: negative prompts: one for all prompts or one per prompt; classifier-free
            guidance's unconditional branch is conditioned on it instead of the null text.
        models: a models folder or a registered model URI (models:/imagen-cascade@champion);
            default: params.yaml's models_dir.
        depth: the last stage: base64, sr256 or sr1024.
        num_images: images per prompt; image k of a prompt has seed ``seed + k``.
        seed: the first seed.
        steps: sampling steps, one number or per stage (base64=30,sr256=20).
        guidance: classifier-free guidance scale, one or per stage (base64=4).
        sampler: heun | euler | ddpm | ddim | dpmpp_2m, one or per stage.
        batch_size: images sampled at once.
        out: the output folder (relative to the project); default
            ``<sample.out_dir>/<flow run name>``.
        project_dir: the project; default: the one this flow belongs to.
    """
    logger = get_run_logger()
    root = Path(project_dir or PROJECT_DIR).resolve()
    params = load_params(root / "params.yaml")  # a broken params.yaml fails here, naming the key
    folder = Path(out) if out else Path(params.sample.out_dir) / (flow_run.get_name() or "flow")
    folder = folder if folder.is_absolute() else root / folder
    cmd = sample_command(
        prompts,
        folder,
        negative=negative,
        models=models,
        depth=depth,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        batch_size=batch_size,
    )
    logger.info("images go to %s", folder)
    run_sample(cmd, str(root))
    records = json.loads((folder / "images.json").read_text())
    rows = [
        {
            "index": r["index"],
            "prompt": r["prompt"],
            "negative": r["negative"] or "",
            "seed": r["seed"],
            "file": Path(list(r["files"].values())[-1]).resolve().as_uri(),
        }
        for r in records
    ]
    grid = (folder / "grid.png").as_uri()
    create_table_artifact(rows, "imagen-samples", f"The images of this run; the grid: {grid}")
    return {"out": str(folder), "grid": str(folder / "grid.png"), "images": records}


if __name__ == "__main__":
    sample_flow(prompts=sys.argv[1:] or ["a red circle"])
