"""The registry: `<registry>/<name>/<version>/`, one folder per version, on a (shared)
file system or, when `publish.registry` is a URI (`s3://bucket/registry`), in an
object store through fsspec.

On a file system, a version folder is assembled under a temporary name and renamed into place; the
rename is the commit. Two publishes at once never fail each other: a rename that
finds its number taken looks again (the other publish may hold the same UNet, whose
version is then reused) and takes the next number. Folders and files get the
permissions the umask allows (the team reads a shared registry), not mkdtemp's 0700.

In an object store there is no rename: the version's files are uploaded first and its
`receipt.json` last, so a version without a receipt is incomplete, never read, and
overwritten by the next publish. Concurrent publishes to one object-store registry are
not arbitrated (a scheduled pipeline runs one at a time: max concurrency 1).

`<registry>/<name>/latest.json` names the version last published: a new one, or an
existing one published again (data that went back to what an earlier version was
trained on publishes that version again, and it becomes the latest). Without the
file (a registry written before it existed), the highest number is the latest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from components.common.errors import ConfigError, T2IError
from components.common.io import json_bytes, make_shareable, write_bytes_atomic
from components.common.records import LINEAGE, RECEIPT, LocalPublication

LATEST = "latest.json"

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
            write_bytes_atomic(root / LATEST, json_bytes({"version": existing}))
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
        write_bytes_atomic(root / LATEST, json_bytes({"version": version}))
        return LocalPublication(version=version, path=str(root / str(version)), new=True)
    raise T2IError(f"{root}: could not claim a version number after {_MAX_RACES} tries")


def is_uri(registry: str) -> bool:
    return "://" in registry


def publish_remote(
    root_uri: str, unet_sha256: str, fill: Callable[[Path, int], None]
) -> LocalPublication:
    """`publish_local` for an object-store registry (`root_uri` = `<registry>/<name>`)."""
    fs, root = _open(root_uri)
    versions = _complete_versions(fs, root)
    for v in reversed(versions):
        receipt = _read_json(fs, f"{root}/{v}/{RECEIPT}")
        if receipt and receipt.get("unet_sha256") == unet_sha256:
            _point_latest(fs, root, root_uri, v)
            return LocalPublication(version=v, path=f"{root_uri}/{v}", new=False)
    version = (versions[-1] + 1) if versions else 1
    with tempfile.TemporaryDirectory() as tmp:
        fill(Path(tmp), version)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        try:
            for path in sorted(files, key=lambda p: p.name == RECEIPT):  # the receipt last
                fs.put_file(str(path), f"{root}/{version}/{path.relative_to(tmp).as_posix()}")
        except Exception as e:
            raise T2IError(f"{root_uri}: upload of version {version} failed: {e}") from e
    _point_latest(fs, root, root_uri, version)
    return LocalPublication(version=version, path=f"{root_uri}/{version}", new=True)


def _point_latest(fs, root: str, root_uri: str, version: int) -> None:
    try:
        with fs.open(f"{root}/{LATEST}", "wb") as f:
            f.write(json_bytes({"version": version}))
    except Exception as e:
        raise T2IError(f"{root_uri}: cannot write {LATEST}: {e}") from e


def latest_version(root_uri: str) -> tuple[int, dict] | None:
    """(version, lineage) of the latest version under `<registry>/<name>` (a folder or a
    URI): the one `latest.json` names, else the highest complete one; None when nothing
    was published there yet."""
    fs, root = _open(root_uri)
    versions = _complete_versions(fs, root)
    pointer = (_read_json(fs, f"{root}/{LATEST}") or {}).get("version")
    if pointer in versions:
        versions = [*[v for v in versions if v != pointer], pointer]
    for v in reversed(versions):
        lineage = _read_json(fs, f"{root}/{v}/{LINEAGE}")
        if lineage is not None:
            return v, lineage
    return None


def _open(root_uri: str):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(root_uri, skip_instance_cache=True)
    except ImportError as e:
        raise ConfigError(f"publish.registry {root_uri}: needs an fsspec backend: {e}") from e
    return fs, root.rstrip("/")


def _complete_versions(fs, root: str) -> list[int]:
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    except Exception as e:
        raise T2IError(f"registry {root}: cannot list it: {e}") from e
    numbers = sorted(
        int(n) for n in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if n.isdigit()
    )
    return [v for v in numbers if fs.exists(f"{root}/{v}/{RECEIPT}")]


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


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
