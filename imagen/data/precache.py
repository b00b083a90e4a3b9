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

With ``online_encoding: true`` nothing is encoded: the loader encodes the raw captions on the
fly; precache still builds/checks the encoder and records it, so training finds it ready.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imagen.config import ConditioningConfig, ConfigError, DataConfig, Params
from imagen.data.shards import sha256_file, write_tar
from imagen.text import TextEncoder, encoder_fingerprint, load_text_encoder, to_storage


def input_shards(data: DataConfig) -> list[Path]:
    """The ingested shards (train first, then holdout), or a ConfigError saying what to run."""
    folder = Path(data.shards_dir)
    shards = sorted(folder.glob("train-*.tar")) + sorted(folder.glob("holdout-*.tar"))
    if not shards:
        raise ConfigError(
            f"data.shards_dir: no train-*.tar / holdout-*.tar shards in {folder}; "
            "run `imagen ingest` first"
        )
    return shards


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_shard(
    src: Path,
    dst: Path,
    encoder: TextEncoder,
    cond: ConditioningConfig,
    batch_size: int,
    on_batch: Callable[[int], Any] = lambda n: None,
) -> dict[str, Any]:
    """Copy one shard's samples to ``dst`` adding ``<precached_key>.npy``; returns its stats."""
    import webdataset as wds

    samples = []
    for s in wds.WebDataset(str(src), shardshuffle=False, empty_check=False):
        samples.append({k: v for k, v in s.items() if not k.startswith("_") or k == "__key__"})
    name = f"{cond.precached_key}.npy"
    tokens, emb_bytes = 0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        captions = []
        for s in chunk:
            if "txt" not in s:
                raise ConfigError(f"{src}: sample {s['__key__']!r} has no caption (.txt)")
            captions.append(s["txt"].decode("utf-8"))
        for s, emb in zip(chunk, encoder.encode_unpadded(captions), strict=True):
            blob = _npy_bytes(to_storage(emb, cond.storage_dtype))
            s[name] = blob
            tokens += emb.shape[0]
            emb_bytes += len(blob)
        on_batch(len(chunk))
    info = write_tar(dst, samples)
    info.update(tokens=tokens, embedding_bytes=emb_bytes)
    return info


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


def _finished(side: Path, in_hash: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The side-car of an encoded shard made from the same input with the same settings."""
    if not side.exists():
        return None
    prev = json.loads(side.read_text())
    same = prev.get("input_sha256") == in_hash and all(prev.get(k) == v for k, v in expect.items())
    return prev if same else None


def _encode_shards(
    shards: list[Path],
    out: Path,
    encoder: TextEncoder,
    cond: ConditioningConfig,
    expect: dict[str, Any],
    batch_size: int,
    bar: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Encode every shard not already finished; returns (one entry per shard, captions encoded)."""
    results, encoded = [], 0
    for src in shards:
        dst, side = out / src.name, out / f"{src.name}.json"
        in_hash = sha256_file(src)
        prev = _finished(side, in_hash, expect) if dst.exists() else None
        if prev is not None:
            bar.update(prev["samples"])
            results.append({**prev, "skipped": True})
            continue
        info = encode_shard(src, dst, encoder, cond, batch_size, on_batch=bar.update)
        encoded += info["samples"]
        entry = {**info, "input_sha256": in_hash, "split": src.name.split("-")[0], **expect}
        _atomic_json(side, entry)
        results.append({**entry, "skipped": False})
    return results, encoded


def _remove_stale(out: Path, shards: list[Path]) -> None:
    names = {s.name for s in shards}
    for old in out.glob("*.tar"):
        if old.name not in names:  # shards of an earlier ingest that no longer exist
            old.unlink()
            Path(f"{old}.json").unlink(missing_ok=True)


def _manifest(
    cond: ConditioningConfig, record: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    n = sum(r["samples"] for r in results)
    emb_bytes = sum(r["embedding_bytes"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    itemsize = 4 if cond.storage_dtype == "float32" else 2
    return {
        "online_encoding": False,
        "encoder": record,
        "samples": n,
        "bytes_per_sample": emb_bytes / max(1, n),
        "mean_tokens": tokens / max(1, n),
        "padded_float32_bytes_per_sample": cond.token_length * cond.embed_dim * 4,
        "payload_bytes_per_sample": tokens / max(1, n) * cond.embed_dim * itemsize,
        "shards": [{k: r[k] for k in sorted(r)} for r in results],
    }


def _shard_sizes(data: DataConfig) -> dict[str, int]:
    """Samples per ingested shard from ingest's manifest (for the progress bar's total)."""
    path = Path(data.shards_dir) / "manifest.json"
    if not path.exists():
        return {}
    return {s["name"]: s["samples"] for s in json.loads(path.read_text())["shards"]}


def precache(
    params: Params, batch_size: int = 64, progress: bool = True, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Encode every ingested caption (skipping finished shards); returns the manifest."""
    from tqdm import tqdm

    cond, data = params.conditioning, params.data
    out = Path(data.encoded_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_text_encoder(cond)  # builds the embedded default on first use
    record = _encoder_record(cond, encoder)
    _atomic_json(out / "encoder.json", record)
    if cond.online_encoding:
        manifest = {"online_encoding": True, "encoder": record, "shards": []}
        _atomic_json(out / "manifest.json", manifest)
        log(
            "precache: skipped (model.conditioning.online_encoding is true: the loader encodes "
            f"captions on the fly from {data.shards_dir} with the encoder at {encoder.path})"
        )
        return manifest
    shards = input_shards(data)
    expect = {
        "encoder_sha256": record["sha256"],
        "token_length": cond.token_length,
        "storage_dtype": cond.storage_dtype,
        "precached_key": cond.precached_key,
    }
    sizes = _shard_sizes(data)
    total = sum(sizes.get(s.name, 0) for s in shards) or None
    bar = tqdm(total=total, desc="precache", unit="caption", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        results, encoded = _encode_shards(shards, out, encoder, cond, expect, batch_size, bar)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    _remove_stale(out, shards)
    manifest = _manifest(cond, record, results)
    _atomic_json(out / "manifest.json", manifest)
    rate = encoded / elapsed if elapsed > 0 and encoded else 0.0
    skipped = sum(r["skipped"] for r in results)
    log(
        f"precache: {manifest['samples']} samples in {len(results)} shards "
        f"({skipped} already finished, skipped) -> {out}; embeddings "
        f"{manifest['bytes_per_sample']:.0f} bytes/sample ({cond.storage_dtype}, "
        f"{manifest['mean_tokens']:.1f} tokens of {cond.embed_dim}; padded float32 would be "
        f"{manifest['padded_float32_bytes_per_sample']}); {encoded} captions encoded at "
        f"{rate:.1f} captions/s"
    )
    manifest["captions_per_s"] = rate
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="captions per T5 forward")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace, params: Params) -> int:
    from imagen.mlops.tracking import stage_run

    # the stage's MLflow run (nested under the pipeline's parent run): sizes + the manifest
    with stage_run(params, "precache") as run:
        manifest = precache(params, batch_size=args.batch_size, progress=not args.no_progress)
        run.log_metrics(
            {
                k: v
                for k, v in manifest.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        run.log_artifact(Path(params.data.encoded_dir) / "manifest.json")
    return 0
