"""The local (shared) registry: `<registry>/<name>/<version>/`, one folder per version.

A version folder is assembled under a temporary name and renamed into place; the
rename is the commit. Two publishes at once never fail each other: a rename that
finds its number taken looks again (the other publish may hold the same UNet, whose
version is then reused) and takes the next number. Folders and files get the
permissions the umask allows (the team reads a shared registry), not mkdtemp's 0700.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from components.common.errors import T2IError
from components.common.io import make_shareable
from components.common.records import RECEIPT, LocalPublication

_MAX_RACES = 100  # numbers taken by concurrent publishes before giving up


def publish_local(
    root: Path,
    unet_sha256: str,
    fill: Callable[[Path, int], None],
) -> LocalPublication:
    """Publish into `root` (= `<registry>/<name>`): the version already holding
    `unet_sha256`, or a new one whose folder `fill(folder, version)` writes (it must
    write `receipt.json` with `unet_sha256`, which is how versions are recognised)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(_MAX_RACES):
        versions = _versions(root)
        existing = _version_holding(root, versions, unet_sha256)
        if existing is not None:
            return LocalPublication(version=existing, path=str(root / str(existing)), new=False)
        version = (versions[-1] + 1) if versions else 1
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root))
        try:
            fill(tmp, version)
            make_shareable(tmp)
            try:
                tmp.rename(root / str(version))  # atomic; fails if the number was taken
            except OSError:
                continue  # a concurrent publish took it: look again
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return LocalPublication(version=version, path=str(root / str(version)), new=True)
    raise T2IError(f"{root}: could not claim a version number after {_MAX_RACES} tries")


def _versions(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _version_holding(root: Path, versions: list[int], unet_sha256: str) -> int | None:
    for v in reversed(versions):
        receipt = root / str(v) / RECEIPT
        try:
            if json.loads(receipt.read_text()).get("unet_sha256") == unet_sha256:
                return v
        except (OSError, ValueError):  # not published by us (copied by hand?): never reused
            continue
    return None
