"""Cache benchmark: VAE moments images/s, per batch size, with `t2i cache`'s own encoder.

Times `encode_moments` (VAE encode -> mean, logvar; `--flip` adds the mirrored view,
as `cache.random_flip` does) on random pixels, random-init VAE of the named
architecture, after warm-up. Prints one JSON line per batch size; `--json FILE`
writes them.

    python bench/cache.py --model mini --resolution 128 --batch 1 4 8 16 32          # CPU
    python bench/cache.py --model sd15 --resolution 512 --device cuda --dtype bf16 \
        --batch 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_step import MODELS  # noqa: E402
from components.cache_latents.encode import encode_moments  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_vae(name: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **MODELS[name]["vae"])
    return vae.requires_grad_(False).eval().to(device, dtype)


def time_batch(vae, batch: int, resolution: int, flip: bool, steps: int, warmup: int) -> dict:
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    sync = torch.cuda.synchronize if vae.device.type == "cuda" else (lambda: None)
    if vae.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        encode_moments(vae, pixels, flip)  # includes host->device and the copy back
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    row = {"batch": batch, "ms_per_batch": round(ms, 2), "img_s": round(batch / ms * 1000, 1)}
    if vae.device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def compare_dtypes(args) -> list[dict]:
    """Relative L2 error of latents (mean + std*eps) encoded in fp16/bf16 vs fp32."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    ref = encode_moments(build_vae(args.model, args.device, torch.float32), pixels, False)
    eps = torch.randn(ref["mean"].shape, generator=g)
    latent = ref["mean"] + torch.exp(0.5 * ref["logvar"]) * eps
    rows = []
    for name in ("fp16", "bf16"):
        got = encode_moments(build_vae(args.model, args.device, DTYPES[name]), pixels, False)
        other = got["mean"] + torch.exp(0.5 * got["logvar"]) * eps
        err = ((other - latent).norm() / latent.norm()).item()
        rows.append(
            {
                "bench": "cache_dtype",
                "model": args.model,
                "vae_dtype": name,
                "device": args.device,
                "latent_rel_l2_err": float(f"{err:.3g}"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="mini")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--flip", action="store_true", help="also encode the mirrored images")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compare-dtypes", action="store_true", help="fp16/bf16 vs fp32 error")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.compare_dtypes:
        rows = compare_dtypes(args)
        if args.json:
            args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    vae = build_vae(args.model, args.device, DTYPES[args.dtype])
    rows = []
    for batch in args.batch:
        row = time_batch(vae, batch, args.resolution, args.flip, args.steps, args.warmup)
        row.update(
            bench="cache",
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            resolution=args.resolution,
            flip=args.flip,
            threads=torch.get_num_threads(),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
