"""WebDataset tar shards: deterministic writing and safe reading.

Members are written with fixed metadata (mtime 0, uid 0, mode 0644) so the same
samples always give the same bytes, hence the same sha256 in the manifest.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from components.common.errors import T2IError
from components.common.io import atomic_path


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    """Write samples (each: {"__key__": str, ext: bytes, ...}) as a tar, atomically."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def read_shard(path: Path) -> Iterator[dict[str, bytes]]:
    """Yield samples grouped by key, in tar order. Refuses links and unsafe names."""
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise T2IError(f"{path}: not a readable tar shard ({e})") from None
    with tar:
        sample: dict[str, bytes] = {}
        for member in tar:
            name = member.name
            if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                raise T2IError(f"{path}: refusing unsafe tar member {name!r}")
            key, _, ext = name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample
