import json

import pytest
from make_sample import make_sample
from PIL import Image

from components import pack_shards
from components.common.config import DataConfig, PackConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import sha256_file
from components.common.shards import read_shard

from .conftest import PACK


def test_manifest_checksums_and_counts(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    total = 0
    for shard in manifest["shards"]:
        assert sha256_file(shards / shard["name"]) == shard["sha256"]
        records = list(read_shard(shards / shard["name"]))
        assert len(records) == shard["samples"] <= PACK.shard_max_samples
        assert all({"png", "txt", "json"} <= set(r) for r in records)
        total += shard["samples"]
    assert total == 48 == sum(manifest["samples"].values())
    assert manifest["samples"]["val"] > 0 and manifest["samples"]["train"] > 0


def test_repacking_gives_identical_bytes(sample_source, shards, tmp_path):
    pack_shards.run(DataConfig(), PACK, sample_source, tmp_path / "again")
    for shard in json.loads((shards / "manifest.json").read_text())["shards"]:
        assert sha256_file(tmp_path / "again" / shard["name"]) == shard["sha256"]


def test_split_is_stable_when_samples_are_added(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    make_sample(small, 30)
    make_sample(big, 60)  # the first 30 are the same files
    splits = {}
    for name, src in (("small", small), ("big", big)):
        out = tmp_path / f"out-{name}"
        pack_shards.run(DataConfig(), PACK, src, out)
        splits[name] = {
            json.loads(r["json"])["source"]: shard.name.split("-")[0]
            for shard in sorted(out.glob("*.tar"))
            for r in read_shard(shard)
        }
    assert all(splits["big"][k] == v for k, v in splits["small"].items())


def test_bad_samples_are_rejected_with_reasons(tmp_path):
    src = tmp_path / "src"
    make_sample(src, 12)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    (src / "text.png").write_text("not an image")
    good = (src / rows[0]["file_name"]).read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (2, 2), "red").save(src / "tiny.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(src / "rgba.png")
    (src / "dup.png").write_bytes(good)
    Image.new("RGB", (32, 32), "green").save(src / "nocaption.png")
    rows += [
        {"file_name": "text.png", "text": "x"},
        {"file_name": "truncated.png", "text": "x"},
        {"file_name": "tiny.png", "text": "x"},
        {"file_name": "rgba.png", "text": "a transparent square"},
        {"file_name": "dup.png", "text": "x"},
        {"file_name": "absent.png", "text": "x"},
        {"file_name": "nocaption.png", "text": "  \n "},
    ]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = pack_shards.run(DataConfig(), PACK, src, tmp_path / "out")
    rejected = {
        r["source"]: r["reason"]
        for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())
    }
    assert rejected["text.png"].startswith("undecodable")
    assert rejected["truncated.png"].startswith("undecodable")
    assert rejected["tiny.png"].startswith("too_small")
    assert rejected["dup.png"] == f"duplicate: of {rows[0]['file_name']}"
    assert rejected["absent.png"] == "missing_file"
    assert rejected["nocaption.png"] == "empty_caption"
    assert len(rejected) == 6, rejected
    assert report.kept == 13  # 12 good + the RGBA image, composited
    rgba = [
        r
        for s in (tmp_path / "out").glob("*.tar")
        for r in read_shard(s)
        if json.loads(r["json"])["source"] == "rgba.png"
    ]
    assert json.loads(rgba[0]["json"])["mode"] == "RGBA"


def test_too_many_rejections_fail(tmp_path):
    src = tmp_path / "src"
    make_sample(src, 4)
    for p in src.glob("*.png"):
        p.write_bytes(b"garbage")
    with pytest.raises(T2IError, match="max_reject_fraction"):
        pack_shards.run(DataConfig(), PackConfig(max_reject_fraction=0.5), src, tmp_path / "out")
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 4


def test_missing_column_names_the_columns(sample_source, tmp_path):
    with pytest.raises(
        ConfigError, match=r"no column 'caption'.*columns are \['file_name', 'text'\]"
    ):
        pack_shards.run(DataConfig(caption_column="caption"), PACK, sample_source, tmp_path / "o")


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        pack_shards.run(DataConfig(), PACK, tmp_path / "absent", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metadata"):
        pack_shards.run(DataConfig(), PACK, tmp_path / "empty", tmp_path / "o")
