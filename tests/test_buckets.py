"""Aspect-ratio buckets (cache.buckets): portrait, landscape and square images keep
their shape, training batches come from one bucket at a time, resume stays exact."""

import itertools
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load

from components import cache_latents, evaluate, pack_shards, train_unet
from components.common.config import CacheConfig, DataConfig, PackConfig, TrainConfig
from components.common.errors import ConfigError
from components.common.records import read_latent_manifest
from components.common.shapes import make_sample
from components.common.shards import read_shard
from components.train_unet.data import LatentStream

from .conftest import EVAL, train_then_resume

# 32 px buckets in steps of 8: 96x48 -> 40x24, 48x96 -> 24x40, 64x64 -> 32x32,
# and two 128x32 panoramas -> 64x16, fewer than a batch.
SHAPES = [(64, 64), (96, 48), (48, 96)]
# bucket_step null: the tiny model's own downscaling, 8 (SD's would be 64).
CACHE = CacheConfig(resolution=32, buckets=True, random_flip=True)
TRAIN = TrainConfig(
    train_batch_size=4,
    max_train_steps=8,
    checkpointing_steps=4,
    learning_rate=1e-3,
    shuffle_buffer=8,
    report_to="none",
)


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    make_sample(root / "src", 50)
    for i, path in enumerate(sorted((root / "src").glob("*.png"))):
        size = (128, 32) if i >= 48 else SHAPES[i % 3]
        Image.open(path).convert("RGB").resize(size, Image.LANCZOS).save(path)
    pack = PackConfig(val_fraction=0.2, shard_max_samples=10)
    pack_shards.run(DataConfig(), pack, root / "src", root / "shards")
    cache_latents.run(CACHE, root / "shards", tiny_model, root / "latents")
    return root


def _records(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in read_shard(folder / s["name"])]


def test_the_cache_keeps_each_images_bucket_shape_and_crop(mixed):
    manifest = read_latent_manifest(mixed / "latents")
    assert manifest.buckets and (32, 32) in manifest.buckets
    seen = {}
    for record in _records(mixed / "latents"):
        meta, tensors = json.loads(record["json"]), st_load(record["safetensors"])
        w, h = meta["bucket"]
        f = manifest.resolution // manifest.latent_shape[1]  # the VAE's downscale
        assert tensors["mean"].shape == (4, h // f, w // f) == tensors["mean_flip"].shape
        assert len(meta["crop_coords_top_left"]) == 2
        seen[tuple(meta["original_size"])] = (w, h)  # (height, width) of the source
    assert seen == {(64, 64): (32, 32), (48, 96): (40, 24), (96, 48): (24, 40), (32, 128): (64, 16)}
    for shard in manifest.shards:
        assert len(shard.sample_buckets) == shard.samples


def test_buckets_are_part_of_the_cache_key(mixed, tiny_model, tmp_path):
    square = CACHE.model_copy(update={"buckets": False})
    cache_latents.run(square, mixed / "shards", tiny_model, tmp_path / "square")
    keys = {s.key for s in read_latent_manifest(tmp_path / "square").shards}
    assert not keys & {s.key for s in read_latent_manifest(mixed / "latents").shards}
    assert read_latent_manifest(tmp_path / "square").buckets is None


def test_batches_come_from_one_bucket_and_every_shape_trains(mixed):
    manifest = read_latent_manifest(mixed / "latents")
    stream = LatentStream.from_manifest(
        mixed / "latents", manifest, None, batch_size=4, seed=0, shuffle_buffer=8
    )
    shapes = set()
    for _, batch in itertools.islice(stream.batches(0), 2 * stream.steps_in_epoch(0)):
        shapes.add(tuple(batch["mean"].shape[2:]))  # stacked: one shape per batch
    assert shapes == {(8, 8), (6, 10), (10, 6)}  # (H, W) of 32x32, 40x24, 24x40 at 1/4
    line, unused = stream.epoch_summary()
    assert "64x16: 2 samples, 0 batches (too few for a global batch of 4: not trained" in line
    assert unused >= 2


def test_two_ranks_see_the_one_process_global_batches(mixed):
    manifest = read_latent_manifest(mixed / "latents")

    def batches(**kw):
        s = LatentStream.from_manifest(
            mixed / "latents", manifest, None, seed=1, shuffle_buffer=8, **kw
        )
        return [b["mean"] for _, b in itertools.islice(s.batches(0), 2 * s.steps_in_epoch(0))]

    one = batches(batch_size=4, streams=2)
    ranks = [batches(batch_size=2, rank=r, world=2) for r in (0, 1)]
    assert len(one) == len(ranks[0]) > 0
    for whole, a, b in zip(one, *ranks, strict=True):
        assert torch.equal(whole, torch.cat([a, b]))


def test_training_on_buckets_resumes_bit_exact_and_evaluates(mixed, tiny_model, tmp_path, capsys):
    report, again = train_then_resume(
        TRAIN, mixed / "latents", tiny_model, tmp_path, "checkpoint-8"
    )
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert report.samples_not_in_a_batch >= 2
    assert "64x16: 2 samples, 0 batches" in capsys.readouterr().out
    assert again.resumed_from_step == 4
    assert (straight / "t/loss.csv").read_text() == (resumed / "t/loss.csv").read_text()
    from safetensors.torch import load_file

    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / "m" / unet), load_file(resumed / "m" / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the held-out loss handles the mixed shapes of the validation split
    out = evaluate.run(
        EVAL, straight / "m", tiny_model, mixed / "latents", tmp_path / "e", shards=mixed / "shards"
    )
    assert out.tuned_val_loss > 0 and out.base_val_loss > 0


def test_no_bucket_filling_a_batch_is_one_line(mixed, tiny_model, tmp_path):
    big = TRAIN.model_copy(update={"train_batch_size": 32})
    with pytest.raises(ConfigError, match="no bucket fills a global batch of 32"):
        train_unet.run(big, mixed / "latents", tiny_model, tmp_path / "m")


def test_bucket_step_comes_from_the_model_and_a_bad_one_names_one_that_works(
    mixed, tiny_model, tmp_path
):
    """SD's 64 on the 32 px demo used to be refused with a line naming no value that
    works; the default now comes from the model, and a wrong one says what fits."""
    assert (40, 24) in read_latent_manifest(mixed / "latents").buckets  # steps of 8
    for step, why in ((64, "at most cache.resolution .32.; 8 works here"), (12, "multiple of 8")):
        cfg = CACHE.model_copy(update={"bucket_step": step})
        with pytest.raises(ConfigError, match=f"cache.bucket_step {step}: must be a .*{why}"):
            cache_latents.run(cfg, mixed / "shards", tiny_model, tmp_path / f"l{step}")
        assert not (tmp_path / f"l{step}").exists()


def test_the_cache_reports_each_buckets_batches_before_training(
    mixed, tiny_model, tmp_path, capsys
):
    from components.cli import main

    sets = ["cache.buckets=true", "cache.resolution=32", "cache.random_flip=true"]
    sets += ["train.train_batch_size=4", "train.shuffle_buffer=8"]
    argv = ["cache", "--shards", str(mixed / "shards"), "--model", str(tiny_model)]
    argv += ["--out", str(tmp_path / "lat")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "64x16: 2 samples, 0 batches (too few for a global batch of 4" in out
    report = json.loads((tmp_path / "lat" / "buckets.json").read_text())
    rows = {r["bucket"]: r for r in report["buckets"]}
    assert rows["64x16"] == {"bucket": "64x16", "samples": 2, "batches": 0, "left_out": 2}
    assert report["train_batch_size"] == 4 and sum(r["samples"] for r in rows.values()) > 30
