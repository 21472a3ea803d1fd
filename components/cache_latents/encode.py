"""Encoding one packed shard: the recipe's image transforms, VAE moments, text ids.

`LatentEncoder` holds the frozen models and knows the content key of its work: the
hashes of the weights it uses and every setting that changes what is stored.
"""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as st_save

from components.common.captions import split_captions
from components.common.conditioning import TextEncoders, time_ids
from components.common.config import CacheConfig
from components.common.errors import ConfigError
from components.common.families import family_of
from components.common.models import default_device, load_vae, weights_sha256
from components.common.shards import read_shard

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INTERPOLATION = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def vae_compute_dtype(
    cfg: CacheConfig, device: str, force_upcast: bool, full_precision: bool = False
) -> torch.dtype:
    """The VAE's dtype: `auto` is bf16 on CUDA and fp32 elsewhere; fp16 becomes fp32
    when the VAE config says `force_upcast` (its activations overflow in fp16);
    `full_precision` (SDXL's own VAE, as its training script runs it) is always fp32."""
    name = cfg.vae_dtype
    if name == "auto":
        name = "bf16" if device.startswith("cuda") else "fp32"
    if (name == "fp16" and force_upcast) or full_precision:
        name = "fp32"
    return DTYPES[name]


def vae_source(model: Path, cfg: CacheConfig) -> tuple[Path, str | None]:
    """(folder, subfolder) of the VAE the latents are made with: the model's, or
    `cache.pretrained_vae_model_name_or_path` (a folder with or without `vae/`, or a
    hub id in the cache). ConfigError when that cannot be found."""
    name = cfg.pretrained_vae_model_name_or_path
    if name is None:
        return Path(model), "vae"
    path = Path(name)
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # offline, unknown repo, no access
            raise ConfigError(
                f"cache.pretrained_vae_model_name_or_path {name!r}: not a folder, and cannot "
                f"be downloaded ({type(e).__name__}); download it once online or give a folder"
            ) from None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    if (path / "config.json").is_file():
        return path, None
    raise ConfigError(
        f"cache.pretrained_vae_model_name_or_path {name!r}: no VAE there (config.json, "
        "or vae/config.json)"
    )


def load_cache_vae(model: Path, cfg: CacheConfig):
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae_model_name_or_path is None:
        return load_vae(model)
    folder, sub = vae_source(model, cfg)
    return AutoencoderKL.from_pretrained(folder, **({"subfolder": sub} if sub else {}))


def vae_sha256(model: Path, cfg: CacheConfig) -> str:
    folder, sub = vae_source(model, cfg)
    if sub is None:  # a bare VAE folder: hash it as the part of its parent
        return weights_sha256(folder.parent, folder.name, check=False)
    return weights_sha256(folder, sub)


class LatentEncoder:
    """Frozen VAE (+ tokenizer, + text encoder when `cache.text_embeddings`)."""

    def __init__(
        self, model: Path, cfg: CacheConfig, device: str | None = None, max_aspect: float = 4.0
    ):
        from components.cache_latents import resolve

        cfg = resolve(cfg, model)
        self.cfg, self.device = cfg, device or default_device()
        self.family = family_of(model)
        vae = load_cache_vae(model, cfg).eval()
        self.buckets = None
        if cfg.buckets:
            step = bucket_step(model, cfg, vae.config)
            self.buckets = bucket_sizes(cfg.resolution, step, max_aspect)
        own_sdxl_vae = self.family.micro_conditioning and not cfg.pretrained_vae_model_name_or_path
        self.dtype = vae_compute_dtype(
            cfg, self.device, vae.config.get("force_upcast", False), own_sdxl_vae
        )
        self.vae = vae.to(self.device)
        if self.dtype != torch.float32:  # (a no-op cast still makes diffusers warn)
            self.vae = self.vae.to(dtype=self.dtype)
        if cfg.vae_slicing:
            self.vae.enable_slicing()
        if cfg.vae_tiling:
            self.vae.enable_tiling()
        self.text = TextEncoders.load(
            model, encoders=cfg.text_embeddings, device=self.device, dtype=self.dtype
        )
        self.model_key = model_key(model, cfg, self.vae.config, self.dtype)
        if self.buckets:
            self.model_key["buckets"] = [list(b) for b in self.buckets]

    @property
    def latent_shape(self) -> list[int]:
        side = self.cfg.resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))
        return [self.vae.config.latent_channels, side, side]

    def encode_shard(self, path: Path, bar) -> tuple[list[dict[str, bytes]], list[str]]:
        """(records, failed keys) for every sample of one packed shard, in shard order."""
        samples = list(read_shard(path))
        records, failed = [], []
        threads = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
        with threads:
            for start in range(0, len(samples), self.cfg.batch_size):
                batch = samples[start : start + self.cfg.batch_size]
                prepared = list(threads.map(self._prepare, batch))
                good = [(s, p) for s, p in zip(batch, prepared, strict=True) if p is not None]
                failed += [s["__key__"] for s, p in zip(batch, prepared, strict=True) if p is None]
                records += self._encode_by_shape(good)
                bar.update(len(batch))
        return records, failed

    def _encode_by_shape(self, good: list) -> list[dict[str, bytes]]:
        """Encode in groups of one size (the VAE takes one shape per batch), keeping order."""
        shapes = sorted({tuple(p.shape) for _, (p, _) in good})
        done = {}
        for shape in shapes:
            group = [(i, g) for i, g in enumerate(good) if tuple(g[1][0].shape) == shape]
            for (i, _), record in zip(
                group, self._encode_batch([g for _, g in group]), strict=True
            ):
                done[i] = record
        return [done[i] for i in range(len(good))]

    def _prepare(self, sample: dict[str, bytes]):
        try:
            image = decode_record(sample)
            size = (self.cfg.resolution,) * 2
            if self.buckets:
                size = nearest_bucket(image.width, image.height, self.buckets)
            pixels, crop, resized = preprocess(image, self.cfg, sample["__key__"], size, True)
        except (OSError, ValueError, StopIteration, UnicodeDecodeError):
            return None
        captions = split_captions(sample.get("txt", b"").decode("utf-8"))
        meta = {
            "caption": captions[0],
            "captions": captions,
            "original_size": [image.height, image.width],
            "crop_coords_top_left": list(crop),
        }
        if self.family.micro_conditioning:
            meta["target_size"] = [int(pixels.shape[1]), int(pixels.shape[2])]
            # The mirrored view's crop, measured from its own left edge (as kohya's).
            meta["flip_crop_coords_top_left"] = [crop[0], resized[1] - crop[1] - pixels.shape[2]]
        if self.buckets:
            meta["bucket"] = list(size)
        return pixels, meta

    @torch.inference_mode()
    def _encode_batch(self, good: list) -> list[dict[str, bytes]]:
        pixels = torch.stack([p for _, (p, _) in good])
        metas = [m for _, (_, m) in good]
        moments = encode_moments(self.vae, pixels, self.cfg.random_flip)
        texts = self._encode_captions([c for m in metas for c in m["captions"]])
        store = DTYPES[self.cfg.dtype]
        records, row = [], 0
        for i, ((sample, _), meta) in enumerate(zip(good, metas, strict=True)):
            tensors = {k: v[i].to(store).contiguous() for k, v in moments.items()}
            # one caption: unstacked, as always; several: stacked, one row each
            n = len(meta["captions"])
            rows = slice(row, row + n) if n > 1 else row
            row += n
            for name, value in texts.items():
                kind = torch.int32 if name.startswith("input_ids") else store
                tensors[name] = value[rows].to(kind).contiguous()
            if self.family.micro_conditioning:
                original, target = meta["original_size"], meta["target_size"]
                tensors["time_ids"] = time_ids(original, meta["crop_coords_top_left"], target)
                if self.cfg.random_flip:
                    flip = meta["flip_crop_coords_top_left"]
                    tensors["time_ids_flip"] = time_ids(original, flip, target)
            records.append(
                {
                    "__key__": sample["__key__"],
                    "safetensors": st_save(tensors),
                    "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
                }
            )
        return records

    def _encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (and text states with `cache.text_embeddings`), a row per caption."""
        out = self.text.tokenize(captions)
        if self.text.encoders is not None:
            out.update({k: v.float().cpu() for k, v in self.text.encode(out).items()})
        return out


def model_key(model: Path, cfg: CacheConfig, vae_config, dtype: torch.dtype) -> dict:
    """Everything besides the input shard that changes what is cached."""
    family = family_of(model)
    key = {
        "vae": vae_sha256(model, cfg),
        "tokenizer": weights_sha256(model, "tokenizer"),
        "scaling_factor": vae_config.scaling_factor,
        "resolution": cfg.resolution,
        "crop": "center" if cfg.center_crop else f"random:{cfg.seed}",
        "random_flip": cfg.random_flip,
        "interpolation": cfg.image_interpolation_mode,
        "dtype": cfg.dtype,
        "vae_dtype": str(dtype),
    }
    if cfg.text_embeddings:
        key["text_encoder"] = weights_sha256(model, "text_encoder")
    if family.name != "sd":  # (SD 1.x/2.x keys stay as they were)
        key["family"] = family.name
        for tok, enc in family.text_parts[1:]:
            key[tok] = weights_sha256(model, tok)
            if cfg.text_embeddings:
                key[enc] = weights_sha256(model, enc)
        if family.micro_conditioning:
            key["micro_conditioning"] = "original,crop,target;flip:mirrored-crop"
    return key


def decode_record(sample: dict[str, bytes]) -> Image.Image:
    """The RGB image of a packed record (pack wrote it, so it is already RGB)."""
    data = next(v for k, v in sample.items() if k in ("png", "jpg", "webp"))
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of `step`, the largest area up to
    resolution² for each width, aspect ratio at most `max_aspect` (kohya's and
    SimpleTuner's scheme). Always holds the square (resolution, resolution)."""
    area = resolution * resolution
    found = {(resolution, resolution)}
    for w in range(step, int(resolution * max_aspect**0.5) + step, step):
        h = area // w // step * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            found |= {(w, h), (h, w)}
    return sorted(found)


def downscale_factor(model: Path, vae_config) -> int:
    """How much smaller than the image the UNet's deepest feature map is: the VAE's
    downscaling times the UNet's (SD 1.x/2.x: 8 x 8 = 64; the tiny demo: 4 x 2 = 8)."""
    family = family_of(model)
    denoiser = json.loads((Path(model) / family.denoiser / "config.json").read_text())
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if family.denoiser == "transformer":  # its patches; FLUX packs 2x2 of them
        return factor * denoiser.get("patch_size", 1) * (2 if family.packed else 1)
    return factor * 2 ** (len(denoiser["block_out_channels"]) - 1)


def bucket_step(model: Path, cfg: CacheConfig, vae_config) -> int:
    """The bucket side step: `cache.bucket_step`, or the model's downscale factor when it
    is null. ConfigError naming a step that works when the given one does not."""
    factor = downscale_factor(model, vae_config)
    step = cfg.bucket_step or factor
    fits = step % factor == 0 and step <= cfg.resolution
    if not fits:
        works = factor if factor <= cfg.resolution else None
        advice = (
            f"{works} works here (or leave it null: the model's own)"
            if works
            else f"raise cache.resolution to at least {factor}"
        )
        raise ConfigError(
            f"cache.bucket_step {step}: must be a multiple of {factor} (this model's VAE and "
            f"UNet downscaling) and at most cache.resolution ({cfg.resolution}); {advice}"
        )
    return step


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) the image's; ties go to
    the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def preprocess(
    image: Image.Image,
    cfg: CacheConfig,
    key: str,
    size: tuple[int, int] | None = None,
    resized: bool = False,
) -> tuple:
    """The recipe's transforms: resized (`image_interpolation_mode`) to cover `size`
    (width, height; default the `resolution` square, i.e. the shortest side to
    `resolution`), center or seeded random crop to `size`, to [-1, 1]. Returns the
    CHW tensor and (top, left) of the crop (and, with `resized`, the resized image's
    (height, width))."""
    bw, bh = size or (cfg.resolution, cfg.resolution)
    scale = max(bw / image.width, bh / image.height)
    w, h = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    image = image.resize((w, h), INTERPOLATION[cfg.image_interpolation_mode])
    if cfg.center_crop:
        top, left = int(round((h - bh) / 2.0)), int(round((w - bw) / 2.0))
    else:
        rng = np.random.default_rng([cfg.seed, int(key[:15], 16)])
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    image = image.crop((left, top, left + bw, top + bh))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return (pixels, (top, left), (h, w)) if resized else (pixels, (top, left))


@torch.inference_mode()
def encode_moments(vae, pixels: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
    """VAE posterior mean and logvar (and those of the mirrored images when `flip`)."""
    out = {}
    views = {"": pixels, "_flip": torch.flip(pixels, dims=[3])} if flip else {"": pixels}
    for suffix, view in views.items():
        dist = vae.encode(view.to(vae.device, vae.dtype)).latent_dist
        out["mean" + suffix] = dist.mean.float().cpu()
        out["logvar" + suffix] = dist.logvar.float().cpu()
    return out
