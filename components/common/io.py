"""Atomic writes and content hashing.

Every artifact is written under a temporary name in the same folder and then moved
into place with `os.replace`, so a crash never leaves a half-written file or folder
under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.common.errors import T2IError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_sha(path: Path, expected: str, hashes=None) -> None:
    """T2IError naming the shard when it is missing or its bytes changed. `hashes` (a
    `StatIndex`): read only when the file's stat changed since it was hashed; a
    mismatch is forgotten, so the next check reads the file again."""
    if not path.is_file():
        raise T2IError(f"{path}: shard missing; re-run the stage that writes it")
    if (hashes.sha256(path) if hashes is not None else sha256_file(path)) != expected:
        if hashes is not None:
            hashes.forget(path)
        raise T2IError(f"{path}: sha256 does not match the manifest (corrupt or changed shard)")


def sha256_tree(root: Path) -> str:
    """Hex sha256 over every file below `root` (relative path + content), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of the canonical JSON form of `obj` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def make_shareable(path: Path) -> None:
    """Give `path` (and everything below a folder) the permissions a plain `open` or
    `mkdir` would have: mkstemp/mkdtemp make them private (0600/0700), which would
    hide artifacts from the rest of the team on a shared volume."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # `suffix` keeps the final extension for writers that check it (e.g. ".yaml").
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            make_shareable(tmp_path)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any) -> bytes:
    """The JSON form every artifact uses: indented, sorted keys, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(final: Path, obj: Any) -> None:
    write_bytes_atomic(final, json_bytes(obj))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`.

    An existing `final` is moved aside first and deleted only after the new folder
    is in place, so at every instant either the old or the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        make_shareable(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
