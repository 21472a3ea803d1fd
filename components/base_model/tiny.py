"""A tiny Stable Diffusion pipeline, built offline from a seed.

Same block structure as SD 1.x (VAE -> 4-channel latents, cross-attention UNet,
CLIP text encoder, scaled-linear DDPM betas), small enough to train on a CPU in
seconds. The CLIP BPE tokenizer is written from the byte-level alphabet plus merges
learnt from a small fixed word list, so no download is needed.
"""

from __future__ import annotations

import torch

from components.common.tiny import MAX_TOKENS, build_tiny_tokenizer


def build_tiny_pipeline(seed: int, vae_steps: int = 0, prediction_type: str = "v_prediction"):
    """A tiny StableDiffusionPipeline; same seed, same weights. The UNet and text
    encoder are random; the VAE is pretrained for `vae_steps` steps on pictures of
    coloured shapes (0: random, so every sample decodes to noise); the scheduler names
    `prediction_type` as the model's objective."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # diffusers reads this as the number of heads: 2 heads of 16 channels (CPU SDPA
        # is slow at SD's 8 heads on 32 channels).
        attention_head_dim=2,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Three levels: 8x8x4 latents at 32 px, which the tiny UNet learns in minutes.
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        latent_channels=4,
        layers_per_block=1,
        sample_size=32,
        mid_block_add_attention=False,  # 8x8 latents: attention there costs more than it buys
    )
    if vae_steps:
        vae.register_to_config(scaling_factor=pretrain_vae(vae, seed, vae_steps))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_config(tokenizer, 32, 2))
    # Word embeddings at unit scale (CLIP's init is 0.02, the size of the position
    # embeddings): a frozen random encoder then tells "red" from "blue" clearly enough
    # for the tiny UNet to learn the prompt in a few hundred steps.
    embedding = text_encoder.embeddings.token_embedding.weight
    with torch.no_grad():
        embedding.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 4))
    # v_prediction by default (as SD 2.x's 768-v): the v target asks the UNet for the
    # clean picture at high noise, where the colours a caption names are decided, so the
    # tiny model learns to follow them in minutes; on the epsilon target it did not.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def clip_config(tokenizer, width: int, layers: int, act: str = "quick_gelu"):
    """A tiny CLIP text encoder's config for `tokenizer`: `width` wide, `layers` deep."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=width,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain_vae(vae, seed: int, steps: int, resolution: int = 32, batch: int = 16) -> float:
    """Fit the tiny VAE to pictures of coloured shapes (seeded, deterministic), so the
    default run's samples decode to pictures, not noise; return the scaling factor that
    gives its latents unit variance (stored in the VAE config, as SD's 0.18215)."""
    import numpy as np
    import torch.nn.functional as F

    from components.common.shapes import random_pictures

    pool = (
        torch.from_numpy(
            np.stack(
                [np.asarray(p, dtype=np.float32) for p in random_pictures(1024, resolution, seed)]
            )
        ).permute(0, 3, 1, 2)
        / 127.5
        - 1.0
    )
    g = torch.Generator().manual_seed(seed + 3)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for _ in range(steps):
        x = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(pool[:256]).latent_dist.mean.std())
    return 1.0 / std


def build_tiny_sdxl(
    seed: int,
    vae_steps: int = 0,
    prediction_type: str = "epsilon",
    widths: tuple[int, int] = (32, 32),
):
    """A tiny StableDiffusionXLPipeline with SDXL's layout, from a seed: a UNet with
    `text_time` added conditioning (pooled text + six size/crop ids), two text encoders
    (CLIP, and CLIP with projection, of `widths`) whose penultimate states are
    concatenated as its cross-attention input, a VAE that upcasts to fp32, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    sd = build_tiny_pipeline(seed, vae_steps, prediction_type)  # its VAE
    sd.vae.register_to_config(force_upcast=True)
    time_dim, pooled = 8, widths[1]
    torch.manual_seed(seed + 5)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
        cross_attention_dim=sum(widths),
    )

    # Three layers: the penultimate one is what conditions the UNet.
    torch.manual_seed(seed + 6)
    text_encoder = CLIPTextModel(clip_config(tokenizer, widths[0], 3, "gelu"))
    torch.manual_seed(seed + 7)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer, widths[1], 3, "gelu"))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=sd.vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3(seed: int, vae_steps: int = 0):
    """A tiny StableDiffusion3Pipeline with SD3's layout, from a seed: an MMDiT
    (`SD3Transformer2DModel`, patch 1) on the tiny VAE (given a shift factor, as SD3's
    16-channel VAE has), two CLIPs with projection and a T5 encoder (offline
    tokenizers), and SD3's flow-matching Euler scheduler (shift 3)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from components.common.tiny import build_tiny_t5_tokenizer

    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    sd = build_tiny_pipeline(seed, vae_steps, "epsilon")  # its VAE
    sd.vae.register_to_config(shift_factor=0.1)
    width, t5_width = 32, 64  # T5 at least the CLIPs' joint width, as SD3's (4096 > 2048)
    torch.manual_seed(seed + 8)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=2 * width,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 9)
    clip_1 = CLIPTextModelWithProjection(clip_config(tokenizer, width, 3, "gelu"))
    torch.manual_seed(seed + 10)
    clip_2 = CLIPTextModelWithProjection(clip_config(tokenizer, width, 3, "gelu"))
    torch.manual_seed(seed + 11)
    t5 = tiny_t5(t5_tokenizer, t5_width)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=sd.vae,
        text_encoder=clip_1,
        tokenizer=tokenizer,
        text_encoder_2=clip_2,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_flux(seed: int, vae_steps: int = 0, guidance: bool = True):
    """A tiny FluxPipeline with FLUX.1's layout, from a seed: a transformer of one
    double and one single block on 2x2-packed latents, with a guidance embedding (as
    the guidance-distilled dev model; `guidance=False`: as schnell), CLIP (pooled) and
    T5 (states), the tiny VAE with a shift factor, flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from components.common.tiny import build_tiny_t5_tokenizer

    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    sd = build_tiny_pipeline(seed, vae_steps, "epsilon")  # its VAE
    sd.vae.register_to_config(shift_factor=0.1)
    width, t5_width = 32, 32
    torch.manual_seed(seed + 12)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # the VAE's 4 channels, 2x2-packed
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=width,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 13)
    clip = CLIPTextModel(clip_config(tokenizer, width, 2))
    torch.manual_seed(seed + 14)
    t5 = tiny_t5(t5_tokenizer, t5_width)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=sd.vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def tiny_t5(tokenizer, width: int):
    """A tiny T5 encoder for `tokenizer` (two layers, four heads of width/4)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_ff=2 * width,
            d_kv=width // 4,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
