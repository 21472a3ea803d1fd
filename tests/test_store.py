"""Outputs by reference (a pipeline's workspace store) and the stores' garbage collection."""

import json
import os
import shutil
import time
from pathlib import Path

from components.common.config import DataConfig, PackConfig
from pipelines.stages import run_stage
from pipelines.store import collect, gc

from .conftest import CACHE


class Artifact:
    def __init__(self, path):
        self.path, self.metadata = str(path), {}


def _pack(ws: Path, source: Path, out: Path, monkeypatch, run_id: str) -> dict:
    monkeypatch.setenv("T2I_RUN_ID", run_id)
    io = {
        "workspace": str(ws),
        "source": str(source),
        "data_key": "d",
        "data_params": json.dumps(DataConfig().model_dump()),
        "pack_params": json.dumps(PackConfig(val_fraction=0.2, shard_max_samples=8).model_dump()),
        "shards": Artifact(out),
    }
    run_stage("pack", io)
    return io


def test_pack_and_cache_outputs_are_manifests_that_point_into_the_store(
    sample_source, tiny_model, tmp_path, monkeypatch
):
    ws, src = tmp_path / "ws", tmp_path / "src"
    shutil.copytree(sample_source, src)
    _pack(ws, src, tmp_path / "shards", monkeypatch, "run-1")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "manifest.json", "rejected.jsonl", "store.json"
    ]  # fmt: skip
    store = Path(json.loads((tmp_path / "shards" / "store.json").read_text())["store"])
    assert store.parent == ws / "pack" and list(store.glob("*.tar"))
    cache = {"workspace": str(ws), "processes": 1, "cache_params": json.dumps(CACHE.model_dump()),
             "shards": Artifact(tmp_path / "shards"), "base_model": Artifact(tiny_model),
             "latents": Artifact(tmp_path / "latents")}  # fmt: skip
    run_stage("cache", cache)
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [
        "manifest.json",
        "store.json",
    ]
    from components.common.records import load_latent_split, shard_root

    assert shard_root(tmp_path / "latents").parent == ws / "cache"
    assert len(load_latent_split(tmp_path / "latents", "train")) > 0  # read in place
    # The run's manifests are kept beside its notes, for gc.
    assert (ws / "runs" / "run-1" / "pack-manifest.json").is_file()


def test_gc_keeps_what_a_kept_manifest_names_and_a_dry_run_deletes_nothing(
    sample_source, tmp_path, monkeypatch
):
    ws, src = tmp_path / "ws", tmp_path / "src"
    shutil.copytree(sample_source, src)
    _pack(ws, src, tmp_path / "a", monkeypatch, "run-1")
    first = {
        s["name"] for s in json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]
    }
    for path in sorted(src.glob("00[0-3]?.png")):  # 40 images gone: their shards replaced
        path.unlink()
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    (src / "metadata.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows if (src / r["file_name"]).exists()))  # fmt: skip
    _pack(ws, src, tmp_path / "b", monkeypatch, "run-2")
    second = {
        s["name"] for s in json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"]
    }
    dropped = first - second
    assert dropped
    store = Path(json.loads((tmp_path / "b" / "store.json").read_text())["store"])
    assert all((store / name).is_file() for name in dropped)  # kept: run-1 names them

    kept_both = collect(ws, keep_runs=2)
    assert kept_both.delete == []
    # A published version's lineage keeps its shards, whatever the runs kept.
    registry = tmp_path / "registry"
    (registry / "m" / "1").mkdir(parents=True)
    one = sorted(dropped)[0]
    lineage = {"pack": {"shards": [{"name": one}]}, "cache": {"shards": []}}
    (registry / "m" / "1" / "lineage.json").write_text(json.dumps(lineage))
    assert one not in {p.name for p in collect(ws, keep_runs=1, registry=registry).delete}
    only_latest = collect(ws, keep_runs=1)
    gone = {p.name for p in only_latest.delete}
    assert {n for n in gone if n.endswith(".tar")} == dropped
    assert all((store / n).is_file() for n in gone)  # nothing deleted yet
    assert "would delete" in gc(ws, keep_runs=1) and all((store / n).is_file() for n in gone)
    # A fan-out that never merged: its parts go once they are a day old, not before.
    part = store / ".parts" / "part-0000-of-0002" / "part.json"
    part.parent.mkdir(parents=True)
    part.write_text("{}")
    assert part not in collect(ws, keep_runs=1).delete
    os.utime(part, (time.time() - 2 * 86400,) * 2)
    assert part in collect(ws, keep_runs=1).delete
    assert gc(ws, keep_runs=1, delete=True).startswith("deleted")
    assert not (store / ".parts").exists()
    assert not any((store / n).exists() for n in gone)
    assert all((store / n).is_file() for n in second)  # what the current manifest names
