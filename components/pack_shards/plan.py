"""Incremental packing: what the previous output already holds, and what to write.

A sample is identified by its key (where it lives) and its fingerprint (its bytes
and caption). A previous output is trusted only if its manifest was written with the
same pack config and source format and each shard still matches its sha256; a
shard that does not is rebuilt from its source samples.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from components.common import objects
from components.common.config import PackConfig
from components.common.errors import T2IError
from components.common.io import sha256_json
from components.common.records import PACK_MANIFEST, PackManifest, read_pack_manifest
from components.common.shards import read_shard
from components.common.stat_index import StatIndex
from components.pack_shards.decode import Packed
from components.pack_shards.sources import Sample

# Not part of the output's identity: changing them must not rebuild anything.
_RUNTIME_KEYS = {"num_workers", "max_reject_fraction"}


# How records are laid out, beyond the config: an output of another layout is rebuilt.
_LAYOUT = {"captions": "one per line"}


def identity(cfg: PackConfig) -> dict:
    return {**{k: v for k, v in cfg.model_dump().items() if k not in _RUNTIME_KEYS}, **_LAYOUT}


def split_of(key: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the key: stable when samples are added."""
    h = int(hashlib.sha256(f"split:{key}".encode()).hexdigest()[:8], 16) / 2**32
    return "val" if h < val_fraction else "train"


def read_image_bytes(sample: Sample) -> bytes | OSError | None:
    """The sample's image bytes; the error when they cannot be read; None if no image."""
    try:
        return sample.blob.read() if sample.blob else None
    except OSError as e:
        return e


def blob_sha256(data: bytes | OSError | None) -> str | None:
    """The image bytes' sha256 ("unreadable" for a read error, None for no image)."""
    if isinstance(data, OSError):
        return "unreadable"
    return hashlib.sha256(data).hexdigest() if data is not None else None


def fingerprint(sample: Sample, data: bytes | OSError | None, blob: str | None = "") -> str:
    """Hash of the image bytes (or their sha256 `blob`, when known), the raw caption and
    any listing problem."""
    if blob == "":
        blob = blob_sha256(data)
    caption = sample.caption
    if isinstance(caption, bytes):
        caption = "b:" + caption.hex()
    elif caption is not None:
        caption = "s:" + str(caption)
    return sha256_json([blob, caption, sample.problem])[:32]


def whole_file(sample: Sample) -> Path | None:
    """The file a sample's image is, when it is a whole file (not a tar member, a row)."""
    blob = sample.blob
    if blob is None or blob.data is not None or blob.path is None:
        return None
    return Path(blob.path) if blob.offset == 0 and blob.size < 0 else None


def fingerprints(samples: list[Sample], hashes=None) -> dict[str, str]:
    """{key: fingerprint} of every sample (files are read in threads). With `hashes` (a
    `StatIndex`), a whole-file image whose stat is unchanged is not read at all."""

    def one(sample: Sample) -> tuple[str, str]:
        path = whole_file(sample) if hashes is not None else None
        if path is not None:
            try:
                return sample.key, fingerprint(sample, None, hashes.sha256(path))
            except OSError as e:
                return sample.key, fingerprint(sample, e)
        return sample.key, fingerprint(sample, read_image_bytes(sample))

    found, rest = {}, []
    for sample in samples:  # a stat each, here: a thread per lookup costs more than it
        path = whole_file(sample) if hashes is not None else None
        try:
            blob = hashes.known(path) if path is not None else None
        except OSError:
            blob = None
        if blob is not None:
            found[sample.key] = fingerprint(sample, None, blob)
        else:
            rest.append(sample)
    with ThreadPoolExecutor(8) as pool:  # hashlib and file reads release the GIL
        found.update(pool.map(one, rest))
    return {s.key: found[s.key] for s in samples}


@dataclass
class PreviousPack:
    """The committed output found in the folder (empty when there is none to trust)."""

    out: Path
    shards: dict[str, dict] = field(default_factory=dict)  # name -> manifest entry
    members: dict[str, tuple[str, dict]] = field(default_factory=dict)  # key -> (shard, member)
    shard_members: dict[str, list[dict]] = field(default_factory=dict)  # name -> members
    rejected: dict[str, dict] = field(default_factory=dict)  # key -> rejected.jsonl entry
    next_serial: int = 0

    @property
    def empty(self) -> bool:
        return not self.members and not self.rejected

    @classmethod
    def load(cls, out: Path, cfg: PackConfig, fmt: str) -> PreviousPack:
        prev = cls(Path(out))
        if not (prev.out / PACK_MANIFEST).is_file():
            return prev
        try:
            manifest = read_pack_manifest(prev.out)
        except T2IError:  # unreadable or of an older schema: repack (under new serials)
            return prev
        prev.next_serial = manifest.next_serial
        if manifest.pack_config != identity(cfg) or manifest.format != fmt:
            return prev  # a different recipe: rebuild everything (under new serials)
        # A shard is read to be verified only when its stat changed since it was hashed.
        hashes = StatIndex.outside(prev.out)
        try:
            prev._trust(manifest, hashes)
        finally:
            hashes.save()
        prev.rejected = _read_rejected(prev.out / "rejected.jsonl")
        return prev

    def _trust(self, manifest: PackManifest, hashes: StatIndex) -> None:
        """Take in each listed shard that still matches its sha256, with its members."""
        stored = objects.uploaded(self.out)  # in the object store, not here
        for entry in manifest.shards:
            index = self.out / (entry.name + ".index.json")
            path = self.out / entry.name
            try:
                if not path.exists() and stored.get(entry.name) == entry.sha256:
                    pass  # content-addressed: the object is these bytes
                elif hashes.sha256(path) != entry.sha256:
                    hashes.forget(path)
                    continue  # corrupt or changed shard: its samples are packed again
                members = json.loads(index.read_text())
            except (OSError, ValueError):
                continue
            self.shards[entry.name] = entry.model_dump()
            self.shard_members[entry.name] = members
            for member in members:
                self.members[member["key"]] = (entry.name, member)

    def todo(self, samples: list[Sample], fps: dict[str, str]) -> list[Sample]:
        """Samples whose outcome is not known from the previous output."""
        todo = []
        for s in samples:
            kept = self.members.get(s.key)
            if kept and kept[1]["fp"] == fps[s.key]:
                continue
            rej = self.rejected.get(s.key)
            # Duplicates depend on the other samples, so they are always re-checked.
            if rej and rej.get("fp") == fps[s.key] and not rej["reason"].startswith("duplicate"):
                continue
            todo.append(s)
        return todo

    def records(self, shard: str) -> dict[str, dict[str, bytes]]:
        path = objects.local_or_fetched(self.out, shard, self.shards[shard]["sha256"])
        return {r["__key__"]: r for r in read_shard(path)}


@dataclass
class ShardPlan:
    split: str
    members: list[dict]  # {"key", "fp", "source", "pixels_sha256", "bytes"}
    copy_from: str | None = None  # the old shard whose unchanged records are copied


@dataclass
class Plan:
    kept: dict[str, dict]  # key -> member
    rejected: list[dict]  # rejected.jsonl entries, in listing order
    unchanged: list[dict]  # manifest entries of shards kept as they are
    to_write: list[ShardPlan]
    source_fingerprint: str
    next_serial: int

    def rejected_jsonl(self) -> bytes:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rejected).encode()

    def manifest(
        self, fmt: str, cfg: PackConfig, written: dict[str, dict], source: str, dataset: str | None
    ) -> PackManifest:
        shards = sorted([*self.unchanged, *written.values()], key=lambda s: s["name"])
        samples = {"train": 0, "val": 0}
        for s in shards:
            samples[s["split"]] += s["samples"]
        reasons: dict[str, int] = {}
        for r in self.rejected:
            kind = r["reason"].split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        return PackManifest(
            format=fmt,
            source=source,
            dataset_name=dataset,
            shards=shards,
            samples=samples,
            rejected=len(self.rejected),
            rejected_by_reason=reasons,
            pack_config=identity(cfg),
            source_fingerprint=self.source_fingerprint,
            next_serial=self.next_serial,
        )


def plan_pack(
    samples: list[Sample],
    fps: dict[str, str],
    previous: PreviousPack,
    fresh: dict[str, Packed | str],
    cfg: PackConfig,
) -> Plan:
    """Decide every sample's outcome and which shards to keep, rewrite or add.

    Exact duplicates (same decoded pixels) keep the first sample: one already packed
    wins over a new one, then listing order.
    """
    kept: dict[str, dict] = {}
    rejected: dict[str, dict] = {}
    seen: dict[str, str] = {}
    by_key = {s.key: s for s in samples}

    def keep(s: Sample, pixels: str, size: int) -> None:
        if pixels in seen:
            rejected[s.key] = _rejection(s, fps, f"duplicate: of {seen[pixels]}")
            return
        seen[pixels] = s.source
        kept[s.key] = {
            "key": s.key,
            "fp": fps[s.key],
            "source": s.source,
            "pixels_sha256": pixels,
            "bytes": size,
        }

    for s in samples:  # already packed and unchanged first
        old = previous.members.get(s.key)
        if s.key not in fresh and old and old[1]["fp"] == fps[s.key]:
            keep(s, old[1]["pixels_sha256"], old[1].get("bytes", 0))
    for s in samples:
        result = fresh.get(s.key)
        if isinstance(result, Packed):
            keep(s, result.pixels_sha256, tar_bytes(result.record))
        elif isinstance(result, str):
            rejected[s.key] = _rejection(s, fps, result)
        elif s.key not in kept and s.key not in rejected:  # known from the previous output
            rejected[s.key] = {**previous.rejected[s.key], "source": s.source}

    unchanged, to_write, placed = [], [], set()
    for name, entry in previous.shards.items():
        members = previous.shard_members[name]
        survivors = [kept[m["key"]] for m in members if m["key"] in kept]
        placed |= {m["key"] for m in survivors}
        if len(survivors) == len(members) and all(m["key"] not in fresh for m in members):
            unchanged.append(entry)
        elif survivors:
            to_write.append(ShardPlan(entry["split"], survivors, copy_from=name))
    for split in ("train", "val"):
        new = [m for k, m in sorted(kept.items()) if k not in placed]
        new = [m for m in new if split_of(m["key"], cfg.val_fraction) == split]
        to_write += [ShardPlan(split, chunk) for chunk in _chunks(new, cfg)]
    order = [s.key for s in samples]
    return Plan(
        kept=kept,
        rejected=[rejected[k] for k in order if k in rejected and k in by_key],
        unchanged=unchanged,
        to_write=to_write,
        source_fingerprint=sha256_json(sorted(fps.items())),
        next_serial=previous.next_serial,
    )


def tar_bytes(record: dict[str, bytes]) -> int:
    """Bytes the record takes in a tar: a 512-byte header per member, data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in record.items() if k != "__key__")


def _tar_size(payload: int) -> int:
    """A tar of `payload` member bytes: two end blocks, padded to 10 KiB records."""
    return -(-(payload + 1024) // 10240) * 10240


def _chunks(members: list[dict], cfg: PackConfig) -> list[list[dict]]:
    """Consecutive runs bounded by `shard_max_samples` and `shard_max_bytes` (the tar's
    real size; only a shard of one sample can exceed it)."""
    chunks, current, size = [], [], 0
    for m in members:
        too_big = _tar_size(size + m["bytes"]) > cfg.shard_max_bytes
        if current and (len(current) >= cfg.shard_max_samples or too_big):
            chunks.append(current)
            current, size = [], 0
        current.append(m)
        size += m["bytes"]
    return chunks + ([current] if current else [])


def _rejection(s: Sample, fps: dict[str, str], reason: str) -> dict:
    return {"key": s.key, "fp": fps[s.key], "source": s.source, "reason": reason}


def _read_rejected(path: Path) -> dict[str, dict]:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return {}
    return {r["key"]: r for r in rows if "key" in r and "fp" in r}
