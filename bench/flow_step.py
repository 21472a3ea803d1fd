"""Flow-matching training step (SD3/SD3.5, FLUX.1): ours on cached latents and cached
text states vs the diffusers scripts' step.

(a) ours: latents from cached VAE moments, the cached T5/CLIP states, the transformer
    fwd/bwd, fused AdamW: the very `training_loss` (flow branch) `t2i train` runs; no
    text encoder and no VAE is on the device.
(b) upstream (`train_dreambooth_sd3.py`, `train_dreambooth_lora_flux.py` with per-image
    captions): the VAE encodes the pixels and the text encoders (T5-XXL and the CLIPs,
    frozen on the device) encode the captions every step; the density, σ, weighting and
    loss through `diffusers.training_utils`; the same transformer; torch's AdamW.
Same transformer (random init), same batch, same run; `--lora-rank R` trains the same
rank-R adapter on the transformer frozen in `--dtype` for both. One JSON line per row.

    python bench/flow_step.py --model tiny-flux --resolution 32          # CPU check
    python bench/flow_step.py --model sd35m --device cuda --dtype bf16 --resolution 1024 \
        --batch 1 4 --grad-ckpt
    python bench/flow_step.py --model flux --device cuda --dtype bf16 --resolution 1024 \
        --batch 1 2 --lora-rank 16 --grad-ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.common.conditioning import TextEncoders, predict  # noqa: E402
from components.common.config import TrainConfig  # noqa: E402
from components.common.families import FLUX, SD3  # noqa: E402
from components.common.flow import FlowObjective, Schedule  # noqa: E402
from components.train_unet import StepDraws, training_loss  # noqa: E402
from components.train_unet.lora import add_adapter, trainable  # noqa: E402
from components.train_unet.setup import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import measure  # noqa: E402

T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
              feed_forward_proj="gated-gelu", vocab_size=32128)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
              num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")  # fmt: skip
VAE_16 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
              use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)  # fmt: skip
TRANSFORMERS = {
    # SD3.5 medium: 24 MMDiT-X blocks of 24 64-wide heads, dual attention in 0-12, qk norms
    "sd35m": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048,
                  pos_embed_max_size=384, qk_norm="rms_norm",
                  dual_attention_layers=tuple(range(13))),  # fmt: skip
    # FLUX.1 dev: 19 double and 38 single blocks, width 3072, the guidance embedding
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}  # fmt: skip


def build_transformer(name: str, device: str):
    """(family, transformer, scheduler, vae factor): the real sizes at random init, or
    the `tiny-*` demos' (their own builders)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )

    torch.manual_seed(0)
    if name.startswith("tiny-"):
        pipe = _tiny(name)
        return (
            (FLUX if name == "tiny-flux" else SD3),
            pipe.transformer.to(device),
            pipe.scheduler,
            4,
        )
    family = FLUX if name == "flux" else SD3
    cls = FluxTransformer2DModel if name == "flux" else SD3Transformer2DModel
    with torch.device(device):
        transformer = cls(**TRANSFORMERS[name])
    extra = (
        dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15) if name == "flux" else {}
    )
    return family, transformer, FlowMatchEulerDiscreteScheduler(shift=3.0, **extra), 8


def build_upstream_parts(name: str, device: str, dtype):
    """The VAE and the frozen text encoders the scripts keep on the device."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(1)
    if name.startswith("tiny-"):
        pipe = _tiny(name)
        family = FLUX if name == "tiny-flux" else SD3
        encoders = TextEncoders.of_pipeline(pipe, family).encoders
        vae = pipe.vae
    else:
        with torch.device(device):
            vae = AutoencoderKL(in_channels=3, out_channels=3, **VAE_16)
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            if name == "flux":
                encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), t5]
            else:
                encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), t5]  # fmt: skip
    encoders = [e.to(device, dtype).requires_grad_(False).eval() for e in encoders]
    return vae.to(device, dtype).requires_grad_(False).eval(), encoders


def _tiny(name: str):
    from components.base_model.tiny import build_tiny_flux, build_tiny_sd3

    return build_tiny_flux(0) if name == "tiny-flux" else build_tiny_sd3(0)


def ids_for(family, encoders, batch: int, device) -> dict[str, torch.Tensor]:
    """Random token ids of the lengths the scripts pad to (CLIP 77, T5 the family's)."""
    out = {}
    for name, enc, kind in zip(family.token_names, encoders, family.encoders, strict=True):
        length = family.max_sequence_length if kind.startswith("T5") else 77
        out[name] = torch.randint(0, enc.config.vocab_size, (batch, length), device=device)
    return out


def cached_batch(family, transformer, batch: int, lat: int, device) -> dict[str, torch.Tensor]:
    """What `t2i cache` stores per sample: the VAE's moments, the text states."""
    cfg = transformer.config
    channels = cfg.in_channels // 4 if family.packed else cfg.in_channels
    # FLUX: T5's states; SD3: the CLIPs' 77 (side by side, padded to T5's width), then T5's
    seq = family.max_sequence_length + (0 if family.packed else 77)
    g = torch.Generator(device=device).manual_seed(2)
    return {
        "mean": torch.randn(batch, channels, lat, lat, generator=g, device=device),
        "logvar": torch.full((batch, channels, lat, lat), -4.0, device=device),
        "encoder_hidden_states": torch.randn(
            batch, seq, cfg.joint_attention_dim, generator=g, device=device
        ),  # fmt: skip
        "text_embeds": torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device),
    }


def upstream_loss(family, transformer, sched, vae, text, pixels, ids, flow, step, device):
    """The scripts' step: encode pixels and captions, then the objective as they write it."""
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample()
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        states = text.encode(ids)
    hidden = states["encoder_hidden_states"]
    added = {"pooled_projections": states["text_embeds"]}
    torch.manual_seed(step)
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        flow.weighting_scheme, latents.shape[0], flow.logit_mean, flow.logit_std, flow.mode_scale
    )
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices].to(device)
    sigmas = sched.sigmas[indices].to(device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = predict(family, transformer, noisy, timesteps, hidden, added, flow.guidance_scale)
    if flow.precondition_outputs:
        pred = pred * (-sigmas) + noisy
    target = latents if flow.precondition_outputs else noise - latents
    weighting = compute_loss_weighting_for_sd3(flow.weighting_scheme, sigmas)
    per = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(len(target), -1)
    return per.mean(1).mean()


def time_variant(args, family, transformer, sched, vae_factor, variant, batch, parts) -> dict:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lat = args.resolution // vae_factor
    flow = FlowObjective(weighting_scheme=family.weighting_scheme,
                         precondition_outputs=family.precondition_outputs)  # fmt: skip
    params = trainable(transformer)
    if variant == "upstream":  # the scripts' torch.optim.AdamW
        opt = torch.optim.AdamW(params, lr=1e-5)
        vae, encoders = parts
        text = TextEncoders(family, [], encoders)
        pixels = torch.randn(batch, 3, args.resolution, args.resolution, device=device,
                             dtype=dtype)  # fmt: skip
        ids = ids_for(family, encoders, batch, device)
    else:
        opt = make_optimizer(TrainConfig(learning_rate=1e-5), params, 1e-5, device)
        cached = cached_batch(family, transformer, batch, lat, device)
        text = TextEncoders(family, [], None)  # the cached states: no encoder loaded
        schedule = Schedule.of(sched, device)  # as `t2i train` indexes it

    def one_step(i):
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            if variant == "upstream":
                loss = upstream_loss(family, transformer, sched, vae, text, pixels, ids, flow, i,
                                     device)  # fmt: skip
            else:
                loss = training_loss(transformer, text, schedule, cached,
                                     StepDraws(0, i, slice(0, batch), device),
                                     scaling_factor=1.5305, shift_factor=0.0609,
                                     global_batch=batch, device=device, flow=flow)  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s, memory = measure(one_step, args.warmup, args.steps, device)
    row = {
        "model": args.model, "variant": variant, "batch": batch, "resolution": args.resolution,
        "dtype": args.dtype, "lora_rank": args.lora_rank, "grad_ckpt": args.grad_ckpt,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "step_s": round(step_s, 4), "img_s": round(batch / step_s, 3),
        "trainable_params": sum(p.numel() for p in params),
    }  # fmt: skip
    return {**row, **memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*TRANSFORMERS, "tiny-sd3", "tiny-flux"], default="tiny-sd3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["ours", "upstream"])
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    family, transformer, sched, vae_factor = build_transformer(args.model, args.device)
    if args.lora_rank:  # frozen in the compute dtype, the adapter in fp32 (as `t2i train`)
        transformer.to(dtype)
        add_adapter(transformer, TrainConfig(lora_rank=args.lora_rank))
    if args.grad_ckpt:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    rows = []
    for variant in args.variants:  # ours first: no encoder is on the device for it
        parts = (
            build_upstream_parts(args.model, args.device, dtype) if variant == "upstream" else None
        )
        for batch in args.batch:
            try:
                row = time_variant(args, family, transformer, sched, vae_factor, variant, batch,
                                   parts)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the rest
                row = {"model": args.model, "variant": variant, "batch": batch,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        del parts
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {r["batch"]: r for r in rows if r.get("variant") == "upstream" and "img_s" in r}
    for r in rows:
        if "img_s" in r and r["batch"] in base:
            r["vs_upstream"] = round(r["img_s"] / base[r["batch"]]["img_s"], 2)
        what = (
            f"{r['img_s']:8.3f} img/s  x{r.get('vs_upstream', '-')}" if "img_s" in r else r["error"]
        )
        print(f"{r['model']:9} b={r['batch']:<3} {r['variant']:9} {what}")


if __name__ == "__main__":
    main()
