import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from components import cache_latents, pack_shards
from components.cache_latents.encode import decode_record, preprocess
from components.common.config import DataConfig
from components.common.errors import T2IError
from components.common.io import sha256_file
from components.common.models import (
    load_noise_scheduler,
    load_text_encoder,
    load_unet,
    load_vae,
)
from components.common.records import load_latent_split, verify_latents
from components.common.shards import read_shard, write_shard
from components.train_unet import training_loss

from .conftest import CACHE, PACK, REPO, run_killed_on_second_shard


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_one_latent_shard_per_input_shard_and_all_samples(shards, latents):
    packed, cached = manifest(shards), manifest(latents)
    assert [s["source_name"] for s in cached["shards"]] == [s["name"] for s in packed["shards"]]
    assert [s["samples"] for s in cached["shards"]] == [s["samples"] for s in packed["shards"]]
    assert cached["latent_shape"] == [4, 8, 8]  # the tiny VAE downsamples by 4
    for shard in cached["shards"]:
        assert sha256_file(latents / shard["name"]) == shard["sha256"]
        record = next(read_shard(latents / shard["name"]))
        meta = json.loads(record["json"])
        assert {"caption", "original_size", "crop_coords_top_left"} <= set(meta)


# -- exactness ---------------------------------------------------------------------


class _FixedDraws:
    """The same ε, noise and timesteps for both paths."""

    def __init__(self, eps, noise, timesteps):
        self.values = [eps, noise]
        self.timesteps = timesteps

    def randn(self, shape):
        return self.values.pop(0)

    def randint(self, high, n):
        return self.timesteps


def _recipe_loss(vae, text_encoder, unet, scheduler, pixels, ids, eps, noise, timesteps):
    """The upstream step: encode on the fly, latent_dist.sample(), text encoder, UNet."""
    dist = vae.encode(pixels).latent_dist
    latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor  # = .sample()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(ids, return_dict=False)[0]
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    target = noise  # the recipe's target of the scheduler's kind (the tiny model's: v)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float())


def _first_sample(shards, latents):
    name = manifest(latents)["shards"][0]
    packed = next(read_shard(shards / name["source_name"]))
    cached = load_latent_split(latents, name["split"])[0]
    pixels, _ = preprocess(decode_record(packed), CACHE, packed["__key__"])
    return pixels[None], cached


@pytest.mark.parametrize("stored, tolerance", [("fp32", 1e-5), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_loss_from_cached_moments_equals_encoding_on_the_fly(
    shards, latents, tiny_model, tmp_path, stored, tolerance
):
    """Stated tolerances (relative, loss): fp32 1e-5, fp16 2e-3, bf16 2e-2."""
    if stored != "fp32":
        latents_dir = tmp_path / "latents"
        cache_latents.run(
            CACHE.model_copy(update={"dtype": stored}), shards, tiny_model, latents_dir
        )
    else:
        latents_dir = latents
    pixels, cached = _first_sample(shards, latents_dir)
    vae, te = load_vae(tiny_model).eval(), load_text_encoder(tiny_model).eval()
    unet, scheduler = load_unet(tiny_model).eval(), load_noise_scheduler(tiny_model)
    g = torch.Generator().manual_seed(0)
    shape = (1, *cached["mean"].shape)
    eps, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timesteps = torch.tensor([400])
    ids = cached["input_ids"][None]
    with torch.no_grad():
        expected = _recipe_loss(vae, te, unet, scheduler, pixels, ids, eps, noise, timesteps)
        batch = {"mean": cached["mean"][None], "logvar": cached["logvar"][None], "input_ids": ids}
        ours = training_loss(
            unet,
            te,
            scheduler,
            batch,
            _FixedDraws(eps, noise, timesteps),
            scaling_factor=vae.config.scaling_factor,
            global_batch=1,
            device="cpu",
        )
    assert abs(ours.item() - expected.item()) <= tolerance * abs(expected.item())


def test_cached_flip_moments_are_the_mirrored_image(shards, latents, tiny_model):
    pixels, cached = _first_sample(shards, latents)
    with torch.no_grad():
        flipped = load_vae(tiny_model).eval().encode(torch.flip(pixels, dims=[3])).latent_dist
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(cached["mean_flip"], flipped.mean[0], **close)
    torch.testing.assert_close(cached["logvar_flip"], flipped.logvar[0], **close)


def test_text_embeddings_are_the_text_encoders_and_used_by_training(shards, tiny_model, tmp_path):
    cfg = CACHE.model_copy(update={"text_embeddings": True})
    cache_latents.run(cfg, shards, tiny_model, tmp_path / "lat")
    sample = load_latent_split(tmp_path / "lat", "train")[0]
    te = load_text_encoder(tiny_model).eval()
    with torch.no_grad():
        hidden = te(sample["input_ids"][None], return_dict=False)[0][0]
    torch.testing.assert_close(sample["encoder_hidden_states"], hidden, rtol=1e-5, atol=1e-5)
    assert "text_encoder" in manifest(tmp_path / "lat")["model"]


# -- keyed by content, incremental ---------------------------------------------------


def test_rerun_and_runtime_settings_reuse_every_shard(shards, tiny_model, latents, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(latents, out)
    (out / "notes.txt").write_text("a user's file")
    before = mtimes(out)
    report = cache_latents.run(CACHE, shards, tiny_model, out)
    assert (out / "notes.txt").read_text() == "a user's file"  # only our files are pruned
    assert report.shards_encoded == 0 and report.shards_reused == len(manifest(out)["shards"])
    report = cache_latents.run(CACHE.model_copy(update={"batch_size": 3}), shards, tiny_model, out)
    assert report.shards_encoded == 0
    shard_files = [n for n in before if n.endswith(".tar")]
    assert all(mtimes(out)[n] == before[n] for n in shard_files)


def test_transform_change_reencodes_everything(shards, tiny_model, latents, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(latents, out)
    n = len(manifest(out)["shards"])
    changed = cache_latents.run(
        CACHE.model_copy(update={"resolution": 16}), shards, tiny_model, out
    )
    assert changed.shards_encoded == n
    assert manifest(out)["latent_shape"] == [4, 4, 4]
    assert len(list(out.glob("*.tar"))) == n  # the old resolution's shards are gone
    flip = cache_latents.run(
        CACHE.model_copy(update={"resolution": 16, "random_flip": False}), shards, tiny_model, out
    )
    assert flip.shards_encoded == n


def test_newly_packed_shard_encodes_only_that_shard(sample_source, tiny_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_source, src)
    pack_shards.run(DataConfig(), PACK, src, tmp_path / "shards")
    first = cache_latents.run(CACHE, tmp_path / "shards", tiny_model, tmp_path / "lat")
    from make_sample import make_sample

    make_sample(tmp_path / "more", 60)  # the first 48 are the same images
    rows = (tmp_path / "more" / "metadata.jsonl").read_text().splitlines()[48:]
    for row in rows:
        name = json.loads(row)["file_name"]
        shutil.copy(tmp_path / "more" / name, src / name)
    with open(src / "metadata.jsonl", "a") as f:
        f.write("\n".join(rows) + "\n")
    packed = pack_shards.run(DataConfig(), PACK, src, tmp_path / "shards")
    again = cache_latents.run(CACHE, tmp_path / "shards", tiny_model, tmp_path / "lat")
    assert again.shards_encoded == packed.written > 0
    assert again.shards_reused == first.shards_encoded
    assert again.samples == 60


def test_killed_run_continues_with_unfinished_shards(shards, tiny_model, latents, tmp_path):
    out = tmp_path / "lat"
    call = (
        "CacheConfig(resolution=32, random_flip=True, batch_size=16, dtype='fp32'), *sys.argv[1:]"
    )
    run_killed_on_second_shard("components.cache_latents", call, shards, tiny_model, out)
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("*.tar"))) == 1  # one committed; the second never got its name
    report = cache_latents.run(CACHE, shards, tiny_model, out)
    assert (
        report.shards_reused == 1 and report.shards_encoded == len(manifest(shards)["shards"]) - 1
    )
    assert manifest(out)["shards"] == manifest(latents)["shards"]


# -- parallel ------------------------------------------------------------------------


def test_workers_split_shards_and_merge_equals_one_process(shards, tiny_model, latents, tmp_path):
    out = tmp_path / "lat"
    r0 = cache_latents.run(CACHE, shards, tiny_model, out, worker_index=0, num_workers=2)
    with pytest.raises(T2IError, match="worker 1 of 2 has not finished"):
        cache_latents.merge(shards, out)
    r1 = cache_latents.run(CACHE, shards, tiny_model, out, worker_index=1, num_workers=2)
    assert r0.shards_encoded + r1.shards_encoded == len(manifest(shards)["shards"])
    assert r0.shards_encoded > 0 and r1.shards_encoded > 0
    cache_latents.merge(shards, out)
    assert manifest(out)["shards"] == manifest(latents)["shards"]
    assert not list(out.glob("part-*"))


@pytest.mark.slow
def test_torchrun_two_processes_share_the_work(shards, tiny_model, latents, tmp_path):
    out = tmp_path / "lat"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port for the rendezvous, not a fixed one
        "--nproc_per_node",
        "2",
        "-m",
        "components.cli",
        "cache",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        "cache.resolution=32",
        "--set",
        "cache.random_flip=true",
        "--set",
        "cache.batch_size=16",
        "--set",
        "cache.image_interpolation_mode=lanczos",
        "--set",
        "cache.dtype=fp32",
        "--shards",
        str(shards),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got, want = manifest(out)["shards"], manifest(latents)["shards"]
    assert [s["key"] for s in got] == [s["key"] for s in want]
    # torchrun runs each process with one thread: same values, not the same float bits.
    for split in ("train", "val"):
        got_split, want_split = (load_latent_split(d, split) for d in (out, latents))
        for a, b in zip(got_split, want_split, strict=True):
            for name in b:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_sample_that_cannot_be_encoded_is_named(shards, tiny_model, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    packed = manifest(broken)
    victim = packed["shards"][0]
    records = list(read_shard(broken / victim["name"]))
    records[2] = {**records[2], "png": b"not a png"}
    write_shard(broken / victim["name"], records)
    victim["sha256"] = sha256_file(broken / victim["name"])
    (broken / "manifest.json").write_text(json.dumps(packed))
    with pytest.raises(T2IError, match=f"1 samples could not be decoded.*{records[2]['__key__']}"):
        cache_latents.run(CACHE, broken, tiny_model, tmp_path / "lat")
    assert len(list((tmp_path / "lat").glob("*.tar"))) == len(packed["shards"]) - 1


def test_corrupt_or_missing_latent_shard_is_named(latents, tmp_path):
    copy = tmp_path / "latents"
    shutil.copytree(latents, copy)
    victim = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # one flipped bit inside the first sample's tensors
    victim.write_bytes(bytes(data))
    with pytest.raises(T2IError, match=f"{victim.name}: sha256 does not match"):
        load_latent_split(copy, "train")
    victim.unlink()
    with pytest.raises(T2IError, match=f"{victim.name}: shard missing"):
        verify_latents(copy)


def test_vae_dtype_rules_and_slicing(shards, tiny_model, latents, tmp_path):
    from components.cache_latents.encode import vae_compute_dtype

    cfg = CACHE
    assert vae_compute_dtype(cfg, "cpu", True) == torch.float32  # auto on CPU
    assert vae_compute_dtype(cfg, "cuda", True) == torch.bfloat16  # auto on CUDA
    fp16 = cfg.model_copy(update={"vae_dtype": "fp16"})
    assert vae_compute_dtype(fp16, "cuda", True) == torch.float32  # force_upcast
    assert vae_compute_dtype(fp16, "cuda", False) == torch.float16
    sliced = CACHE.model_copy(update={"vae_slicing": True, "vae_tiling": True})
    cache_latents.run(sliced, shards, tiny_model, tmp_path / "lat")
    a, b = (load_latent_split(d, "val") for d in (tmp_path / "lat", latents))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["mean"], y["mean"], rtol=1e-5, atol=1e-5)
