"""pack: images + captions in any common dataset shape -> checksummed WebDataset shards.

Every sample is fully decoded in worker processes; one that cannot be used is
skipped and written to `rejected.jsonl` with its reason, never fatal (unless too
many are). Packing is incremental: a sample is remembered by its key and a
fingerprint of its bytes and caption, so an unchanged source writes nothing, new
samples go into new shards and a changed or removed sample rewrites only its shard.

Output folder:
- `{split}-{serial:06d}.tar`: the shards; a serial is never reused, so a shard file
  listed by the manifest is never overwritten.
- `{shard}.index.json`: the samples of each shard (key, fingerprint, pixel hash).
- `rejected.jsonl`, then `manifest.json`, which is the commit point: a crash before
  it leaves the previous complete output; files it does not list are deleted after.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from components.common import objects
from components.common.config import DataConfig, PackConfig
from components.common.errors import T2IError
from components.common.io import write_bytes_atomic
from components.common.progress import progress
from components.common.records import PACK_MANIFEST, PackManifest
from components.common.shards import write_shard
from components.common.stat_index import StatIndex
from components.pack_shards.decode import Packed, pack_sample
from components.pack_shards.plan import (
    Plan,
    PreviousPack,
    blob_sha256,
    fingerprint,
    fingerprints,
    plan_pack,
    read_image_bytes,
    whole_file,
)
from components.pack_shards.sources import Sample, list_samples

MANIFEST = PACK_MANIFEST
REJECTED = "rejected.jsonl"
INDEX_SUFFIX = ".index.json"
_SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")


@dataclass
class PackReport:
    kept: int
    rejected: dict[str, int]
    shards: int
    bytes: int
    splits: dict[str, int] = field(default_factory=dict)
    written: int = 0  # shards written this run (the rest were kept as they were)
    decoded: int = 0
    images_per_s: float = 0.0

    def summary(self) -> str:
        why = ", ".join(f"{r}: {n}" for r, n in sorted(self.rejected.items())) or "none"
        return (
            f"packed {self.kept} samples ({self.splits.get('train', 0)} train, "
            f"{self.splits.get('val', 0)} val) into {self.shards} shards, "
            f"{self.bytes / 1e6:.2f} MB ({self.written} written, "
            f"{self.shards - self.written} unchanged; {self.decoded} images decoded"
            f"{f' at {self.images_per_s:.0f}/s' if self.decoded else ''}); "
            f"rejected {sum(self.rejected.values())} ({why})"
        )


def run(
    data: DataConfig,
    cfg: PackConfig,
    source: Path,
    out: Path,
    source_name: str | None = None,
    index: Path | None = None,
    keep_unlisted: bool = False,
) -> PackReport:
    """Pack `source` (any supported format) into shards under `out`, incrementally.
    `source_name` is how the lineage names the source (default: the dataset id or the
    path; a pipeline gives the URI it fetched `source` from). `index`: the source's
    stat index (`components/common/stat_index.py`), so that unchanged files are not
    read again to tell what changed (`data.fingerprint: content` reads them all).
    `keep_unlisted`: `out` is a store that earlier manifests (a pipeline's cached
    outputs, published lineage) may still name: shards the new manifest drops are kept
    for `t2i store gc`, not deleted.

    Raises ConfigError for a missing/empty source or a missing column, and T2IError
    when the rejected fraction exceeds `pack.max_reject_fraction` (the previous
    output is then left as it was; `rejected.jsonl` says why).
    """
    out = Path(out)
    fmt, samples = list_samples(Path(source), data)
    hashes = source_hashes(source, data, index)
    try:
        name = source_name or _source_name(Path(source), data)
        return _pack(data, cfg, Path(source), out, fmt, samples, name, hashes, keep_unlisted)
    finally:  # the workers' spool files, whatever happened
        for spool in out.glob(".spool-*"):
            spool.unlink()
        if hashes is not None:
            hashes.save()


def source_hashes(source: Path, data: DataConfig, index: Path | None) -> StatIndex | None:
    """The source's stat index (None without an index file), trusting stat unless
    `data.fingerprint: content`."""
    if index is None:
        return None
    root = Path(source) if Path(source).is_dir() else Path(source).parent
    return StatIndex(index, root, data.fingerprint == "stat")


def _pack(
    data, cfg, source, out: Path, fmt: str, samples: list[Sample], name: str, hashes, keep
) -> PackReport:
    previous = PreviousPack.load(out, cfg, fmt)
    fps, fresh, rate = scan(samples, previous, cfg, out, hashes)
    return commit(cfg, source, out, fmt, samples, name, data.dataset_name, previous, fps, fresh,
                  rate, keep)  # fmt: skip


def scan(
    samples: list[Sample], previous: PreviousPack, cfg: PackConfig, spool: Path, hashes
) -> tuple[dict[str, str], dict, float]:
    """({key: fingerprint}, {key: record or rejection} of the samples processed, their
    images/s): what `samples` are, against the `previous` output. Workers' spool files
    go into `spool`."""
    # Nothing to compare with: every sample is processed and the workers, which read
    # the bytes anyway, fingerprint them. Otherwise fingerprints decide what to redo.
    fps = {} if previous.empty else fingerprints(samples, hashes)
    todo = samples if previous.empty else previous.todo(samples, fps)
    started = time.perf_counter()
    fresh = {}
    for sample, (fp, result, blob) in zip(todo, process(todo, cfg, spool), strict=True):
        fps[sample.key], fresh[sample.key] = fp, result
        path = whole_file(sample) if hashes is not None else None
        if path is not None and blob not in (None, "unreadable"):
            hashes.record(path, blob)  # read once here: not again on the next run
    return fps, fresh, len(todo) / max(time.perf_counter() - started, 1e-9)


def commit(
    cfg: PackConfig,
    source: Path,
    out: Path,
    fmt: str,
    samples: list[Sample],
    name: str,
    dataset: str | None,
    previous: PreviousPack,
    fps: dict[str, str],
    fresh: dict,
    rate: float,
    keep: bool,
) -> PackReport:
    """Plan the output from every sample's outcome, write the shards it needs and the
    manifest (the commit point). T2IError when too many samples were rejected."""
    plan = plan_pack(samples, fps, previous, fresh, cfg)
    total = len(samples)
    if not plan.kept or len(plan.rejected) / total > cfg.max_reject_fraction:
        _write_if_changed(out / REJECTED, plan.rejected_jsonl())
        raise T2IError(
            f"{source}: rejected {len(plan.rejected)} of {total} samples "
            f"(limit pack.max_reject_fraction={cfg.max_reject_fraction}); see {out / REJECTED}"
        )
    written = write_plan(plan, previous, fresh, out)
    manifest = plan.manifest(fmt, cfg, written, name, dataset)
    _write_if_changed(out / REJECTED, plan.rejected_jsonl())
    _write_if_changed(out / MANIFEST, _json_bytes(manifest.model_dump(mode="json")))
    if not keep:
        remove_unlisted(out, manifest)
    return PackReport(
        kept=sum(manifest.samples.values()),
        rejected=manifest.rejected_by_reason,
        shards=len(manifest.shards),
        bytes=sum(s.bytes for s in manifest.shards),
        splits=manifest.samples,
        written=len(written),
        decoded=len(fresh),
        images_per_s=rate,
    )


def process(
    todo: list[Sample], cfg: PackConfig, out: Path
) -> Iterator[tuple[str, Packed | str, str | None]]:
    """(fingerprint, record or rejection, image sha256) for each of `todo`, in order,
    computed in worker processes, with a progress bar.

    Workers append the encoded bytes to a spool file of their own in `out` and send
    back offsets: piping every ~100 KB record through the pool cost the light case
    (no resize) 10-20% of its throughput on 2 cores."""
    workers = cfg.num_workers or available_cores()
    workers = min(workers, max(1, len(todo) // 8))
    bar = progress(len(todo), "pack", "img", disable=not todo)
    if workers <= 1:
        results = (fingerprint_and_pack(s, cfg) for s in todo)
        pool = None
    else:  # the config travels once per worker, not with every sample
        out.mkdir(parents=True, exist_ok=True)
        pool = multiprocessing.get_context().Pool(workers, _init_worker, (cfg, out))
        chunk = max(1, min(16, len(todo) // workers // 4))
        results = pool.imap(_pack_in_worker, todo, chunksize=chunk)
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def available_cores() -> int:
    """Cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_WORKER: dict = {}


def _init_worker(cfg: PackConfig, out: Path) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["spool"] = Spool(out / f".spool-{os.getpid()}")


def _pack_in_worker(sample: Sample) -> tuple[str, Packed | str, str | None]:
    fp, result, blob = fingerprint_and_pack(sample, _WORKER["cfg"])
    if isinstance(result, Packed):
        result.record = _WORKER["spool"].put(result.record)
    return fp, result, blob


class Spool:
    """An append-only temp file of record bytes; `put` returns references to them."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "ab"), 0

    def put(self, record: dict[str, bytes]) -> dict:
        refs = {"__key__": record["__key__"]}
        for ext, data in record.items():
            if ext != "__key__":
                self.file.write(data)
                refs[ext] = SpoolRef(str(self.path), self.offset, len(data))
                self.offset += len(data)
        self.file.flush()  # the main process reads it after the pool is done
        return refs


@dataclass(frozen=True)
class SpoolRef:
    path: str
    offset: int
    size: int

    def __len__(self) -> int:
        return self.size

    def read(self, files: dict) -> bytes:
        """The bytes, through `files` (path -> open file), so each spool opens once."""
        f = files.get(self.path) or files.setdefault(self.path, open(self.path, "rb"))
        f.seek(self.offset)
        return f.read(self.size)


def _materialise(record: dict, files: dict) -> dict[str, bytes]:
    return {k: v.read(files) if isinstance(v, SpoolRef) else v for k, v in record.items()}


def fingerprint_and_pack(sample: Sample, cfg: PackConfig) -> tuple[str, Packed | str, str | None]:
    """(fingerprint, record or rejection, the image bytes' sha256), from one read."""
    data = read_image_bytes(sample)  # read once, for all three
    blob = blob_sha256(data)
    return fingerprint(sample, data, blob), pack_sample(sample, cfg, data), blob


def write_plan(plan: Plan, previous: PreviousPack, fresh: dict, out: Path) -> dict[str, dict]:
    """Write every new or rewritten shard (and its index) under a fresh serial name.

    Returns {name: manifest entry} of the shards written. Records of samples kept
    from an old shard are copied from it, never decoded again.
    """
    written, spools = {}, {}
    hashes = StatIndex.outside(out)  # the next run's check of these shards reads nothing
    serial = max(previous.next_serial, _max_serial(out) + 1)
    for shard in plan.to_write:
        name = f"{shard.split}-{serial:06d}.tar"
        serial += 1
        records = []
        copied = previous.records(shard.copy_from) if shard.copy_from else {}
        for member in shard.members:
            new = fresh.get(member["key"])
            records.append(
                _materialise(new.record, spools)
                if isinstance(new, Packed)
                else copied[member["key"]]
            )
        sha256 = write_shard(out / name, records)
        hashes.record(out / name, sha256)
        write_bytes_atomic(out / (name + INDEX_SUFFIX), _json_bytes(shard.members))
        written[name] = {
            "name": name,
            "split": shard.split,
            "samples": len(records),
            "bytes": (out / name).stat().st_size,
            "sha256": sha256,
        }
    for f in spools.values():
        f.close()
    hashes.save()
    if written:
        plan.next_serial = serial
    return written


def remove_unlisted(out: Path, manifest: PackManifest) -> None:
    """Delete shards, indexes and temporaries the committed manifest does not list."""
    keep = {MANIFEST, REJECTED}
    for shard in manifest.shards:
        keep |= {shard.name, shard.name + INDEX_SUFFIX}
    for path in out.iterdir():
        if path.is_file() and path.name not in keep:
            if _SHARD_NAME.match(path.name.removesuffix(INDEX_SUFFIX)) or path.name.startswith("."):
                path.unlink()


def _source_name(source: Path, data: DataConfig) -> str:
    """The source as the lineage names it: the dataset id, or the path as given."""
    return data.dataset_name or str(source)


def _max_serial(out: Path) -> int:
    names = [p.name for p in out.glob("*.tar")] + list(objects.uploaded(out))
    found = [int(m.group(2)) for n in names if (m := _SHARD_NAME.match(n))]
    return max(found, default=-1)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write, skipped when the file already holds exactly `data`."""
    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes_atomic(path, data)
