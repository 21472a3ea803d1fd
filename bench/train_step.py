"""Training-step benchmark: our step on cached latents vs the upstream recipe's step.

(a) ours: latents drawn from cached VAE moments + text encoder + UNet fwd/bwd + AdamW
    (the very `training_loss`, random draws and fused AdamW that `t2i train` runs);
(b) upstream `train_text_to_image.py` per-step work: VAE encode of the pixels + text
    encoder + the same UNet step.
Same models (random init), same batch, same run. Prints one JSON line per variant and
a table; `--json FILE` writes them all.

    python bench/train_step.py --model tiny --resolution 128            # CPU
    python bench/train_step.py --model mini --resolution 128            # CPU
    python bench/train_step.py --model sd15 --device cuda --dtype bf16 --batch 8 16 32 \
        --variants base upstream plain_adam xformers channels_last grad_ckpt compile

Variants other than `upstream` are ours with one change: `plain_adam` uses the
recipe's (unfused) AdamW; `lora` trains a rank `--lora-rank` adapter on the frozen
UNet (held in `--dtype`), as `train.lora_rank` does; the others add one switch.
Each row says how many parameters train and what their fp32 state costs (weights,
gradients, AdamW moments): the memory LoRA saves, on any device.

    python bench/train_step.py --model mini --resolution 128 --variants base lora upstream
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.common.config import TrainConfig  # noqa: E402
from components.train_unet import StepDraws, training_loss  # noqa: E402
from components.train_unet.lora import add_adapter, trainable  # noqa: E402
from components.train_unet.setup import make_optimizer  # noqa: E402

SD15_TFLOP_PER_SAMPLE = 2.41  # fwd+bwd of the SD 1.5 UNet at 64x64x4 latents
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM

MODELS = {
    # The tiny default model's shapes (components/base_model/tiny.py).
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
        ),
    ),
    # SD 1.5's block structure, scaled down.
    "mini": dict(
        unet=dict(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            cross_attention_dim=256,
            attention_head_dim=8,
        ),
        vae=dict(
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        text=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_attention_heads=4,
            num_hidden_layers=4,
            vocab_size=49408,
        ),
    ),
    # SD 1.5 architecture (random weights).
    "sd15": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
        ),
    ),
}


def build(name: str, device: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
        text = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **spec["text"]))
    sched = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return unet, vae.requires_grad_(False).eval(), text.requires_grad_(False).eval(), sched


def upstream_loss(unet, vae, text, sched, pixels, ids, gen, device):
    """The recipe's step: encode pixels every step, then the same objective."""
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        states = text(ids, return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=gen, device=device)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen, device=device)
    noisy = sched.add_noise(latents.float(), noise, t)
    pred = unet(noisy, t, states, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise.float())


def time_variant(args, models, variant: str, batch: int) -> dict:
    unet, vae, text, sched = models
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    r = args.resolution
    lat = r // 8 if len(vae.config.block_out_channels) == 4 else r // 2
    pixels = torch.randn(batch, 3, r, r, device=device, dtype=dtype)
    ids = torch.randint(0, text.config.vocab_size, (batch, 77), device=device)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    cached = {"mean": dist.mean.float(), "logvar": dist.logvar.float(), "input_ids": ids}
    if variant == "lora":
        unet = lora_unet(unet, args.lora_rank, dtype)
    params = trainable(unet)
    if variant in ("upstream", "plain_adam"):  # the recipe's torch.optim.AdamW defaults
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:  # what `t2i train` builds (fused AdamW)
        opt = make_optimizer(TrainConfig(learning_rate=1e-5), params, 1e-5, device)
    step_unet = unet
    if variant == "compile":
        step_unet = torch.compile(unet)

    def one_step(i):
        gen = torch.Generator(device=device).manual_seed(i)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            if variant == "upstream":
                loss = upstream_loss(step_unet, vae, text, sched, pixels, ids, gen, device)
            else:
                loss = training_loss(
                    step_unet,
                    text,
                    sched,
                    cached,
                    StepDraws(0, i, slice(0, batch), device),
                    scaling_factor=vae.config.scaling_factor,
                    global_batch=batch,
                    device=device,
                )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s, memory = measure(one_step, args.warmup, args.steps, device)
    row = {
        "model": args.model,
        "variant": variant,
        "batch": batch,
        "resolution": r,
        "latent": lat,
        "dtype": args.dtype,
        "device": device_name(device),
        "step_s": round(step_s, 4),
        "img_s": round(batch / step_s, 2),
        "trainable_params": sum(p.numel() for p in params),
        # fp32 weights + gradients + AdamW's two moments of what trains
        "train_state_mib": round(sum(p.numel() for p in params) * 16 / 2**20, 1),
    }
    row.update(memory)
    if device == "cuda" and args.model == "sd15" and lat == 64:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in row["device"]), None)
        if peak:
            row["mfu"] = round(row["img_s"] * SD15_TFLOP_PER_SAMPLE / peak, 3)
    return row


def measure(one_step, warmup: int, steps: int, device: str) -> tuple[float, dict]:
    """The median seconds of `steps` calls of `one_step(i)` after `warmup` of them, and
    the peak memory (CUDA: allocated since the first; CPU: the process's RSS)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        one_step(i)
    sync()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        one_step(warmup + i)
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        memory = {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    else:
        memory = {
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        }
    return statistics.median(times), memory


def lora_unet(unet, rank: int, dtype):
    """A copy of `unet`, frozen in `dtype`, with the rank-`rank` adapter `t2i train` adds."""
    import copy

    unet = copy.deepcopy(unet).to(dtype)
    add_adapter(unet, TrainConfig(lora_rank=rank))
    return unet


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()}"


def apply(models, variant: str):
    """Model-level switches, applied cumulatively only where the variant asks."""
    unet = models[0]
    if variant == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif variant == "channels_last":
        unet.to(memory_format=torch.channels_last)
    elif variant == "grad_ckpt":
        unet.enable_gradient_checkpointing()


def reset(models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = models[0]
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.contiguous_format)
    unet.disable_gradient_checkpointing()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="mini")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["base", "upstream"])
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    models = build(args.model, args.device)
    models[1].to(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    models[2].to(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    rows = []
    for batch in args.batch:
        for variant in args.variants:
            reset(models)
            try:
                apply(models, variant)
                row = time_variant(args, models, variant, batch)
            except Exception as e:  # noqa: BLE001 - one failed variant must not lose the rest
                row = {
                    "model": args.model,
                    "variant": variant,
                    "batch": batch,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {r["batch"]: r for r in rows if r.get("variant") == "upstream" and "img_s" in r}
    for r in rows:
        if "img_s" in r and r["batch"] in base:
            r["vs_upstream"] = round(r["img_s"] / base[r["batch"]]["img_s"], 2)
        print(
            f"{r['model']:5} b={r['batch']:<3} {r['variant']:14} "
            + (
                f"{r['img_s']:8.2f} img/s  x{r.get('vs_upstream', '-')}"
                if "img_s" in r
                else r.get("error", "")
            )
        )


if __name__ == "__main__":
    main()
