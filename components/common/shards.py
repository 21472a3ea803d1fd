"""WebDataset tar shards: deterministic writing and safe reading.

Members are written with fixed metadata (mtime 0, uid 0, mode 0644) so the same
samples always give the same bytes, hence the same sha256 in the manifest.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

from components.common.errors import T2IError
from components.common.io import atomic_path


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> str:
    """Write samples (each: {"__key__": str, ext: bytes, ...}) as a tar, atomically.

    The bytes are those of `tarfile` in USTAR format with the fixed metadata above;
    headers are built directly because `tarfile` spends more time on them than on
    the data (it was the largest serial cost of `t2i pack`). Returns the file's
    sha256, hashed while writing.
    """
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        f = _Hashing(raw, digest)
        written = 0
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                header = _ustar_header(f"{key}.{ext}", len(data))
                f.write(header)
                f.write(data)
                padding = -len(data) % BLOCK
                f.write(b"\0" * padding)
                written += len(header) + len(data) + padding
        end = written + 2 * BLOCK
        f.write(b"\0" * (2 * BLOCK + -end % tarfile.RECORDSIZE))
    return digest.hexdigest()


class _Hashing:
    """A write-only file that hashes what passes through it."""

    def __init__(self, file, digest):
        self.file, self.digest = file, digest

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)


BLOCK = tarfile.BLOCKSIZE


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile` writes for a regular file (mode 0644, uid,
    gid and mtime 0, no user or group names)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    parts = [
        raw.ljust(100, b"\0"),
        b"0000644\0",
        b"0000000\0",
        b"0000000\0",
        b"%011o\0" % size,
        b"00000000000\0",
        b" " * 8,  # the checksum, counted as spaces
        b"0",
        b"\0" * 100,
        b"ustar\x0000",
        b"\0" * 64,
        b"\0" * 16,  # devmajor, devminor: empty for regular files
        b"\0" * 155,
    ]
    header = b"".join(parts).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


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
