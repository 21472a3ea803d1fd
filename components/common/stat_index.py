"""Content hashes that cost what changed: a file's sha256 is re-read only when its stat
(size, mtime_ns, inode) is not the one recorded with the hash.

An index is one JSON file, {relative path: [size, mtime_ns, inode, sha256]}. The index
of a stage's output folder (shards, latent shards, model weights) is kept outside it,
in the hash cache (`outside`: `T2I_HASH_CACHE`, which a pipeline sets on the
workspace, else `~/.cache/t2i-pipeline/sha256`), so that verifying an output never
changes it (DVC would see a changed output); a data source's index lives wherever its
caller says (the workspace, `artifacts/index/`). What it trusts: a file rewritten in
place with the same size and the same mtime (to the nanosecond) and inode keeps its old
hash. Pass `trust_stat=False` (`data.fingerprint: content`) to read every file.
Writing the index is best effort: a read-only folder just means hashing again.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from components.common.io import sha256_file, write_bytes_atomic


class StatIndex:
    def __init__(self, index: Path | None, root: Path, trust_stat: bool = True):
        self.index, self.root, self.trust = index, Path(root), trust_stat
        self._root_text = str(self.root).rstrip("/") + "/"
        self.entries: dict[str, list] = {}
        self.reads = 0  # files hashed (read) by this index
        self.dirty = False
        self.mine: dict[str, list | None] = {}  # what this instance learnt (None: forgot)
        self._lock = threading.Lock()  # (pack hashes from threads)
        if index is not None and Path(index).is_file():
            try:
                loaded = json.loads(Path(index).read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    @classmethod
    def outside(cls, folder: Path) -> StatIndex:
        """The index of the files in `folder`, kept in the hash cache (one file per
        folder, named by its resolved path): a start or resume on the same files then
        costs a stat per file, not a read of them all."""
        import hashlib

        where = os.environ.get("T2I_HASH_CACHE") or Path.home() / ".cache/t2i-pipeline/sha256"
        name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
        return cls(Path(where) / f"{name}.json", folder)

    def _key(self, path: Path) -> str:
        text, root = str(path), self._root_text
        if text.startswith(root) and ".." not in text:  # the common case, without relpath
            return text[len(root) :]
        return os.path.relpath(path, self.root)

    def known(self, path: Path) -> str | None:
        """The recorded sha256 of `path` while its stat is unchanged, else None (nothing
        read). OSError when the file is not there."""
        if not self.trust:
            return None
        st = os.stat(path)
        known = self.entries.get(self._key(path))
        if known is not None and known[:3] == [st.st_size, st.st_mtime_ns, st.st_ino]:
            return known[3]
        return None

    def sha256(self, path: Path) -> str:
        """The file's sha256: the recorded one while its stat is unchanged, else read."""
        path = Path(path)
        st = path.stat()
        key = self._key(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self.entries.get(key)
        if self.trust and known is not None and known[:3] == stamp:
            return known[3]
        digest = sha256_file(path)
        with self._lock:
            self.reads += 1
            self.entries[key] = self.mine[key] = [*stamp, digest]
            self.dirty = True
        return digest

    def record(self, path: Path, digest: str) -> None:
        """Remember `digest` as the sha256 of `path` as it is now (a caller that read the
        file for its own purpose hashed it)."""
        st = Path(path).stat()
        key = self._key(path)
        with self._lock:
            self.entries[key] = self.mine[key] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
            self.dirty = True

    def forget(self, path: Path) -> None:
        """Never trust what is recorded for `path` (it did not match what it should)."""
        with self._lock:
            key = self._key(path)
            self.entries.pop(key, None)
            self.mine[key] = None
            self.dirty = True

    def save(self) -> None:
        """Write what this instance learnt over the index as it is now on disk (another
        process, a DDP rank, may have saved its own entries since this one loaded)."""
        if self.index is None or not self.dirty:
            return
        try:
            current = json.loads(Path(self.index).read_text())
            current = current if isinstance(current, dict) else {}
        except (OSError, ValueError):
            current = {}
        for key, entry in self.mine.items():
            if entry is None:
                current.pop(key, None)
            else:
                current[key] = entry
        try:
            # Compact: a million files' index is read and written on every run.
            write_bytes_atomic(
                Path(self.index), json.dumps(current, separators=(",", ":")).encode()
            )
            self.entries, self.dirty = current, False
        except OSError:  # a read-only folder: hashed again next time
            pass
