"""pack: images + captions (imagefolder layout) -> checksummed WebDataset tar shards.

Every sample is fully decoded; one that cannot be used is skipped and written to
`rejected.jsonl` with its reason, never fatal (unless too many are).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from components.common.config import DataConfig, PackConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import (
    atomic_dir,
    sha256_file,
    sha256_json,
    write_bytes_atomic,
    write_json_atomic,
)
from components.common.shards import write_shard

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass
class Sample:
    key: str
    source: str
    caption: str


@dataclass
class PackReport:
    kept: int
    rejected: dict[str, int]
    shards: int
    bytes: int
    splits: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        why = ", ".join(f"{r}: {n}" for r, n in sorted(self.rejected.items())) or "none"
        return (
            f"packed {self.kept} samples ({self.splits.get('train', 0)} train, "
            f"{self.splits.get('val', 0)} val) into {self.shards} shards, "
            f"{self.bytes / 1e6:.2f} MB; rejected {sum(self.rejected.values())} ({why})"
        )


class Rejected(Exception):
    """A sample that cannot be packed; the message is the reason."""


def run(data: DataConfig, cfg: PackConfig, source: Path, out: Path) -> PackReport:
    """Pack the imagefolder at `source` into shards under `out` (replaced atomically).

    Raises ConfigError for a missing/empty source or a missing column, and T2IError
    when the rejected fraction exceeds `pack.max_reject_fraction`.
    """
    source = Path(source)
    listed = list_imagefolder(source, data)
    packed: dict[str, list[dict[str, bytes]]] = {"train": [], "val": []}
    rejected: list[dict[str, str]] = []
    seen_pixels: dict[str, str] = {}
    for sample in listed:
        try:
            record = pack_sample(sample, source, cfg, seen_pixels)
        except Rejected as why:
            rejected.append({"source": sample.source, "reason": str(why)})
            continue
        packed[split_of(sample.key, cfg.val_fraction)].append(record)

    kept = sum(len(v) for v in packed.values())
    if not kept or len(rejected) / len(listed) > cfg.max_reject_fraction:
        _write_rejected(out, rejected)  # so the user can see why
        raise T2IError(
            f"{source}: rejected {len(rejected)} of {len(listed)} samples "
            f"(limit pack.max_reject_fraction={cfg.max_reject_fraction}); see {out / REJECTED}"
        )

    with atomic_dir(out) as tmp:
        shards = []
        for split, records in packed.items():
            records.sort(key=lambda r: r["__key__"])
            step = cfg.shard_max_samples
            for i in range(0, len(records), step):
                name = f"{split}-{i // step:06d}.tar"
                write_shard(tmp / name, records[i : i + step])
                shards.append(_shard_entry(tmp / name, split, len(records[i : i + step])))
        _write_rejected(tmp, rejected)
        manifest = {
            "shards": shards,
            "samples": {s: len(r) for s, r in packed.items()},
            "rejected": len(rejected),
            "pack_config": cfg.model_dump(),
            "source_fingerprint": sha256_json([(s.key, s.caption) for s in listed]),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return PackReport(
        kept=kept,
        rejected=dict(Counter(r["reason"].split(":")[0] for r in rejected)),
        shards=len(shards),
        bytes=sum(s["bytes"] for s in shards),
        splits=manifest["samples"],
    )


def list_imagefolder(source: Path, data: DataConfig) -> list[Sample]:
    """Rows of every metadata.jsonl / metadata.csv below `source`, paths relative to it."""
    if not source.is_dir():
        raise ConfigError(f"data.source {str(source)!r}: no such folder")
    tables = sorted(source.rglob("metadata.jsonl")) + sorted(source.rglob("metadata.csv"))
    if not tables:
        raise ConfigError(f"data.source {str(source)!r}: no metadata.jsonl or metadata.csv")
    samples = []
    for table in tables:
        for row in _read_rows(table):
            image = row.get(data.image_column, row.get("file_name"))
            if image is None or data.caption_column not in row:
                missing = data.caption_column if image is not None else data.image_column
                raise ConfigError(
                    f"{table}: no column {missing!r} (data.image_column/caption_column); "
                    f"columns are {sorted(row)}"
                )
            rel = (table.parent / str(image)).relative_to(source).as_posix()
            key = hashlib.sha256(rel.encode()).hexdigest()[:16]
            samples.append(Sample(key, rel, row[data.caption_column]))
    if not samples:
        raise ConfigError(f"data.source {str(source)!r}: the metadata lists no samples")
    return samples


def _read_rows(table: Path) -> list[dict]:
    try:
        if table.suffix == ".csv":
            with open(table, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in table.read_text("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ConfigError(f"{table}: unreadable metadata ({e})") from None


def pack_sample(sample: Sample, source: Path, cfg: PackConfig, seen: dict[str, str]) -> dict:
    """Decode, check and re-encode one sample; raise Rejected with the reason."""
    path = source / sample.source
    if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
        raise Rejected("symlink_outside_source")
    if not path.is_file():
        raise Rejected("missing_file")
    caption = " ".join(str(sample.caption or "").split())
    if not caption:
        raise Rejected("empty_caption")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            orig_size, orig_mode = img.size, img.mode
            rgb = to_rgb(img)
    except Image.DecompressionBombError:
        raise Rejected("decompression_bomb") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected(f"undecodable: {e}") from None
    if min(rgb.size) < cfg.min_image_side:
        raise Rejected(f"too_small: {rgb.size[0]}x{rgb.size[1]}")
    pixels_sha = hashlib.sha256(rgb.tobytes()).hexdigest()
    if pixels_sha in seen:
        raise Rejected(f"duplicate: of {seen[pixels_sha]}")
    seen[pixels_sha] = sample.source
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[cfg.image_format]
    rgb.save(buf, fmt, **({} if fmt == "PNG" else {"quality": cfg.quality}))
    meta = {"source": sample.source, "size": list(orig_size), "mode": orig_mode}
    meta["sha256"] = pixels_sha
    return {
        "__key__": sample.key,
        cfg.image_format: buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def split_of(key: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the key: stable when samples are added."""
    h = int(hashlib.sha256(f"split:{key}".encode()).hexdigest()[:8], 16) / 2**32
    return "val" if h < val_fraction else "train"


def read_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise T2IError(f"{path}: missing; run `t2i pack` first") from None


def _shard_entry(path: Path, split: str, samples: int) -> dict:
    return {
        "name": path.name,
        "split": split,
        "samples": samples,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _write_rejected(folder: Path, rejected: list[dict]) -> None:
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected)
    write_bytes_atomic(Path(folder) / REJECTED, body.encode())
