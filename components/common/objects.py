"""Shards in an object store (`pipeline.store`: `s3://bucket/prefix`, `gs://...`).

With a store, pack's shards and cache's latent shards live once in it, addressed by
their sha256 (`<store>/sha256/<2 hex>/<sha256>`): immutable, written once, never
overwritten. A stage's KFP output then holds its manifest and `store.json`
(`{"objects": <store>}`) and nothing else; a consumer (cache, train, evaluate, on any
node) downloads the shards it reads into its local object cache (`T2I_OBJECT_CACHE`,
else `$TMPDIR/t2i-objects`: the stage's /scratch volume in a pipeline), checking each
one's sha256 as it arrives, once per node.

The producer keeps its state where it is today (the workspace store, or the output
itself without a workspace): manifests, pack's shard indexes, cache's receipts, and
`objects.json`, {shard name: sha256} of the shards it uploaded and removed locally. A
later run trusts those (the store is content-addressed: an object that exists is the
bytes its name says) and downloads only a shard it must rewrite, so a scheduled run
moves what changed. Each run also leaves its manifests in the store
(`<store>/runs/<run id>/<stage>-manifest.json`), which `t2i store gc --store` keeps.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from components.common.errors import ConfigError, T2IError, first_line
from components.common.io import write_json_atomic

STORE_ENV = "T2I_STORE"  # pipeline.store, on the stages that write shards
CACHE_ENV = "T2I_OBJECT_CACHE"
UPLOADED = "objects.json"  # in a producer's folder: {name: sha256} uploaded, removed here
SCHEMES = ("s3", "gs", "gcs")
_CHUNK = 1 << 20


def check_uri(uri: str) -> str:
    """`uri` when it names an object-store prefix we can write; ValueError otherwise."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in SCHEMES or not uri.split("://", 1)[1].strip("/"):
        raise ValueError(f"must be s3://bucket/prefix or gs://bucket/prefix, got {uri!r}")
    return uri.rstrip("/")


class ObjectStore:
    def __init__(self, uri: str):
        from components.common.remote import open_source

        self.uri = check_uri(uri)
        try:
            src = open_source(self.uri)
        except ConfigError as e:
            raise ConfigError(str(e).replace("data.source", "pipeline.store")) from e
        self.fs, self.root = src.fs, src.path.rstrip("/")

    def key(self, sha: str) -> str:
        return f"{self.root}/sha256/{sha[:2]}/{sha}"

    def has(self, sha: str) -> bool:
        return self._call("look up", sha, lambda: self.fs.exists(self.key(sha)))

    def put(self, path: Path, sha: str) -> bool:
        """Upload `path` as the object `sha` unless it is there; whether it uploaded."""
        if self.has(sha):
            return False
        self._call("upload", sha, lambda: self.fs.put_file(str(path), self.key(sha)))
        return True

    def get(self, sha: str, dest: Path) -> None:
        """Download object `sha` to `dest` (atomically), checking its sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:

                def copy() -> None:
                    with self.fs.open(self.key(sha), "rb") as src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)

                self._call("download", sha, copy)
            if digest.hexdigest() != sha:
                raise T2IError(
                    f"{self.uri}: object {sha[:16]}... holds other bytes (sha256 "
                    f"{digest.hexdigest()[:16]}...); the store is damaged: re-run the stage "
                    "that wrote it after deleting that object"
                )
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_json(self, relative: str, obj) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        self._call("write", relative, lambda: self.fs.pipe_file(f"{self.root}/{relative}", data))

    def objects_detail(self) -> dict[str, tuple[int, float | None]]:
        """{sha256: (size, modified as a Unix time, or None when the store says not)}."""
        found = self._call("list", "sha256/", lambda: self.fs.find(
            f"{self.root}/sha256", detail=True))  # fmt: skip
        return {
            Path(p).name: (int(info.get("size") or 0), _mtime(info)) for p, info in found.items()
        }

    def run_manifests(self) -> list[tuple[str, list[dict]]]:
        """(run id, its stages' manifests as JSON) per run in the store, oldest first
        (by the newest manifest's time)."""
        runs: dict[str, list] = {}
        found = self._call("list", "runs/", lambda: self.fs.find(
            f"{self.root}/runs", detail=True))  # fmt: skip
        for path, info in found.items():
            run = Path(path).parent.name
            doc = json.loads(self._call("read", path, lambda p=path: self.fs.cat_file(p)))
            runs.setdefault(run, []).append((_mtime(info) or 0.0, doc))
        order = sorted(runs, key=lambda r: max(s for s, _ in runs[r]))
        return [(r, [doc for _, doc in runs[r]]) for r in order]

    def delete(self, shas: list[str]) -> None:
        if shas:
            self._call("delete", f"{len(shas)} objects", lambda: self.fs.rm(
                [self.key(s) for s in shas]))  # fmt: skip

    def _call(self, what: str, name: str, fn):
        try:
            return fn()
        except T2IError:
            raise
        except FileNotFoundError as e:
            raise T2IError(
                f"{self.uri}: object {name} is not there (garbage-collected, or another "
                "store?); re-run the stage that wrote it"
            ) from e
        except Exception as e:  # noqa: BLE001 - credentials, network, permissions
            raise T2IError(
                f"pipeline.store {self.uri}: could not {what} {name}: {first_line(e)} "
                "(check the bucket and the storage credentials: pipeline.storage_secret)"
            ) from e


def _mtime(info: dict) -> float | None:
    """An fsspec listing entry's modification time (s3: LastModified, gcs: updated)."""
    import datetime

    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(stamp, datetime.datetime):
        return stamp.timestamp()
    if isinstance(stamp, (int, float)):
        return float(stamp)
    if isinstance(stamp, str):
        try:
            return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "t2i-objects")


def fetch(uri: str, sha: str) -> Path:
    """The local copy of object `sha` of store `uri`, downloaded (and checked) once per
    node; processes on one node (DDP ranks) wait for the one downloading it."""
    path = cache_dir() / sha[:2] / sha
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(sha + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                ObjectStore(uri).get(sha, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def view(uri: str, shards: list[tuple[str, str]]) -> Path:
    """A local folder where each (name, sha256) of `shards` is a link to its downloaded
    object: what a consumer reads as the output's shards."""
    from components.common.stat_index import StatIndex

    digest = hashlib.sha256(json.dumps([uri, sorted(shards)]).encode()).hexdigest()[:24]
    folder = cache_dir() / "views" / digest
    folder.mkdir(parents=True, exist_ok=True)
    hashes = StatIndex.outside(folder)
    try:
        for name, sha in shards:
            link = folder / name
            if not link.exists():
                target = fetch(uri, sha)
                tmp = folder / f".{name}.link"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                os.replace(tmp, link)
                hashes.record(link, sha)  # checked as it arrived: a start reads it once
    finally:
        hashes.save()
    return folder


# -- a producer's record of what it uploaded ------------------------------------------


def uploaded(folder: Path) -> dict[str, str]:
    """{shard name: sha256} that `folder`'s stage uploaded to its store and removed."""
    try:
        doc = json.loads((Path(folder) / UPLOADED).read_text())
        return dict(doc.get("objects", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def store_of(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / UPLOADED).read_text())["store"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_or_fetched(folder: Path, name: str, sha: str | None = None) -> Path:
    """`folder/name`, or, for a shard the folder's stage uploaded, its downloaded copy."""
    path = Path(folder) / name
    if path.exists():
        return path
    known = uploaded(folder).get(name)
    uri = store_of(folder)
    if known is None or uri is None or (sha is not None and sha != known):
        return path  # the caller's own error for a missing file
    return fetch(uri, known)


def upload(folder: Path, uri: str, shards: list[tuple[str, str]]) -> tuple[int, int]:
    """Upload each (name, sha256) of `shards` found in `folder` (unless the store has
    it), record it in `objects.json`, then remove the local file: the shard lives once,
    in the store. A shard uploaded earlier to another store is copied across. (objects
    uploaded, bytes uploaded)."""
    store = ObjectStore(uri)
    before, old_uri = uploaded(folder), store_of(folder)
    record = before if old_uri == store.uri else {}
    count = size = 0
    for name, sha in shards:
        path = Path(folder) / name
        if not path.is_file() and record.get(name) == sha:
            continue
        source = local_or_fetched(folder, name, sha)  # from the old store, if moved
        if not source.is_file():
            raise T2IError(f"{path}: missing; re-run the stage that writes it")
        if store.put(source, sha):
            count, size = count + 1, size + source.stat().st_size
        record[name] = sha
        write_json_atomic(Path(folder) / UPLOADED, {"store": store.uri, "objects": record})
        path.unlink(missing_ok=True)
    listed = {name for name, _ in shards}
    write_json_atomic(
        Path(folder) / UPLOADED,
        {"store": store.uri, "objects": {n: s for n, s in record.items() if n in listed}},
    )
    return count, size


def restore(folder: Path, shards: list[tuple[str, str]]) -> int:
    """Download back into `folder` each shard of `shards` its stage had uploaded (the
    object store was given up: `pipeline.store` unset); how many."""
    import shutil

    count, record, uri = 0, uploaded(folder), store_of(folder)
    for name, sha in shards:
        path = Path(folder) / name
        if not path.exists() and uri is not None and record.get(name) == sha:
            shutil.copyfile(fetch(uri, sha), path)
            count += 1
    (Path(folder) / UPLOADED).unlink(missing_ok=True)
    return count
