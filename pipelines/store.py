"""The workspace's shard stores, and their garbage collection (`t2i store gc`).

With a workspace, pack and cache write their shards once into content-keyed stores
(`<workspace>/pack/<key>/`, `<workspace>/cache/<key>/`) and their KFP outputs are
manifests that point there (`store.json`). Shards in a store are immutable: a serial or
a cache key is never reused, and a run's new manifest never deletes a shard an earlier
manifest named (a cached KFP output, a published version's lineage may name it). So
the stores only grow, until this collects what nothing kept names:

- each store's own, current `manifest.json`;
- the manifests of the newest `keep_runs` runs (`runs/<run id>/<stage>-manifest.json`,
  which the stages leave beside their notes);
- every shard named in the lineage of a published version (`--registry`).

It also collects the `.parts/` of a pack fan-out whose files are all older than a day
(its merge never ran).

With `pipeline.store` (an object store), the shards live there by sha256 and
`gc_objects` (`t2i store gc --store URI`) keeps every object that one of these names:
the newest `keep_runs` runs' manifests (which the stages also leave in the store, under
`runs/`), each workspace store's current manifest (with `--workspace`), and the
published versions' lineage; and every object less than a day old (a run uploading
now has not written its manifest yet).

Deleting a shard that a KFP cache entry older than the kept runs still names makes
that cached output fail when used ("its shards live in ..."): keep as many runs as
you may revert data to (or run with `pipeline.retrain: always` after a revert).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

STALE_PARTS_S = 24 * 3600  # pack workers' parts untouched this long: a fan-out that died
# What a store holds per shard: pack's shard and its index, cache's shard and receipt.
_OWNED = (".tar", ".tar.index.json", ".tar.json")


@dataclass
class Collection:
    keep: dict[Path, set[str]] = field(default_factory=dict)  # store -> shard names
    delete: list[Path] = field(default_factory=list)
    bytes: int = 0

    def summary(self, deleted: bool) -> str:
        verb = "deleted" if deleted else "would delete"
        kept = sum(len(v) for v in self.keep.values())
        return (
            f"{verb} {len(self.delete)} files ({self.bytes / 1e6:.1f} MB) in {len(self.keep)} "
            f"stores; {kept} shards kept"
            + ("" if deleted else " (a dry run: --delete deletes them)")
        )


def collect(workspace: Path, keep_runs: int = 5, registry: Path | None = None) -> Collection:
    """What `gc` would delete under `workspace`."""
    workspace = Path(workspace)
    stores = [p for kind in ("pack", "cache") for p in sorted((workspace / kind).glob("*"))
              if p.is_dir()]  # fmt: skip
    found = Collection({store: set() for store in stores})
    for store in stores:
        found.keep[store] |= _names(store / "manifest.json")
    runs = sorted(
        (p for p in (workspace / "runs").glob("*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime_ns,
    )
    for run in runs[-keep_runs:] if keep_runs else []:
        for stage in ("pack", "cache"):
            ref = run / f"{stage}-store.json"
            if ref.is_file():
                store = Path(json.loads(ref.read_text())["store"])
                found.keep.setdefault(store, set()).update(_names(run / f"{stage}-manifest.json"))
    published = _published_names(registry) if registry else set()
    stale = time.time() - STALE_PARTS_S
    for store in stores:
        # A pack fan-out that never merged (a crashed run) leaves its parts; one that is
        # running has files newer than a day.
        parts = [p for p in (store / ".parts").rglob("*") if p.is_file()]
        if parts and max(p.stat().st_mtime for p in parts) < stale:
            found.delete += parts
            found.bytes += sum(p.stat().st_size for p in parts)
        for path in sorted(store.iterdir()):
            if not path.is_file() or not path.name.endswith(_OWNED):
                continue
            shard = path.name.removesuffix(".index.json").removesuffix(".json")
            if shard in found.keep[store] or shard in published:
                continue
            found.delete.append(path)
            found.bytes += path.stat().st_size
    return found


def gc(workspace: Path, keep_runs: int = 5, registry: Path | None = None, delete=False) -> str:
    """Collect, and with `delete` delete; the one-line summary (and, dry, the list)."""
    found = collect(workspace, keep_runs, registry)
    if delete:
        for path in found.delete:
            path.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in found.delete if ".parts" in p.parts}, reverse=True):
            for empty in (folder, folder.parent):  # a part's folder, then .parts itself
                try:
                    empty.rmdir()
                except OSError:  # not empty (another part), or gone already
                    pass
        return found.summary(True)
    listed = "".join(f"  {p}\n" for p in found.delete)
    return listed + found.summary(False)


def _names(manifest: Path, field: str = "name") -> set[str]:
    """The `field` of every shard `manifest` names (none when it is not there)."""
    if not manifest.is_file():
        return set()
    try:
        return {s[field] for s in json.loads(manifest.read_text()).get("shards", [])}
    except (ValueError, KeyError, TypeError):
        return set()


def _published_names(registry: Path) -> set[str]:
    """Every pack and latent shard a published version's lineage names."""
    names: set[str] = set()
    for lineage in Path(registry).glob("*/*/lineage.json"):
        try:
            doc = json.loads(lineage.read_text())
        except ValueError:
            continue
        names |= {s["name"] for s in (doc.get("pack") or {}).get("shards", [])}
        names |= {s["name"] for s in (doc.get("cache") or {}).get("shards", [])}
    return names


@dataclass
class ObjectCollection:
    keep: set[str] = field(default_factory=set)  # sha256
    delete: dict[str, int] = field(default_factory=dict)  # sha256 -> size
    objects: int = 0

    def summary(self, uri: str, deleted: bool) -> str:
        verb = "deleted" if deleted else "would delete"
        size = sum(self.delete.values()) / 1e6
        return (
            f"{uri}: {verb} {len(self.delete)} of {self.objects} objects ({size:.1f} MB); "
            f"{self.objects - len(self.delete)} kept"
            + ("" if deleted else " (a dry run: --delete deletes them)")
        )


def collect_objects(
    uri: str, keep_runs: int = 5, workspace: Path | None = None, registry: Path | None = None
) -> ObjectCollection:
    """What `gc_objects` would delete in the object store `uri`."""
    from components.common.objects import ObjectStore

    store = ObjectStore(uri)
    found = ObjectCollection()
    for _, manifests in store.run_manifests()[-keep_runs:] if keep_runs else []:
        for doc in manifests:
            found.keep |= {s["sha256"] for s in doc.get("shards", [])}
    if workspace is not None:
        workspace = Path(workspace)
        for manifest in workspace.glob("*/*/manifest.json"):  # each store's current one
            if manifest.parent.parent.name in ("pack", "cache"):
                found.keep |= _shas(manifest)
        runs = sorted(workspace.glob("runs/*"), key=lambda p: p.stat().st_mtime_ns)
        for run in runs[-keep_runs:] if keep_runs else []:
            for manifest in run.glob("*-manifest.json"):
                found.keep |= _shas(manifest)
    if registry is not None:
        for lineage in Path(registry).glob("*/*/lineage.json"):
            try:
                doc = json.loads(lineage.read_text())
            except ValueError:
                continue
            for part in ("pack", "cache"):
                found.keep |= {s["sha256"] for s in (doc.get(part) or {}).get("shards", [])}
    fresh = time.time() - STALE_PARTS_S
    listed = store.objects_detail()
    found.objects = len(listed)
    for sha, (size, mtime) in listed.items():
        if sha not in found.keep and (mtime is None or mtime < fresh):
            found.delete[sha] = size
    return found


def gc_objects(
    uri: str,
    keep_runs: int = 5,
    workspace: Path | None = None,
    registry: Path | None = None,
    delete: bool = False,
) -> str:
    from components.common.objects import ObjectStore

    found = collect_objects(uri, keep_runs, workspace, registry)
    if delete:
        ObjectStore(uri).delete(sorted(found.delete))
        return found.summary(uri, True)
    listed = "".join(f"  {sha}\n" for sha in sorted(found.delete))
    return listed + found.summary(uri, False)


def _shas(manifest: Path) -> set[str]:
    return _names(manifest, "sha256")
