import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from make_sample import make_sample
from PIL import Image

from components import pack_shards
from components.common.config import DataConfig, PackConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import sha256_file
from components.common.records import read_pack_manifest
from components.common.shards import read_shard, write_shard

from .conftest import PACK, REPO, run_killed_on_second_shard
from .zoo import make_zoo, photo


def records(out):
    """{source: record} over every shard the manifest lists."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for shard in manifest["shards"]:
        for r in read_shard(out / shard["name"]):
            found[json.loads(r["json"])["source"]] = r
    return found


def image_of(record):
    data = next(v for k, v in record.items() if k in ("png", "jpg", "webp"))
    return Image.open(io.BytesIO(data)).convert("RGB")


def snapshot(out):
    """{name: (bytes sha256, mtime_ns)} of every file in the output folder."""
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def rejected(out):
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {r["source"]: r["reason"] for r in map(json.loads, lines)}


# -- output contract -----------------------------------------------------------------


def test_manifest_checksums_and_counts(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    total = 0
    for shard in manifest["shards"]:
        assert sha256_file(shards / shard["name"]) == shard["sha256"]
        recs = list(read_shard(shards / shard["name"]))
        assert len(recs) == shard["samples"] <= PACK.shard_max_samples
        assert all({"png", "txt", "json"} <= set(r) for r in recs)
        meta = json.loads(recs[0]["json"])
        assert {"source", "size", "mode", "sha256"} <= set(meta)
        total += shard["samples"]
    assert total == 48 == sum(manifest["samples"].values())
    assert manifest["samples"]["val"] > 0 and manifest["samples"]["train"] > 0
    assert manifest["source_fingerprint"] and manifest["pack_config"]["val_fraction"] == 0.2


def test_repacking_elsewhere_gives_identical_bytes(sample_source, shards, tmp_path):
    pack_shards.run(DataConfig(), PACK, sample_source, tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (
        shards / "manifest.json"
    ).read_bytes()


def test_workers_give_the_same_bytes_as_one_process(sample_source, tmp_path):
    for n in (1, 2):
        cfg = PACK.model_copy(update={"num_workers": n})
        pack_shards.run(DataConfig(), cfg, sample_source, tmp_path / f"w{n}")
    assert snapshot_bytes(tmp_path / "w1") == snapshot_bytes(tmp_path / "w2")


def snapshot_bytes(out):
    return {name: sha for name, (sha, _) in snapshot(out).items()}


def test_shards_are_bounded_by_bytes(sample_source, tmp_path):
    cfg = PACK.model_copy(update={"shard_max_samples": 1000, "shard_max_bytes": 30000})
    pack_shards.run(DataConfig(), cfg, sample_source, tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 2
    for shard in manifest["shards"]:  # a shard only exceeds the bound with one sample
        assert shard["samples"] == 1 or shard["bytes"] <= 30000


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


def test_downscale_and_jpeg_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(300, 200, 0).save(src / "big.png")
    (src / "big.txt").write_text("a big photo")
    cfg = PackConfig(max_image_side=96, image_format="jpg", quality=80, val_fraction=0)
    pack_shards.run(DataConfig(), cfg, src, tmp_path / "o")
    rec = records(tmp_path / "o")["big.png"]
    assert Image.open(io.BytesIO(rec["jpg"])).format == "JPEG"
    assert image_of(rec).size == (96, 64)
    assert json.loads(rec["json"])["size"] == [300, 200]


def test_auto_format_keeps_source_bytes_when_the_image_is_unchanged(tmp_path):
    """JPEG photos stay JPEG (their own bytes), not 3-4x larger PNGs."""
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        photo(160, 120, i).save(src / f"p{i}.jpg", quality=90)
        (src / f"p{i}.txt").write_text(f"photo {i}")
    photo(3000, 200, 9).save(src / "wide.jpg", quality=90)  # downscaled: re-encoded, as JPEG
    (src / "wide.txt").write_text("a wide photo")
    cfg = PackConfig(val_fraction=0, max_aspect_ratio=20)
    pack_shards.run(DataConfig(), cfg, src, tmp_path / "o")
    recs = records(tmp_path / "o")
    for i in range(6):
        rec, raw = recs[f"p{i}.jpg"], (src / f"p{i}.jpg").read_bytes()
        assert rec["jpg"] == raw and json.loads(rec["json"])["stored"] == "source bytes"
        assert (
            json.loads(rec["json"])["pixels_sha256"]
            == hashlib.sha256(image_of(rec).tobytes()).hexdigest()
        )
    wide = recs["wide.jpg"]
    assert set(wide) & {"jpg", "png"} == {"jpg"} and image_of(wide).size == (1024, 68)
    assert json.loads(wide["json"])["stored"] == "re-encoded"
    stored = sum(
        (tmp_path / "o" / s["name"]).stat().st_size
        for s in read_pack_manifest(tmp_path / "o").model_dump()["shards"]
    )
    sources = sum(p.stat().st_size for p in src.glob("p*.jpg"))
    assert stored < 1.5 * sources + 40_000  # tar headers and one re-encoded image


# -- the bad-input zoo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    expect_rejected, expect_kept = make_zoo(root / "src", root / "outside")
    cfg = PackConfig(val_fraction=0, max_reject_fraction=0.95, num_workers=2)
    report = pack_shards.run(DataConfig(), cfg, root / "src", root / "out")
    return root / "out", report, expect_rejected, expect_kept


def test_zoo_rejects_each_bad_sample_with_its_reason(zoo):
    out, report, expect_rejected, expect_kept = zoo
    got = rejected(out)
    assert set(got) == set(expect_rejected)
    for source, reason in expect_rejected.items():
        assert got[source].startswith(reason), (source, got[source])
    assert got["duplicate.jpg"] == "duplicate: of good.jpg"
    assert set(records(out)) == expect_kept
    assert report.kept == len(expect_kept)
    assert report.rejected["undecodable"] == 4 and report.rejected["duplicate"] == 1
    assert report.rejected["blank"] == 2
    assert "rejected 15" in report.summary()
    # Why the logo is gone: flattened onto white, nothing is left of it.
    assert "onto white (pack.alpha_background)" in got["white-logo.png"]


def test_transparency_is_flattened_onto_the_chosen_background_or_refused(zoo, tmp_path):
    from components.pack_shards.decode import pack_sample
    from components.pack_shards.sources import Sample

    from .zoo import make_zoo

    folder = tmp_path / "src"
    make_zoo(folder, tmp_path / "outside")

    class Blob:
        def __init__(self, path):
            self.path = path

        def read(self):
            return self.path.read_bytes()

    def pack(name, **cfg):
        sample = Sample(key=name, source=name, blob=Blob(folder / name), caption="a logo")
        return pack_sample(sample, PackConfig(**cfg))

    on_black = pack("white-logo.png", alpha_background="black")
    px = np.asarray(image_of(on_black.record))
    assert tuple(px[0, 0]) == (0, 0, 0) and tuple(px[20, 20]) == (255, 255, 255)
    assert pack("white-logo.png", alpha_background="#102030").record  # any colour
    assert pack("rgba.png", alpha_background="reject").startswith("transparent")
    assert not isinstance(pack("good.jpg", alpha_background="reject"), str)  # opaque: kept
    assert pack("gray.png", blank_threshold=0).record  # 0: blank pictures are kept
    with pytest.raises(ValueError, match="must be a colour .* or reject, got 'blu'"):
        PackConfig(alpha_background="blu")


def test_zoo_keepers_are_converted_to_rgb_correctly(zoo):
    out = zoo[0]
    recs = records(out)
    meta = {s: json.loads(r["json"]) for s, r in recs.items()}
    px = {s: np.asarray(image_of(r)) for s, r in recs.items()}
    assert meta["cmyk.jpg"]["mode"] == "CMYK" and px["cmyk.jpg"][20, 20, 0] > 200
    assert meta["gray16.png"]["mode"].startswith("I")
    assert abs(int(px["gray16.png"][5, 5, 0]) - 128) <= 1  # 32768/65535, not clipped white
    assert meta["rgba.png"]["mode"] == "RGBA" and (px["rgba.png"][5, 5] == 255).all()  # white
    assert tuple(px["rgba.png"][5, 30]) == (0, 0, 255)  # the opaque half as it was
    assert (px["transparent.gif"][5, 5] == 255).all()  # transparent half: white
    assert tuple(px["transparent.gif"][5, 30]) == (255, 0, 0)
    assert meta["animated.gif"]["frames"] == 2 and px["animated.gif"][5, 5, 1] == 200
    assert "fotó ñ 1 – été.png" in recs


def test_zoo_auto_format_re_encodes_only_what_changed(zoo):
    recs = records(zoo[0])
    stored = {s: (set(r) & {"png", "jpg", "webp"}).pop() for s, r in recs.items()}
    how = {s: json.loads(r["json"])["stored"] for s, r in recs.items()}
    assert stored["good.jpg"] == "jpg" and how["good.jpg"] == "source bytes"
    for name in ("rotated.jpg", "cmyk.jpg"):  # EXIF rotation, CMYK: a JPEG photo again
        assert (stored[name], how[name]) == ("jpg", "re-encoded"), name
    for name in ("rgba.png", "gray16.png", "transparent.gif", "animated.gif"):  # lossless
        assert (stored[name], how[name]) == ("png", "re-encoded"), name


def test_zoo_exif_orientation_is_applied(zoo):
    rec = records(zoo[0])["rotated.jpg"]
    img = np.asarray(image_of(rec)).astype(int)
    assert img.shape[:2] == (40, 20)  # 40x20 stored, shown rotated: 20 wide, 40 high
    top, bottom = img[5, 10], img[35, 10]
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100  # left (red) went up
    assert json.loads(rec["json"])["size"] == [20, 40]


def test_empty_caption_policies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(40, 40, 1).save(src / "a_red-thing.png")
    photo(40, 40, 2).save(src / "b.png")
    (src / "b.txt").write_text("a caption")
    base = PackConfig(val_fraction=0, max_reject_fraction=0.9)
    for policy, expected in (("keep", ""), ("filename", "a red thing")):
        cfg = base.model_copy(update={"empty_caption": policy})
        pack_shards.run(DataConfig(), cfg, src, tmp_path / policy)
        assert records(tmp_path / policy)["a_red-thing.png"]["txt"].decode() == expected
    pack_shards.run(DataConfig(), base, src, tmp_path / "reject")
    assert rejected(tmp_path / "reject") == {"a_red-thing.png": "missing_caption"}


def test_too_many_rejections_fail(tmp_path):
    src = tmp_path / "src"
    make_sample(src, 4)
    for p in src.glob("*.png"):
        p.write_bytes(b"garbage")
    with pytest.raises(T2IError, match="max_reject_fraction"):
        pack_shards.run(DataConfig(), PackConfig(max_reject_fraction=0.5), src, tmp_path / "out")
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 4
    assert not (tmp_path / "out" / "manifest.json").exists()


# -- source formats ------------------------------------------------------------------


def test_nested_imagefolder_with_csv(tmp_path):
    src = tmp_path / "src"
    for sub in ("a", "b/c"):
        (src / sub).mkdir(parents=True)
        photo(40, 40, len(sub)).save(src / sub / "x.png")
        (src / sub / "metadata.csv").write_text(f'file_name,caption\nx.png,"from {sub}"\n')
    data = DataConfig(caption_column="caption")
    pack_shards.run(data, PackConfig(val_fraction=0), src, tmp_path / "o")
    recs = records(tmp_path / "o")
    assert {s: r["txt"].decode() for s, r in recs.items()} == {
        "a/x.png": "from a",
        "b/c/x.png": "from b/c",
    }


def test_folder_with_txt_captions(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, folder in enumerate((src, src, src / "sub")):
        photo(40, 40, i).save(folder / f"img{i}.jpg", quality=90)
        (folder / f"img{i}.txt").write_text(f"  a   caption {i}\n\n number {i} \n")
    report = pack_shards.run(DataConfig(), PackConfig(val_fraction=0), src, tmp_path / "o")
    recs = records(tmp_path / "o")
    # each non-empty line is a caption, whitespace normalised; one per line in `txt`
    assert report.kept == 3 and recs["sub/img2.jpg"]["txt"] == b"a caption 2\nnumber 2"
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["format"] == "captions"


def _hf_dataset(n=6):
    import datasets

    images = [photo(40, 40, i) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"row {i}" for i in range(n)]}, features=features
    )


def test_datasets_save_to_disk_and_parquet(tmp_path):
    ds = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    outs = {}
    for name in ("disk", "pq"):
        report = pack_shards.run(
            DataConfig(), PackConfig(val_fraction=0), tmp_path / name, tmp_path / f"o-{name}"
        )
        assert report.kept == 6
        outs[name] = records(tmp_path / f"o-{name}")
        assert sorted(r["txt"].decode() for r in outs[name].values())[0] == "row 0"
    manifest = json.loads((tmp_path / "o-disk" / "manifest.json").read_text())
    assert manifest["format"] == "datasets"
    with pytest.raises(ConfigError, match=r"no column 'caption'.*columns are \['image', 'text'\]"):
        pack_shards.run(
            DataConfig(caption_column="caption"), PACK, tmp_path / "disk", tmp_path / "x"
        )


def test_dataset_name_offline_is_a_clear_error(tmp_path):
    data = DataConfig(dataset_name="nobody/no-such-dataset-t2i")
    with pytest.raises(T2IError, match="cannot load.*HF_HUB_OFFLINE"):
        pack_shards.run(data, PACK, tmp_path, tmp_path / "o")


def test_webdataset_input_is_validated_and_resharded(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        photo(40, 40, i).save(buf, "JPEG", quality=90)
        samples.append({"__key__": f"s{i:03d}", "jpg": buf.getvalue(), "txt": f"tar {i}".encode()})
    samples.append({"__key__": "nocap", "jpg": samples[0]["jpg"][:100]})
    write_shard(src / "in-000.tar", samples)
    with tarfile.open(src / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    cfg = PackConfig(val_fraction=0, max_reject_fraction=0.9)
    report = pack_shards.run(DataConfig(), cfg, src, tmp_path / "o")
    assert report.kept == 5
    got = rejected(tmp_path / "o")
    assert got["in-000.tar:nocap"] == "missing_caption"
    assert got["evil.tar:../escape.txt"] == "unsafe_tar_member"
    assert got["evil.tar:link.jpg"] == "unsafe_tar_member"
    assert not (tmp_path / "escape.txt").exists()
    assert records(tmp_path / "o")["in-000.tar:s003"]["txt"] == b"tar 3"


def test_missing_column_names_the_columns(sample_source, tmp_path):
    with pytest.raises(
        ConfigError, match=r"no column 'caption'.*columns are \['file_name', 'text'\]"
    ):
        pack_shards.run(DataConfig(caption_column="caption"), PACK, sample_source, tmp_path / "o")


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        pack_shards.run(DataConfig(), PACK, tmp_path / "absent", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        pack_shards.run(DataConfig(), PACK, tmp_path / "empty", tmp_path / "o")


def test_cli_empty_source_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.cli",
            "pack",
            "--source",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


# -- incremental and atomic ----------------------------------------------------------


def _appended(src, start, count):
    """Add `count` new images (and metadata rows) to an imagefolder made by make_sample."""
    rows = (src / "metadata.jsonl").read_text()
    for i in range(start, start + count):
        photo(48, 40, 100 + i).save(src / f"new{i}.png")
        rows += json.dumps({"file_name": f"new{i}.png", "text": f"new photo {i}"}) + "\n"
    (src / "metadata.jsonl").write_text(rows)


def _with_a_broken_file_and_a_duplicate(src):
    """40 images of make_sample, one file that is no image and a copy of the first."""
    make_sample(src, 40)
    (src / "broken.png").write_bytes(b"nope")
    (src / "dup.png").write_bytes((src / "0000.png").read_bytes())
    rows = [{"file_name": "broken.png", "text": "x"}, {"file_name": "dup.png", "text": "y"}]
    with open(src / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_unchanged_source_writes_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _with_a_broken_file_and_a_duplicate(src)
    pack_shards.run(DataConfig(), PACK, src, out)
    before = snapshot(out)
    report = pack_shards.run(DataConfig(), PACK, src, out)
    assert snapshot(out) == before
    assert report.written == 0 and report.decoded == 1  # only the duplicate is re-checked


def test_added_images_leave_old_shards_byte_identical(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src, 40)
    pack_shards.run(DataConfig(), PACK, src, out)
    before = snapshot(out)
    _appended(src, 0, 10)
    report = pack_shards.run(DataConfig(), PACK, src, out)
    after = snapshot(out)
    old_shards = [n for n in before if n.endswith(".tar")]
    assert all(after[n] == before[n] for n in old_shards)  # same bytes, not even rewritten
    new = [n for n in after if n.endswith(".tar") and n not in before]
    assert report.written == len(new) > 0 and report.decoded == 10
    new_sources = {json.loads(r["json"])["source"] for n in new for r in read_shard(out / n)}
    assert new_sources == {f"new{i}.png" for i in range(10)}
    assert len(records(out)) == 50


def test_changed_or_removed_sample_rewrites_only_its_shard(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src, 48)
    pack_shards.run(DataConfig(), PACK, src, out)
    where = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for r in read_shard(out / shard["name"]):
            where[json.loads(r["json"])["source"]] = shard["name"]
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    changed, removed = rows[3]["file_name"], rows[5]["file_name"]
    rows[3]["text"] = "a new caption"
    rows = [r for r in rows if r["file_name"] != removed]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(out)
    report = pack_shards.run(DataConfig(), PACK, src, out)
    after = snapshot(out)
    touched = {where[changed], where[removed]}
    assert report.written == len(touched) and report.decoded == 1
    for name in before:
        if name.endswith(".tar") and name not in touched:
            assert after[name] == before[name]
    assert not touched & set(after)  # replaced by shards with new serials
    recs = records(out)
    assert recs[changed]["txt"] == b"a new caption" and removed not in recs
    assert len(recs) == 47


def test_config_change_or_corrupt_shard_repacks(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src, 20)
    pack_shards.run(DataConfig(), PACK, src, out)
    first = json.loads((out / "manifest.json").read_text())["shards"][0]["name"]
    with open(out / first, "r+b") as f:
        f.seek(600)
        f.write(b"corrupt")
    report = pack_shards.run(DataConfig(), PACK, src, out)
    assert report.written == 1 and report.decoded > 0
    cfg = PACK.model_copy(update={"image_format": "webp"})
    report = pack_shards.run(DataConfig(), cfg, src, out)
    assert report.written == report.shards and all("webp" in r for r in records(out).values())
    report = pack_shards.run(DataConfig(), cfg.model_copy(update={"num_workers": 1}), src, out)
    assert report.written == 0  # worker count is not part of the output


def test_sigkill_mid_pack_leaves_the_previous_output(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src, 20)
    cfg = PackConfig(val_fraction=0.2, shard_max_samples=4)

    def killed_run():
        call = "DataConfig(), PackConfig(val_fraction=0.2, shard_max_samples=4), *sys.argv[1:]"
        run_killed_on_second_shard("components.pack_shards", call, src, out)

    killed_run()  # first run dies: no manifest, so no (partial) output is trusted
    assert not (out / "manifest.json").exists()
    with pytest.raises(T2IError, match="missing"):
        read_pack_manifest(out)
    pack_shards.run(DataConfig(), cfg, src, out)
    committed = (out / "manifest.json").read_bytes()
    _appended(src, 0, 12)
    killed_run()  # dies after writing one new shard
    assert (out / "manifest.json").read_bytes() == committed
    for shard in json.loads(committed)["shards"]:
        assert sha256_file(out / shard["name"]) == shard["sha256"]
    report = pack_shards.run(DataConfig(), cfg, src, out)
    assert report.kept == 32
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for s in manifest["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed  # orphans cleaned up
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_shard_bytes_are_exactly_tarfiles(tmp_path):
    samples = [
        {"__key__": f"{i:016x}", "png": bytes([i]) * (i * 700), "txt": b"x" * i, "json": b"{}"}
        for i in range(12)
    ]
    samples.append({"__key__": "ünï cödé", "txt": b"a non-ASCII name"})
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if k != "__key__"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(sample[ext]))
    write_shard(tmp_path / "ours.tar", samples)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert [r["__key__"] for r in read_shard(tmp_path / "ours.tar")] == [
        s["__key__"] for s in samples
    ]


def test_shards_are_readable_by_the_webdataset_library(shards):
    """Users can stream our shards with `webdataset` itself, keys and all."""
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    seen = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt")
    )
    assert len(seen) == sum(s["samples"] for s in manifest["shards"])
    key, image, caption = seen[0]
    assert image.mode == "RGB" and caption.startswith("a ") and len(key) == 16


# -- fan-out: K workers over parts of the listing, then a merge ------------------------


def _fan_out(src, out, count, cfg=PACK, only=None):
    from components.pack_shards import fanout

    reports = [
        fanout.run_worker(DataConfig(), cfg, src, out, i, count)
        for i in range(count)
        if only is None or i in only
    ]
    return reports, fanout.merge(DataConfig(), cfg, src, out)


def test_three_workers_and_a_merge_pack_as_one_pack_does(tmp_path):
    from components.pack_shards import fanout

    src, one, many = tmp_path / "src", tmp_path / "one", tmp_path / "many"
    _with_a_broken_file_and_a_duplicate(src)
    workers = PACK.model_copy(update={"num_workers": 2})  # one worker pools, as a pod does
    pack_shards.run(DataConfig(), PACK, src, one)
    reports, merged = _fan_out(src, many, 3, workers)
    assert (
        sorted(r.samples for r in reports) != [0, 0, 42] and sum(r.samples for r in reports) == 42
    )
    assert (many / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()
    assert (many / "rejected.jsonl").read_bytes() == (one / "rejected.jsonl").read_bytes()
    assert snapshot_names(many) == snapshot_names(one) and not (many / fanout.PARTS).exists()
    assert merged.kept == 40 and merged.written == merged.shards

    # Incremental as one pack: 10 new images are all the workers decode.
    _appended(src, 0, 10)
    before = snapshot(many)
    reports, merged = _fan_out(src, many, 3, workers)
    assert sum(r.decoded for r in reports) == 11  # the new ten, and the duplicate re-checked
    assert all(snapshot(many)[n] == before[n] for n in before if n.endswith(".tar"))
    pack_shards.run(DataConfig(), PACK, src, one)
    assert (many / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()


def snapshot_names(out):
    return sorted(p.name for p in out.iterdir())


def test_a_merge_without_every_part_or_after_a_change_refuses(tmp_path):
    from components.pack_shards import fanout

    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src, 20)
    fanout.run_worker(DataConfig(), PACK, src, out, 0, 2)
    with pytest.raises(T2IError, match="worker 1 of 2 has not finished"):
        fanout.merge(DataConfig(), PACK, src, out, count=2)
    fanout.run_worker(DataConfig(), PACK, src, out, 1, 2)
    _appended(src, 0, 1)  # the source changed after the workers listed it
    with pytest.raises(T2IError, match="1 samples differ from what the pack workers listed"):
        fanout.merge(DataConfig(), PACK, src, out)
    assert not (out / "manifest.json").exists()  # nothing committed
    with pytest.raises(T2IError, match="--worker-index 2: must be in 0..1"):
        fanout.run_worker(DataConfig(), PACK, src, out, 2, 2)
