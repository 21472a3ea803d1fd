"""Shards in an object store (`pipeline.store`; a local moto S3): outputs are manifests
that name it, pods download only what they read, a second run moves what changed, and
`t2i store gc --store` collects what nothing kept names."""

import json
import shutil
from pathlib import Path

import pytest

from components.common.config import DataConfig, PackConfig, load_params
from components.common.errors import ConfigError, T2IError
from pipelines.stages import run_stage
from pipelines.store import collect_objects, gc_objects

from .conftest import CACHE, REPO

BUCKET, URI = "t2i-store", "s3://t2i-store/shards"


class Artifact:
    def __init__(self, path):
        self.path, self.metadata = str(path), {}


def _pack(ws, source, out, run_id, monkeypatch):
    monkeypatch.setenv("T2I_RUN_ID", run_id)
    run_stage("pack", {
        "workspace": str(ws) if ws else "", "source": str(source), "data_key": run_id,
        "data_params": json.dumps(DataConfig().model_dump()),
        "pack_params": json.dumps(PackConfig(val_fraction=0.2, shard_max_samples=8).model_dump()),
        "shards": Artifact(out),
    })  # fmt: skip


def _cache(ws, shards, model, out):
    run_stage("cache", {
        "workspace": str(ws) if ws else "", "processes": 1,
        "cache_params": json.dumps(CACHE.model_dump()), "shards": Artifact(shards),
        "base_model": Artifact(model), "latents": Artifact(out),
    })  # fmt: skip


def _objects(client) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="shards/sha256/")
    return {o["Key"].rsplit("/", 1)[-1] for page in pages for o in page.get("Contents", [])}


def _shards(folder: Path) -> dict[str, str]:
    doc = json.loads((folder / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for s in doc["shards"]}


def _add_images(src: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    noise = np.random.default_rng(0).integers(0, 255, (count, 40, 40, 3), dtype=np.uint8)
    for i in range(count):
        Image.fromarray(noise[i]).save(src / f"new-{i:03d}.png")
        rows.append({**rows[i], "file_name": f"new-{i:03d}.png"})
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shards_live_once_in_the_object_store_and_a_second_run_moves_what_changed(
    sample_source, tiny_model, tmp_path, monkeypatch, s3
):
    from components.common.records import load_latent_split

    s3.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("T2I_STORE", URI)
    monkeypatch.setenv("T2I_OBJECT_CACHE", str(tmp_path / "node-1"))
    ws, src = tmp_path / "ws", tmp_path / "src"
    shutil.copytree(sample_source, src)
    _pack(ws, src, tmp_path / "s1", "run-1", monkeypatch)
    assert sorted(p.name for p in (tmp_path / "s1").iterdir()) == [
        "manifest.json", "rejected.jsonl", "store.json"
    ]  # fmt: skip
    assert json.loads((tmp_path / "s1" / "store.json").read_text()) == {"objects": URI}
    packed = _shards(tmp_path / "s1")
    assert _objects(s3) == set(packed.values())
    assert not list(ws.glob("pack/*/*.tar"))  # the data lives once: in the store
    _cache(ws, tmp_path / "s1", tiny_model, tmp_path / "l1")
    latents = _shards(tmp_path / "l1")
    assert _objects(s3) == set(packed.values()) | set(latents.values())
    assert not list(ws.glob("cache/*/*.tar"))
    # What a consumer reads is what a cache without any store writes, byte for byte.
    monkeypatch.delenv("T2I_STORE")
    _cache(None, tmp_path / "s1", tiny_model, tmp_path / "plain")
    assert _shards(tmp_path / "plain") == latents
    monkeypatch.setenv("T2I_STORE", URI)
    # Another node (an empty object cache) downloads only the split it reads.
    monkeypatch.setenv("T2I_OBJECT_CACHE", str(tmp_path / "node-2"))
    assert len(load_latent_split(tmp_path / "l1", "val")) > 0
    val = {s["sha256"] for s in json.loads((tmp_path / "l1" / "manifest.json").read_text())[
        "shards"] if s["split"] == "val"}  # fmt: skip
    assert {p.name for p in (tmp_path / "node-2").glob("??/*") if "." not in p.name} == val

    # Run 2, 4 images added: only the new shards are uploaded; pack downloads nothing,
    # cache only the pack shards it encodes.
    _add_images(src, 4)
    monkeypatch.setenv("T2I_OBJECT_CACHE", str(tmp_path / "node-3"))
    before = _objects(s3)
    _pack(ws, src, tmp_path / "s2", "run-2", monkeypatch)
    packed2 = _shards(tmp_path / "s2")
    new_pack = set(packed2.values()) - set(packed.values())
    assert new_pack and len(new_pack) <= 2 and _objects(s3) - before == new_pack
    assert not (tmp_path / "node-3").exists()
    _cache(ws, tmp_path / "s2", tiny_model, tmp_path / "l2")
    fetched = {p.name for p in (tmp_path / "node-3").glob("??/*") if "." not in p.name}
    assert fetched == new_pack
    assert len(_objects(s3)) == len(before) + 2 * len(new_pack)

    # A damaged object is named when a node downloads it, and nothing is trained on.
    name, sha = sorted(_shards(tmp_path / "l2").items())[0]
    s3.put_object(Bucket=BUCKET, Key=f"shards/sha256/{sha[:2]}/{sha}", Body=b"flipped")
    monkeypatch.setenv("T2I_OBJECT_CACHE", str(tmp_path / "node-4"))
    with pytest.raises(T2IError, match=f"object {sha[:16]}.* holds other bytes"):
        load_latent_split(tmp_path / "l2", "train" if "train" in name else "val")

    # gc: everything a kept run names stays; a fresh unnamed object too (a run may be
    # uploading it); an old one goes, and only with --delete.
    s3.put_object(Bucket=BUCKET, Key="shards/sha256/ab/ab" + "0" * 62, Body=b"orphan")
    assert collect_objects(URI, keep_runs=2, workspace=ws).delete == {}
    monkeypatch.setattr("pipelines.store.STALE_PARTS_S", -3600)  # "a day" is now behind us
    found = collect_objects(URI, keep_runs=2, workspace=ws)
    assert set(found.delete) == {"ab" + "0" * 62}
    assert "would delete 1 of" in gc_objects(URI, keep_runs=2) and len(_objects(s3)) > len(before)
    assert gc_objects(URI, keep_runs=2, delete=True).startswith(f"{URI}: deleted 1 of")
    assert "ab" + "0" * 62 not in _objects(s3)
    # Keeping one run: run 1's shards are all still named by run 2 (nothing dropped).
    assert set(collect_objects(URI, keep_runs=1).delete) == set()


def test_without_a_workspace_the_outputs_are_still_manifests(
    sample_source, tiny_model, tmp_path, monkeypatch, s3
):
    from components.common.records import load_latent_split

    s3.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("T2I_STORE", URI)
    monkeypatch.setenv("T2I_OBJECT_CACHE", str(tmp_path / "node"))
    _pack(None, sample_source, tmp_path / "s", "run-1", monkeypatch)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "rejected.jsonl", "store.json"
    ]  # fmt: skip
    _cache(None, tmp_path / "s", tiny_model, tmp_path / "l")
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == ["manifest.json", "store.json"]
    assert len(load_latent_split(tmp_path / "l", "train")) > 0
    # The run's manifests are in the store too: gc keeps what they name.
    assert collect_objects(URI, keep_runs=1).delete == {}


def test_the_store_is_configured_and_compiled_as_a_cluster_expects(tmp_path):
    from pipelines.commands import compile_pipeline

    for bad in ("/mnt/store", "hf://datasets/x", "s3://"):
        with pytest.raises(ConfigError, match="pipeline.store: must be s3://bucket/prefix"):
            load_params(REPO / "params.yaml", [f"pipeline.store={bad}"])
    with pytest.raises(ConfigError, match="cache_workers > 1 with store needs"):
        load_params(REPO / "params.yaml", [f"pipeline.store={URI}", "pipeline.workspace_pvc=null",
                                           "pipeline.cache_workers=2"])  # fmt: skip
    params = load_params(REPO / "params.yaml", [f"pipeline.store={URI}/",
                                                "pipeline.storage_secret={name: s3}"])  # fmt: skip
    assert params.pipeline.store == URI
    from .test_pipeline import k8s_of, load

    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    k8s = k8s_of(platform)
    executors = spec["deploymentSpec"]["executors"]

    def env(stage):
        return {e["name"]: e["value"] for e in executors[f"exec-{stage}-op"]["container"].get(
            "env", [])}  # fmt: skip

    def secrets(stage):
        return {e["envVar"] for s in k8s[f"exec-{stage}-op"].get("secretAsEnv", [])
                for e in s["keyToEnv"]}  # fmt: skip

    for stage in ("pack", "cache"):  # the writers know the store
        assert env(stage)["T2I_STORE"] == URI, stage
    for stage in ("train", "evaluate", "check"):  # readers find it in store.json
        assert "T2I_STORE" not in env(stage), stage
    for stage in ("pack", "cache", "check", "train", "evaluate"):
        assert "AWS_SECRET_ACCESS_KEY" in secrets(stage), stage
