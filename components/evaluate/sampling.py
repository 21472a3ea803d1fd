"""Sampling for evaluation: the scheduler by name, batched generation with a fixed
seed per image, and the real held-out images with their captions.

Each image's initial noise comes from its own CPU generator seeded by (prompt, image)
index, so base and tuned, reruns, batch sizes and devices see the same noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.common.captions import split_captions
from components.common.config import EvaluateConfig
from components.common.errors import ConfigError
from components.common.records import read_pack_manifest, shard_files
from components.common.shards import read_shard

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",  # DPM++ 2M
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def use_scheduler(pipe, name: str) -> None:
    """Sample with `name`, configured from the model's own (training) scheduler."""
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)


@torch.inference_mode()
def generate(
    pipe, jobs: list[tuple[str, int]], cfg: EvaluateConfig, resolution: int
) -> list[Image.Image]:
    """One image per (prompt, seed) job, `cfg.batch_size` at a time."""
    images: list[Image.Image] = []
    for lo in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[lo : lo + cfg.batch_size]
        images += pipe(
            [prompt for prompt, _ in chunk],
            height=resolution,
            width=resolution,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
        ).images
    return images


def to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8, as torchmetrics takes images."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(
        2, 0, 1
    )


@dataclass
class HeldOut:
    captions: list[str]
    images: torch.Tensor  # (N, 3, R, R) uint8


def heldout_shortfall(cfg: EvaluateConfig, val_samples: int) -> str:
    return (
        f"evaluate.heldout_captions={cfg.heldout_captions}, but the validation split holds "
        f"{val_samples} samples; lower it to {val_samples} or less, or raise pack.val_fraction"
    )


def heldout_images(shards: Path | None, cfg: EvaluateConfig, resolution: int) -> HeldOut:
    """`cfg.heldout_captions` validation samples (drawn from `cfg.seed`), center-cropped
    and resized to `resolution`. ConfigError when the split holds fewer."""
    if shards is None:
        raise ConfigError("evaluate needs the pack output for held-out images: pass --shards")
    manifest = read_pack_manifest(shards)
    records = []
    files = shard_files(shards, [s.name for s in manifest.shards if s.split == "val"])
    for path in files.values():
        records += [(r["__key__"], r) for r in read_shard(path)]
    if len(records) < cfg.heldout_captions:
        raise ConfigError(heldout_shortfall(cfg, len(records)))
    records.sort(key=lambda kr: kr[0])
    pick = np.random.default_rng([cfg.seed, 7]).choice(
        len(records), cfg.heldout_captions, replace=False
    )
    captions, images = [], []
    for i in sorted(pick):
        record = records[i][1]
        data = next(v for k, v in record.items() if k in ("png", "jpg", "webp"))
        captions.append(split_captions(record["txt"].decode("utf-8"))[0])
        images.append(to_uint8(_square(Image.open(io.BytesIO(data)), resolution)))
    return HeldOut(captions, torch.stack(images))


def _square(image: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then resize (LANCZOS), as the cache does by default."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
