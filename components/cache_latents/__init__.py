"""cache: VAE latent moments and token ids for every packed sample, keyed by content.

One latent shard per input shard. Each sample is `{key}.safetensors` holding the
VAE posterior moments (`mean`, `logvar`; `mean_flip`, `logvar_flip` when
`random_flip`) and `input_ids`, plus `{key}.json` (caption, original size, crop).
A shard whose cache key (input content + model + transforms) is unchanged is reused.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from components.common.config import CacheConfig
from components.common.errors import T2IError
from components.common.io import atomic_dir, sha256_file, sha256_json, write_json_atomic
from components.common.models import default_device, load_tokenizer, load_vae, weights_sha256
from components.common.shards import read_shard, write_shard
from components.pack_shards import read_manifest

MANIFEST = "manifest.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CacheReport:
    samples: int
    shards_encoded: int
    shards_reused: int

    def summary(self) -> str:
        return (
            f"cached {self.samples} samples: {self.shards_encoded} shards encoded, "
            f"{self.shards_reused} unchanged"
        )


def run(cfg: CacheConfig, shards: Path, model: Path, out: Path) -> CacheReport:
    """Encode every shard listed in `shards`/manifest.json with the VAE of `model`.

    Writes `out` atomically. Raises T2IError for a missing manifest/model, a shard
    whose checksum does not match, or a sample that cannot be encoded.
    """
    shards, out = Path(shards), Path(out)
    packed = read_manifest(shards)
    vae, tokenizer = load_vae(model).eval().to(default_device()), load_tokenizer(model)
    model_key = {
        "vae": weights_sha256(model, "vae"),
        "tokenizer": weights_sha256(model, "tokenizer"),
        "scaling_factor": vae.config.scaling_factor,
    }
    previous = _previous_entries(out)
    entries, encoded = [], 0
    total = sum(s["samples"] for s in packed["shards"])
    with atomic_dir(out) as tmp, tqdm(total=total, desc="cache", unit="img") as bar:
        for shard in packed["shards"]:
            key = sha256_json({"shard": shard["sha256"], "config": cfg.model_dump(), **model_key})
            name = shard["name"]
            old = previous.get(name)
            if old and old["key"] == key and sha256_file(out / name) == old["sha256"]:
                shutil.copy2(out / name, tmp / name)
                bar.update(shard["samples"])
            else:
                _check_sha(shards / name, shard["sha256"])
                records = encode_shard(shards / name, vae, tokenizer, cfg, bar)
                if len(records) != shard["samples"]:
                    raise T2IError(
                        f"{shards / name}: {len(records)} samples, manifest says {shard['samples']}"
                    )
                write_shard(tmp / name, records)
                encoded += 1
            entries.append(
                {
                    **shard,
                    "key": key,
                    "sha256": sha256_file(tmp / name),
                    "source_sha256": shard["sha256"],
                }
            )
        latent_side = cfg.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        write_json_atomic(
            tmp / MANIFEST,
            {
                "shards": entries,
                "samples": packed["samples"],
                "cache_config": cfg.model_dump(),
                "resolution": cfg.resolution,
                "latent_shape": [vae.config.latent_channels, latent_side, latent_side],
                "vae_scaling_factor": vae.config.scaling_factor,
                "model": model_key,
            },
        )
    return CacheReport(sum(e["samples"] for e in entries), encoded, len(entries) - encoded)


def encode_shard(path: Path, vae, tokenizer, cfg: CacheConfig, bar) -> list[dict[str, bytes]]:
    """Moments + token ids for every sample of one packed shard, in shard order."""
    samples = list(read_shard(path))
    records = []
    for start in range(0, len(samples), cfg.batch_size):
        batch = samples[start : start + cfg.batch_size]
        pixels, metas = [], []
        for sample in batch:
            try:
                image = _decode(sample)
            except (OSError, ValueError) as e:
                raise T2IError(
                    f"{path}: sample {sample['__key__']} cannot be decoded ({e})"
                ) from None
            tensor, crop = preprocess(image, cfg, sample["__key__"])
            pixels.append(tensor)
            caption = sample["txt"].decode("utf-8")
            metas.append(
                {
                    "caption": caption,
                    "original_size": [image.height, image.width],
                    "crop_coords_top_left": list(crop),
                }
            )
        moments = encode_moments(vae, torch.stack(pixels), cfg.random_flip)
        ids = tokenizer(
            [m["caption"] for m in metas],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        for i, (sample, meta) in enumerate(zip(batch, metas, strict=True)):
            tensors = {k: v[i].to(DTYPES[cfg.dtype]).contiguous() for k, v in moments.items()}
            tensors["input_ids"] = ids[i].to(torch.int32).contiguous()
            records.append(
                {
                    "__key__": sample["__key__"],
                    "safetensors": st_save(tensors),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                }
            )
        bar.update(len(batch))
    return records


def preprocess(image: Image.Image, cfg: CacheConfig, key: str) -> tuple[torch.Tensor, tuple]:
    """The recipe's transforms: shortest side to `resolution` (bilinear), center or
    seeded random crop, to [-1, 1]. Returns the CHW tensor and the crop's (top, left)."""
    r = cfg.resolution
    scale = r / min(image.size)
    w, h = max(r, round(image.width * scale)), max(r, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    if cfg.center_crop:
        top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
    else:
        rng = np.random.default_rng([cfg.seed, int(key[:15], 16)])
        top, left = int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1))
    image = image.crop((left, top, left + r, top + r))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


@torch.inference_mode()
def encode_moments(vae, pixels: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
    """VAE posterior mean and logvar (and those of the mirrored images when `flip`)."""
    out = {}
    views = {"": pixels, "_flip": torch.flip(pixels, dims=[3])} if flip else {"": pixels}
    for suffix, view in views.items():
        dist = vae.encode(view.to(vae.device, vae.dtype)).latent_dist
        out["mean" + suffix], out["logvar" + suffix] = (
            dist.mean.float().cpu(),
            dist.logvar.float().cpu(),
        )
    return out


def read_latent_manifest(latents: Path) -> dict:
    path = Path(latents) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise T2IError(f"{path}: missing; run `t2i cache` first") from None


def load_split(latents: Path, split: str) -> list[dict[str, torch.Tensor]]:
    """Every cached sample of `split`, after verifying each shard's sha256."""
    manifest = read_latent_manifest(latents)
    samples = []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        path = Path(latents) / shard["name"]
        _check_sha(path, shard["sha256"])
        for record in read_shard(path):
            tensors = st_load(record["safetensors"])
            samples.append(
                {k: v.float() if v.is_floating_point() else v.long() for k, v in tensors.items()}
            )
    return samples


def _decode(sample: dict[str, bytes]) -> Image.Image:
    data = next(v for k, v in sample.items() if k in ("png", "jpg", "webp"))
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _check_sha(path: Path, expected: str) -> None:
    if not path.is_file():
        raise T2IError(f"{path}: shard missing; re-run the stage that writes it")
    if sha256_file(path) != expected:
        raise T2IError(f"{path}: sha256 does not match the manifest (corrupt or changed shard)")


def _previous_entries(out: Path) -> dict[str, dict]:
    try:
        return {s["name"]: s for s in json.loads((out / MANIFEST).read_text())["shards"]}
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return {}
