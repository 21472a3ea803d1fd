import json

import pytest
import torch

from components import cache_latents
from components.common.errors import T2IError
from components.common.models import load_vae
from components.common.shards import read_shard

from .conftest import CACHE


def test_one_latent_shard_per_input_shard_and_all_samples(shards, latents):
    packed = json.loads((shards / "manifest.json").read_text())
    cached = json.loads((latents / "manifest.json").read_text())
    assert [s["name"] for s in cached["shards"]] == [s["name"] for s in packed["shards"]]
    assert [s["samples"] for s in cached["shards"]] == [s["samples"] for s in packed["shards"]]
    assert cached["latent_shape"] == [4, 16, 16]


def test_cached_moments_equal_encoding_on_the_fly(shards, latents, tiny_model):
    vae = load_vae(tiny_model).eval()
    name = json.loads((shards / "manifest.json").read_text())["shards"][0]["name"]
    packed = next(read_shard(shards / name))
    image = cache_latents._decode(packed)
    pixels, _ = cache_latents.preprocess(image, CACHE, packed["__key__"])
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
        flipped = vae.encode(torch.flip(pixels, dims=[2])[None]).latent_dist
    first = cache_latents.load_split(latents, name.split("-")[0])[0]
    # fp32; the cache encodes in batches, here one image: conv rounding differs ~1e-6.
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(first["mean"], dist.mean[0], **close)
    torch.testing.assert_close(first["logvar"], dist.logvar[0], **close)
    torch.testing.assert_close(first["mean_flip"], flipped.mean[0], **close)


def test_rerun_reuses_unchanged_shards(shards, tiny_model, latents, tmp_path):
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(latents, out)
    report = cache_latents.run(CACHE, shards, tiny_model, out)
    assert report.shards_encoded == 0 and report.shards_reused == len(list(out.glob("*.tar")))
    changed = cache_latents.run(
        CACHE.model_copy(update={"resolution": 16}), shards, tiny_model, out
    )
    assert changed.shards_encoded == report.shards_reused
    assert json.loads((out / "manifest.json").read_text())["latent_shape"] == [4, 8, 8]


def test_corrupt_latent_shard_is_named(latents, tmp_path):
    import shutil

    copy = tmp_path / "latents"
    shutil.copytree(latents, copy)
    victim = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # one flipped bit inside the first sample's tensors
    victim.write_bytes(bytes(data))
    with pytest.raises(T2IError, match=f"{victim.name}: sha256 does not match"):
        cache_latents.load_split(copy, "train")
