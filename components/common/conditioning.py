"""What conditions the denoiser, per model family: one place for cache, train and
evaluate.

- `TextEncoders`: a family's tokenizers and frozen text encoders; `tokenize` gives
  the token ids the cache stores (`input_ids`, `input_ids_2`, `input_ids_3`), `encode`
  the text states as the diffusers training scripts compute them
  (`encoder_hidden_states`, and the pooled `text_embeds`: SDXL's second encoder's;
  SD3's two CLIPs', their states padded to T5's width and followed by T5's; FLUX's
  CLIP pooled output and T5's states).
- `denoiser_inputs`: (encoder_hidden_states, the extra inputs: SDXL's
  `added_cond_kwargs`, SD3/FLUX's `pooled_projections`, or None) for a batch, from
  the cached text states or by running the encoders.
- `predict`: the denoiser called as its family's is (FLUX: packed 2x2, position ids,
  guidance).
- `time_ids`: SDXL's micro-conditioning of one sample, from the crop the cache made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.common.families import Family, family_of

T5 = "T5EncoderModel"


class TextEncoders:
    def __init__(self, family: Family, tokenizers: list, encoders: list | None):
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders

    @classmethod
    def load(
        cls, model: Path, encoders: bool = True, device=None, dtype=None, **options
    ) -> TextEncoders:
        """The tokenizers (and, with `encoders`, the frozen text encoders on `device`
        in `dtype`) of the diffusers folder `model`. `options` go to `from_pretrained`."""
        from components.common.models import check_model_dir

        family = family_of(model)
        parts = tuple(p for pair in family.text_parts for p in pair)
        check_model_dir(model, parts)
        tokenizers = [_tokenizer(Path(model), t) for t, _ in family.text_parts]
        loaded = None
        if encoders:
            loaded = []
            for i, (_, sub) in enumerate(family.text_parts):
                kind = _encoder_class(family, i)
                enc = kind.from_pretrained(model, subfolder=sub, **options)
                enc = enc.requires_grad_(False).eval()
                loaded.append(enc.to(device, dtype) if device is not None else enc)
        return cls(family, tokenizers, loaded)

    @classmethod
    def of_pipeline(cls, pipe, family: Family) -> TextEncoders:
        """The tokenizers and encoders a diffusers pipeline holds."""
        names = [(t, e) for t, e in family.text_parts]
        return cls(
            family,
            [getattr(pipe, t) for t, _ in names],
            [getattr(pipe, e) for _, e in names],
        )

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{input_ids[, input_ids_2, ...]}: a row per caption, padded to each tokenizer's
        length (CLIP's 77; T5's the family's `max_sequence_length`)."""
        out = {}
        kinds = self.family.encoders
        for name, tok, kind in zip(self.family.token_names, self.tokenizers, kinds, strict=True):
            length = self.family.max_sequence_length if kind == T5 else tok.model_max_length
            out[name] = tok(
                captions,
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            ).input_ids
        return out

    @torch.no_grad()
    def encode(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{encoder_hidden_states[, text_embeds]} for token ids as `tokenize` gives them."""
        assert self.encoders is not None, "TextEncoders loaded without encoders"
        device = self.encoders[0].device
        if not self.family.pooled:  # SD: the last hidden states, as the recipe
            (name,) = self.family.token_names
            return {"encoder_hidden_states": self.encoders[0](ids[name].to(device))[0]}
        pairs = list(zip(self.family.token_names, self.encoders, strict=True))
        if self.family.packed:  # FLUX: CLIP's pooled output, T5's states
            (n1, clip), (n2, t5) = pairs
            pooled = clip(ids[n1].to(clip.device), output_hidden_states=False).pooler_output
            return {"encoder_hidden_states": t5(ids[n2].to(t5.device))[0], "text_embeds": pooled}
        states, pooled = [], []
        clips = [(n, e) for (n, e), kind in zip(pairs, self.family.encoders, strict=True)
                 if kind != T5]  # fmt: skip
        for name, enc in clips:
            out = enc(ids[name].to(enc.device), output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
            states.append(out.hidden_states[-2])
        hidden = torch.cat(states, dim=-1)
        if self.family.name == "sdxl":  # the second encoder's pooled embedding alone
            return {"encoder_hidden_states": hidden, "text_embeds": pooled[-1]}
        # SD3: the CLIP states zero-padded to T5's width, then T5's; both pooled.
        name, t5 = pairs[-1]
        t5_states = t5(ids[name].to(t5.device))[0]
        hidden = torch.nn.functional.pad(hidden, (0, t5_states.shape[-1] - hidden.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([hidden, t5_states], dim=-2),
            "text_embeds": torch.cat(pooled, dim=-1),
        }


def _tokenizer(model: Path, sub: str):
    """CLIP's BPE tokenizer from its vocab and merges (as the recipes load it), or,
    for a folder with only `tokenizer.json`, whatever that file describes."""
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = model / sub
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(model, subfolder=sub)
    return AutoTokenizer.from_pretrained(model, subfolder=sub)


def _encoder_class(family: Family, index: int):
    import transformers

    return getattr(transformers, family.encoders[index])


def denoiser_inputs(
    family: Family, text: TextEncoders | None, batch: dict, device, dtype
) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs) of a batch: the cached text states
    when the batch holds them (`cache.text_embeddings`), else the frozen encoders'."""
    if "encoder_hidden_states" in batch:
        states = {k: batch[k] for k in ("encoder_hidden_states", "text_embeds") if k in batch}
    else:
        states = text.encode({k: batch[k] for k in family.token_names})
    hidden = states["encoder_hidden_states"].to(device, dtype, non_blocking=True)
    if family.denoiser == "transformer":  # SD3: the pooled projections
        return hidden, {"pooled_projections": states["text_embeds"].to(device, dtype)}
    if not family.micro_conditioning:
        return hidden, None
    added = {
        "text_embeds": states["text_embeds"].to(device, dtype, non_blocking=True),
        "time_ids": batch["time_ids"].to(device, dtype, non_blocking=True),
    }
    return hidden, added


def predict(family: Family, model, noisy, timesteps, hidden, added, guidance: float = 3.5):
    """The denoiser's output for `noisy` at `timesteps`, conditioned as the family's is
    (FLUX: packed, with position ids and, for a guidance-distilled model, `guidance`)."""
    if family.packed:
        return _flux(model, noisy, timesteps, hidden, added["pooled_projections"], guidance)
    if family.denoiser == "transformer":
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                     return_dict=False, **added)[0]  # fmt: skip
    extra = {"added_cond_kwargs": added} if added is not None else {}
    return model(noisy, timesteps, hidden, **extra, return_dict=False)[0]


def _flux(model, noisy, timesteps, hidden, pooled, guidance: float):
    """FLUX's call, as its training script makes it: 2x2 patches, the image's and the
    text's position ids, timestep/1000, and unpacked back to the latents' shape."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    scale = None
    if _unwrapped(model).config.guidance_embeds:
        scale = torch.full((b,), guidance, device=noisy.device, dtype=torch.float32)
    out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=scale,
                pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                img_ids=img_ids, return_dict=False)[0]  # fmt: skip
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _unwrapped(model):
    """The diffusers model inside DDP's (`module`) or torch.compile's (`_orig_mod`) wrapper."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def time_ids(
    original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
) -> torch.Tensor:
    """SDXL's six numbers: original (height, width), crop (top, left), target (height,
    width), as `StableDiffusionXLPipeline._get_add_time_ids` orders them."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
