"""Pack fan-out: K workers, each over a fixed part of the source listing, then a merge.

A sample's part is a hash of its key (`part_of`), so it never moves as the data grows
and every worker's share stays the same from run to run. A worker reads the previous
output (read-only) and writes nothing but its part folder,
`<out>/.parts/part-I-of-K/`: `part.json` (the fingerprints of its samples, and the
record or rejection of each one it processed) and the record bytes those reference.
The merge lists the source, checks that the parts cover exactly its samples and were
made against the output as it is now, then plans and commits as one pack does: the
same shards, split and manifest as one pack of the same source.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.common.config import DataConfig, PackConfig
from components.common.errors import T2IError
from components.common.io import write_json_atomic
from components.pack_shards import (
    MANIFEST,
    PackReport,
    SpoolRef,
    _source_name,
    commit,
    scan,
    source_hashes,
)
from components.pack_shards.decode import Packed
from components.pack_shards.plan import PreviousPack, identity
from components.pack_shards.sources import list_samples

PARTS = ".parts"
PART = "part.json"
RECORDS = "records.bin"  # the bytes of records processed in the worker's own process


@dataclass
class WorkerReport:
    index: int
    count: int
    samples: int  # this worker's share of the listing
    decoded: int
    images_per_s: float

    def summary(self) -> str:
        return (
            f"pack worker {self.index + 1}/{self.count}: {self.samples} samples, "
            f"{self.decoded} decoded at {self.images_per_s:.0f}/s"
        )


def part_of(key: str, count: int) -> int:
    """The worker (of `count`) a sample belongs to, from its key alone."""
    return int(hashlib.sha256(f"part:{key}".encode()).hexdigest()[:8], 16) % count


def part_dir(out: Path, index: int, count: int) -> Path:
    return Path(out) / PARTS / f"part-{index:04d}-of-{count:04d}"


def run_worker(
    data: DataConfig,
    cfg: PackConfig,
    source: Path,
    out: Path,
    index: int,
    count: int,
    stat_index: Path | None = None,
) -> WorkerReport:
    """Process worker `index` of `count`'s part of `source` against the output in `out`."""
    if not 0 <= index < count:
        raise T2IError(f"--worker-index {index}: must be in 0..{count - 1} (--num-workers)")
    out = Path(out)
    fmt, samples = list_samples(Path(source), data)
    mine = [s for s in samples if part_of(s.key, count) == index]
    hashes = source_hashes(source, data, stat_index)
    previous = PreviousPack.load(out, cfg, fmt)
    folder = part_dir(out, index, count)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's part
    folder.mkdir(parents=True)
    try:
        fps, fresh, rate = scan(mine, previous, cfg, folder, hashes)
        with open(folder / RECORDS, "wb") as f:
            entries = {key: _dump(result, f) for key, result in fresh.items()}
    finally:
        if hashes is not None:
            hashes.save()
    part = {
        "index": index,
        "count": count,
        "format": fmt,
        "pack_config": identity(cfg),
        "previous": _manifest_id(out),
        "fps": fps,
        "fresh": entries,
        "images_per_s": rate,
    }
    write_json_atomic(folder / PART, part)  # the part's commit point
    return WorkerReport(index, count, len(mine), len(fresh), rate)


def merge(
    data: DataConfig,
    cfg: PackConfig,
    source: Path,
    out: Path,
    count: int | None = None,
    source_name: str | None = None,
    keep_unlisted: bool = False,
) -> PackReport:
    """Commit the workers' parts in `out` as one pack of `source`; the parts are then
    removed. T2IError when a part is missing, or was made against another output,
    config or listing (then nothing is written)."""
    out = Path(out)
    fmt, samples = list_samples(Path(source), data)
    parts = _load_parts(out, count, fmt, cfg)
    fps, fresh = {}, {}
    for folder, part in parts:
        fps.update(part["fps"])
        fresh.update({k: _load(v, folder) for k, v in part["fresh"].items()})
    listed = {s.key for s in samples}
    if listed != set(fps):
        changed = len(listed ^ set(fps))
        raise T2IError(
            f"{source}: {changed} samples differ from what the pack workers listed (the "
            "source changed meanwhile); run every worker again, then --merge"
        )
    previous = PreviousPack.load(out, cfg, fmt)
    rate = sum(part["images_per_s"] for _, part in parts)
    name = source_name or _source_name(Path(source), data)
    report = commit(cfg, Path(source), out, fmt, samples, name, data.dataset_name, previous,
                    fps, fresh, rate, keep_unlisted)  # fmt: skip
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return report


def _load_parts(out: Path, count: int | None, fmt: str, cfg: PackConfig) -> list:
    if count is None:
        found = sorted((out / PARTS).glob("part-*-of-*"))
        if not found:
            raise T2IError(f"{out}: no pack parts; run `t2i pack --worker-index I` first")
        count = int(found[-1].name.rsplit("-", 1)[-1])
    parts, now = [], _manifest_id(out)
    for i in range(count):
        folder = part_dir(out, i, count)
        try:
            part = json.loads((folder / PART).read_text())
        except (OSError, ValueError):
            raise T2IError(
                f"{folder / PART}: missing; pack worker {i} of {count} has not finished"
            ) from None
        if part["format"] != fmt or part["pack_config"] != identity(cfg):
            raise T2IError(f"{folder}: made with another pack config or source format; re-run it")
        if part["previous"] != now:
            raise T2IError(
                f"{folder}: made against another pack output than {out}'s (a pack or merge "
                "ran meanwhile); run every worker again"
            )
        parts.append((folder, part))
    return parts


def _manifest_id(out: Path) -> str:
    """Which committed output the workers saw ("" for none)."""
    path = Path(out) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _dump(result, records) -> dict:
    """A processed sample as JSON: its rejection, or its record's bytes by reference (a
    pool worker's spool in the part folder, or `records`, the open RECORDS file)."""
    if isinstance(result, str):
        return {"rejected": result}
    refs = {}
    for ext, value in result.record.items():
        if ext == "__key__":
            refs[ext] = value
        elif isinstance(value, SpoolRef):
            refs[ext] = [Path(value.path).name, value.offset, value.size]
        else:
            refs[ext] = [RECORDS, records.tell(), len(value)]
            records.write(value)
    return {"key": result.key, "pixels_sha256": result.pixels_sha256, "record": refs}


def _load(entry: dict, folder: Path):
    if "rejected" in entry:
        return entry["rejected"]
    record = {
        ext: ref if ext == "__key__" else SpoolRef(str(folder / ref[0]), ref[1], ref[2])
        for ext, ref in entry["record"].items()
    }
    return Packed(entry["key"], record, entry["pixels_sha256"])
