"""Data sources by URI: fingerprint them where they are, fetch them incrementally.

`data.source` is one of:
- a path (a folder, or a `.tar` / `.parquet` file), e.g. on a mounted volume;
- `s3://bucket/prefix`, `gs://bucket/prefix`: object storage through fsspec (the
  `s3` / `gcs` extras install s3fs / gcsfs); credentials come from the environment
  (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...);
- `hf://datasets/org/name[@revision]/path`: files of a Hugging Face dataset repo;
- `dvc://path/in/repo?repo=URL&rev=REV`: a DVC-tracked path of a git repo at a
  revision (a tag, branch or commit; `repo` defaults to the current project), read
  through `dvc.api`'s DVCFileSystem from the repo's DVC remote.

The fingerprint follows the content without downloading it: object stores list keys,
sizes and ETags (gcs: md5, hf: blob ids); DVC gives the tracked directory's md5 at
the revision; a local folder is hashed. Fetching copies only the files whose entry
in that listing changed since the last fetch into the same folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from components.common.errors import ConfigError, T2IError, first_line
from components.common.io import sha256_json, write_json_atomic

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hf", "dvc")
_EXTRAS = {"s3": "s3fs (pip install 't2i-pipeline[s3]')", "gs": "gcsfs ('t2i-pipeline[gcs]')"}
_LISTING = ".fetched.json"  # beside the copy: what the last fetch copied {path: token}
# Per-file content tokens, most specific first (s3: ETag, gcs: md5Hash, hf: blob_id).
_TOKENS = ("ETag", "etag", "md5Hash", "md5", "blob_id", "sha256")


def is_remote(source: str) -> bool:
    return source.split("://", 1)[0] in REMOTE_SCHEMES if "://" in source else False


@dataclass(frozen=True)
class Source:
    """A parsed `data.source`: the filesystem, the path in it, and how it is named."""

    uri: str
    fs: Any
    path: str

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"


def open_source(uri: str) -> Source:
    """Parse `uri` and open its filesystem. ConfigError names a missing extra or a
    malformed DVC URI."""
    if not is_remote(uri):
        return Source(uri, None, uri)
    scheme = uri.split("://", 1)[0]
    if scheme == "dvc":
        return _dvc_source(uri)
    try:
        import fsspec

        # A fresh instance: fsspec's cached ones keep old listings and endpoints.
        fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    except ImportError as e:
        need = _EXTRAS.get(scheme, str(e))
        raise ConfigError(f"data.source {uri}: reading {scheme}:// needs {need}") from e
    return Source(uri, fs, path)


def _dvc_source(uri: str) -> Source:
    rest = uri[len("dvc://") :]
    path, _, query = rest.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - {"repo", "rev"})
    if not path or unknown:
        extra = f"; unknown option {unknown[0]}=" if unknown else ""
        raise ConfigError(
            f"data.source {uri}: expected dvc://PATH?repo=URL&rev=REV "
            f"(PATH inside the repo; repo and rev optional){extra}"
        )
    from dvc.fs import DVCFileSystem

    try:
        fs = DVCFileSystem(repo=options.get("repo") or None, rev=options.get("rev") or None)
    except Exception as e:  # scmrepo/dvc raise many kinds for a bad repo or revision
        raise ConfigError(f"data.source {uri}: cannot open the repo at that revision: {e}") from e
    return Source(uri, fs, path.strip("/"))


def fingerprint(uri: str, index: Path | None = None, trust_stat: bool = True) -> str:
    """The content fingerprint of `uri` (sha256 hex), computed where the data lives.

    A local folder or file is hashed file by file through a stat index (`index`, kept
    beside the caller's state: a file whose size, mtime and inode are the recorded
    ones keeps its recorded sha256; `trust_stat=False` reads every file). The same
    digest as `sha256_tree` / `sha256_file`. ConfigError when nothing is there;
    T2IError when the store cannot be read."""
    src = open_source(uri)
    if src.fs is None:
        path = Path(uri)
        if not path.exists():
            raise ConfigError(f"data.source {uri}: no such folder or file")
        from components.common.stat_index import StatIndex

        hashes = StatIndex(index, path if path.is_dir() else path.parent, trust_stat)
        try:
            if path.is_file():
                return hashes.sha256(path)
            return tree_digest(path, hashes.sha256)
        finally:
            hashes.save()
    info = _info(src, src.path)
    if src.scheme == "dvc":
        md5 = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
        if md5:  # a tracked directory (or file): its md5 at the revision, nothing read
            return sha256_json({"dvc_md5": md5})
    return sha256_json(sorted(listing(src, info).items()))


def tree_digest(root: Path, sha256_of) -> str:
    """`sha256_tree`'s digest, each file's sha256 from `sha256_of(path)`."""
    import hashlib

    h = hashlib.sha256()
    # Sorted as paths compare (by their parts), without Path comparisons (slow at 1M).
    for path in sorted((p for p in Path(root).rglob("*") if p.is_file()), key=lambda p: p.parts):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_of(path).encode())
    return h.hexdigest()


def listing(src: Source, info: dict[str, Any] | None = None) -> dict[str, str]:
    """{path relative to the source: content token} of every file under the source
    (`info`: the source's own entry, when the caller has read it already)."""
    info = info if info is not None else _info(src, src.path)
    if info.get("type") != "directory":
        return {Path(src.path).name: _token(src, info)}
    try:
        if src.scheme == "dvc":  # its find() ignores detail
            found = {p: _info(src, p) for p in src.fs.find(src.path)}
        else:
            found = src.fs.find(src.path, detail=True)
    except Exception as e:
        raise T2IError(f"data.source {src.uri}: cannot list it: {_first_line(e)}") from e
    root = src.path.rstrip("/") + "/"
    return {
        p[len(root) :] if p.startswith(root) else p: _token(src, i)
        for p, i in found.items()
        if i.get("type", "file") != "directory"
    }


def fetch(uri: str, dest: Path) -> Path:
    """A local path holding `uri`'s files: `uri` itself when it is a path, else `dest`,
    brought up to date by copying only the files whose token changed (and deleting the
    ones gone) since the last fetch into `dest`. Returns the folder (or, for a single
    file source, the file) to pack."""
    src = open_source(uri)
    if src.fs is None:
        return Path(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    info = _info(src, src.path)
    wanted = listing(src, info)
    had = _previous_listing(_listing_file(dest))
    single = info.get("type") != "directory"
    for rel, token in wanted.items():
        target = dest / rel
        if had.get(rel) == token and target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        remote = src.path if single else f"{src.path.rstrip('/')}/{rel}"
        tmp = target.with_name(f".{target.name}.part")
        try:
            src.fs.get_file(remote, str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise T2IError(f"data.source {uri}: cannot download {rel}: {_first_line(e)}") from e
        os.replace(tmp, target)
    for rel in set(had) - set(wanted):
        (dest / rel).unlink(missing_ok=True)
    write_json_atomic(_listing_file(dest), wanted)
    return dest / next(iter(wanted)) if single else dest


def staging_key(uri: str) -> str:
    """A folder name for `uri`'s fetched copy (stable across runs)."""
    return sha256_json({"source": uri})[:16]


def _info(src: Source, path: str) -> dict[str, Any]:
    try:
        return src.fs.info(path)
    except FileNotFoundError as e:
        raise ConfigError(f"data.source {src.uri}: nothing there ({path})") from e
    except Exception as e:
        if type(e).__name__ == "RevError":  # DVC opens the revision lazily, here
            raise ConfigError(
                f"data.source {src.uri}: cannot open the repo at that revision: {e}"
            ) from e
        raise T2IError(f"data.source {src.uri}: cannot read it: {_first_line(e)}") from e


def _token(src: Source, info: dict[str, Any]) -> str:
    for key in _TOKENS:
        value = info.get(key) or (info.get("dvc_info") or {}).get(key)
        if value:
            return f"{key}:{str(value).strip(chr(34))}:{info.get('size')}"
    lfs = info.get("lfs") or {}
    if lfs.get("sha256"):
        return f"sha256:{lfs['sha256']}"
    # No content token (a plain HTTP store?): size and mtime are the best there is.
    return f"size:{info.get('size')}:{info.get('mtime') or info.get('LastModified')}"


def _listing_file(dest: Path) -> Path:
    return dest.with_name(dest.name + _LISTING)


def _previous_listing(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__
