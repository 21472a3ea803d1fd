"""A tiny Stable Diffusion pipeline, built offline from a seed.

Same block structure as SD 1.x (VAE -> 4-channel latents, cross-attention UNet,
CLIP text encoder, scaled-linear DDPM betas), small enough to train on a CPU in
seconds. The CLIP BPE tokenizer is written from the byte-level alphabet plus merges
learnt from a small fixed word list, so no download is needed.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import torch

MAX_TOKENS = 77
_WORDS = (
    "a an the on of in with and background image photo picture "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star diamond ellipse rectangle shape small large big "
    "dark light bright colored coloured painting drawing of on top"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over `words` (each ending in </w>); ties broken alphabetically."""
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = freq
        corpus = merged
    return merges


def build_tiny_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = _learn_merges(sorted(set(_WORDS)), n_merges=200)
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(d, "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        )
        return CLIPTokenizer(
            str(Path(d, "vocab.json")), str(Path(d, "merges.txt")), model_max_length=MAX_TOKENS
        )


def build_tiny_pipeline(seed: int):
    """A randomly initialised tiny StableDiffusionPipeline; same seed, same weights."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
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
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
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
