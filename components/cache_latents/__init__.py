"""cache: VAE latent moments and text conditioning for every packed sample, keyed by content.

One latent shard per input shard. Each sample is `{key}.safetensors` holding the VAE
posterior moments (`mean`, `logvar`; `mean_flip`, `logvar_flip` when `random_flip`),
`input_ids` and, with `cache.text_embeddings`, `encoder_hidden_states`; plus
`{key}.json` (caption, original size, crop). Training draws mean + std·ε with a
fresh ε every step, as the recipe's `latent_dist.sample()` does.

A latent shard is named by its input shard and its cache key (the input shard's
sha256, the weights' hashes and every transform setting), is committed atomically
with a `.json` receipt, and is never encoded twice: an unchanged key is skipped, a
crashed run continues with the shards it had not finished. Work divides by shard
(`worker_index` of `num_workers`, or the processes of an Accelerate/torchrun launch);
each worker writes a part file and one merge writes `manifest.json`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.cache_latents.encode import LatentEncoder
from components.common import objects
from components.common.config import CacheConfig
from components.common.errors import T2IError
from components.common.io import check_sha, sha256_json, write_json_atomic
from components.common.progress import progress
from components.common.records import (
    LATENT_MANIFEST,
    LatentManifest,
    PackLineage,
    PackManifest,
    pack_lineage,
    read_pack_manifest,
    shard_file,
    write_record,
)
from components.common.shards import write_shard
from components.common.stat_index import StatIndex

MANIFEST = LATENT_MANIFEST
RECEIPT = ".json"  # suffix of the receipt beside each latent shard


@dataclass
class CacheReport:
    samples: int
    shards_encoded: int
    shards_reused: int
    images_per_s: float = 0.0

    def summary(self) -> str:
        rate = f" at {self.images_per_s:.1f} img/s" if self.shards_encoded else ""
        return (
            f"cached {self.samples} samples: {self.shards_encoded} shards encoded{rate}, "
            f"{self.shards_reused} unchanged"
        )


def run(
    cfg: CacheConfig,
    shards: Path,
    model: Path,
    out: Path,
    worker_index: int | None = None,
    num_workers: int | None = None,
    keep_unlisted: bool = False,
) -> CacheReport:
    """Encode the shards listed in `shards`/manifest.json that this worker owns.

    Alone (the default), every shard is encoded and the manifest written. With
    `worker_index`/`num_workers`, only shard i, i+n, ... and a part file; `merge`
    writes the manifest once all parts exist. `keep_unlisted`: `out` is a store whose
    other latent shards earlier manifests may name (kept for `t2i store gc`). Under
    `accelerate launch`/`torchrun`
    (WORLD_SIZE > 1) each process takes its rank's shards on its own device and
    the main process merges. Raises T2IError for a missing manifest or model, a
    shard whose checksum does not match, or samples that cannot be encoded (named
    by key, after every other shard is committed).
    """
    state = None
    if worker_index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # CPU: gloo
        worker_index, num_workers = state.process_index, state.num_processes
    index, count = worker_index or 0, num_workers or 1
    if not 0 <= index < count:
        raise T2IError(f"--worker-index {index} is not in 0..{count - 1}")
    device = str(state.device) if state is not None else None
    report = encode_part(cfg, Path(shards), Path(model), Path(out), index, count, device)
    if state is not None:
        state.wait_for_everyone()
        if state.is_main_process:
            merge(Path(shards), Path(out), keep_unlisted=keep_unlisted)
        state.wait_for_everyone()
    elif num_workers is None:
        merge(Path(shards), Path(out), count=1, keep_unlisted=keep_unlisted)
    return report


def encode_part(
    cfg: CacheConfig, shards: Path, model: Path, out: Path, index: int, count: int, device=None
) -> CacheReport:
    """Encode this worker's shards (skipping committed ones) and write its part file."""
    packed = read_pack_manifest(shards)
    # Buckets stay within the aspect ratios pack let through.
    max_aspect = float(packed.pack_config.get("max_aspect_ratio", 4.0))
    encoder = LatentEncoder(model, cfg, device, max_aspect)
    cfg = encoder.cfg  # the family defaults settled (`resolve`), as the manifest records them
    jobs = [_job(shard.model_dump(), encoder.model_key) for shard in packed.shards][index::count]
    out.mkdir(parents=True, exist_ok=True)
    hashes = StatIndex.outside(out)  # what was verified: not read again while unchanged
    stored = objects.uploaded(out)  # (read once, not once per shard)
    todo = [j for j in jobs if not _committed(out, j, hashes, stored)]
    total = sum(j["samples"] for j in todo)
    failed: list[str] = []
    started = time.perf_counter()
    with progress(total, f"cache {index + 1}/{count}", "img", disable=not todo) as bar:
        try:
            for job in todo:
                failed += _encode_job(job, encoder, shards, out, bar, hashes)
        finally:
            hashes.save()
    rate = total / max(time.perf_counter() - started, 1e-9)
    if failed:
        raise T2IError(
            f"{len(failed)} samples could not be decoded for encoding (keys: "
            f"{', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}); "
            "their shards were not cached, re-pack the data"
        )
    part = {
        "packed": _packed_fingerprint(packed),
        "model": encoder.model_key,
        "latent_shape": encoder.latent_shape,
        "vae_scaling_factor": encoder.vae.config.scaling_factor,
        "vae_shift_factor": encoder.vae.config.get("shift_factor") or None,
        "cache_config": cfg.model_dump(),
        "buckets": encoder.buckets,
        "entries": [_entry(out, j) for j in jobs],
    }
    write_json_atomic(out / f"part-{index:04d}-of-{count:04d}.json", part)
    return CacheReport(sum(j["samples"] for j in jobs), len(todo), len(jobs) - len(todo), rate)


def merge(
    shards: Path, out: Path, count: int | None = None, keep_unlisted: bool = False
) -> LatentManifest:
    """Write `manifest.json` from the `count` workers' part files (default: as many as
    the newest part names); delete every file the manifest does not list.

    T2IError when a part is missing or was made from other shards or another model.
    """
    packed = pack_lineage(shards)  # the shards, and the lineage the manifest carries on
    if count is None:
        parts = sorted(out.glob("part-*-of-*.json"), key=lambda p: p.stat().st_mtime_ns)
        if not parts:
            raise T2IError(f"{out}: no part files; run `t2i cache` (each worker) first")
        count = int(parts[-1].stem.rsplit("-", 1)[-1])
    loaded = []
    for i in range(count):
        path = out / f"part-{i:04d}-of-{count:04d}.json"
        if not path.is_file():
            raise T2IError(f"{path}: missing; worker {i} of {count} has not finished")
        loaded.append(json.loads(path.read_text()))
    if any(p["packed"] != _packed_fingerprint(packed) for p in loaded):
        raise T2IError(f"{out}: parts were made from other shards; re-run every worker")
    if any(p["model"] != loaded[0]["model"] for p in loaded):
        raise T2IError(f"{out}: parts were made with different models or settings")
    entries = {e["source_name"]: e for p in loaded for e in p["entries"]}
    manifest = LatentManifest(
        shards=[entries[s.name] for s in packed.shards],
        samples=packed.samples,
        cache_config=loaded[0]["cache_config"],
        resolution=loaded[0]["cache_config"]["resolution"],
        latent_shape=loaded[0]["latent_shape"],
        vae_scaling_factor=loaded[0]["vae_scaling_factor"],
        vae_shift_factor=loaded[0].get("vae_shift_factor"),
        model=loaded[0]["model"],
        pack=packed,
        buckets=loaded[0].get("buckets"),
    )
    write_record(manifest, out / MANIFEST)
    if keep_unlisted:
        return manifest
    listed = {MANIFEST} | {e.name for e in manifest.shards}
    listed |= {e.name + RECEIPT for e in manifest.shards}
    for path in out.iterdir():  # only what this stage writes: never a user's file
        ours = path.name.endswith((".tar", ".tar" + RECEIPT, ".tmp")) or path.name.startswith(
            "part-"
        )
        if path.is_file() and ours and path.name not in listed:
            path.unlink()
    return manifest


def resolve(cfg: CacheConfig, model: Path) -> CacheConfig:
    """`cfg` with its family defaults settled (`text_embeddings` null: on for the
    T5 families), as the manifest records it."""
    if cfg.text_embeddings is not None:
        return cfg
    from components.common.families import family_of
    from components.common.models import check_model_dir

    flow = family_of(check_model_dir(Path(model)), "--model").objective == "flow"
    return cfg.model_copy(update={"text_embeddings": flow})


def _job(shard: dict, model_key: dict) -> dict:
    key = sha256_json({"shard": shard["sha256"], **model_key})
    return {**shard, "key": key, "file": f"{Path(shard['name']).stem}.{key[:16]}.tar"}


def _committed(out: Path, job: dict, hashes: StatIndex, stored: dict[str, str]) -> bool:
    """The shard exists, with a receipt for this key whose sha256 still matches (read
    only when the shard's stat changed since it was last hashed)."""
    try:
        receipt = json.loads((out / (job["file"] + RECEIPT)).read_text())
        if receipt["key"] != job["key"]:
            return False
        if not (out / job["file"]).exists():  # uploaded to the object store, if anywhere
            return stored.get(job["file"]) == receipt["sha256"]
        return hashes.sha256(out / job["file"]) == receipt["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def _encode_job(
    job: dict, encoder: LatentEncoder, shards: Path, out: Path, bar, hashes: StatIndex
) -> list[str]:
    shard = shard_file(shards, job["name"])
    check_sha(shard, job["sha256"])  # read anyway, to be encoded
    records, failed = encoder.encode_shard(shard, bar)
    if failed:
        return failed
    if len(records) != job["samples"]:
        raise T2IError(f"{shard}: {len(records)} samples, manifest says {job['samples']}")
    receipt = {"key": job["key"], "sha256": write_shard(out / job["file"], records)}
    hashes.record(out / job["file"], receipt["sha256"])  # train's start reads nothing
    if encoder.buckets:
        index = {tuple(b): i for i, b in enumerate(encoder.buckets)}
        receipt["sample_buckets"] = [index[tuple(json.loads(r["json"])["bucket"])] for r in records]
    write_json_atomic(out / (job["file"] + RECEIPT), receipt)
    return []


def _entry(out: Path, job: dict) -> dict:
    receipt = json.loads((out / (job["file"] + RECEIPT)).read_text())
    return {
        "name": job["file"],
        "source_name": job["name"],
        "source_sha256": job["sha256"],
        "split": job["split"],
        "samples": job["samples"],
        "key": job["key"],
        "sha256": receipt["sha256"],
        "sample_buckets": receipt.get("sample_buckets"),
    }


def _packed_fingerprint(packed: PackManifest | PackLineage) -> str:
    return sha256_json([(s.name, s.sha256) for s in packed.shards])
