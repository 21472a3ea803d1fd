"""Model families: which kinds of base model the pipeline trains, read from the model.

A diffusers folder says what it is in `model_index.json` (`_class_name`, the pipeline
class). Stages ask `family_of(model)` and never branch on model names; what differs
between families is here and in `conditioning.py` (what conditions the denoiser):

- **sd** (SD 1.x/2.x): one CLIP tokenizer and text encoder; the UNet is conditioned
  on the encoder's last hidden states.
- **sdxl**: two tokenizers and encoders (CLIP ViT-L, OpenCLIP bigG with projection);
  the UNet takes both encoders' penultimate hidden states concatenated, and, as
  `added_cond_kwargs`, the second's pooled embedding (`text_embeds`) and six
  micro-conditioning numbers (`time_ids`: original size, crop top-left, target size).
- **sd3** (SD3/3.5, MMDiT): two CLIPs with projection and T5; the transformer takes the
  CLIPs' penultimate states concatenated, zero-padded to T5's width and followed by
  T5's states, and both pooled embeddings concatenated (`pooled_projections`); it is
  trained by flow matching (`flow.py`).

- **flux** (FLUX.1): CLIP (its pooled output) and T5 (its states, 512 tokens); the
  transformer takes the latents packed in 2x2 patches with position ids, and a
  guidance embedding when the model is guidance-distilled (dev); flow matching.

A further family (FLUX.2) adds a `Family` here and its text and denoiser inputs in
`conditioning.py`; the stages call the same functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.common.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    label: str
    # (tokenizer, text encoder) subfolders, in the order their outputs are used
    text_parts: tuple[tuple[str, str], ...]
    # the Hub tags its fine-tunes get
    tags: tuple[str, ...]
    # SDXL's size and crop micro-conditioning (`time_ids`)
    micro_conditioning: bool = False
    # the pooled text embedding conditions the denoiser too (`text_embeds`)
    pooled: bool = False
    # the denoiser's subfolder (and attribute of the pipeline): unet or transformer
    denoiser: str = "unet"
    # denoising (epsilon / v, DDPM) or flow (flow matching, `flow.py`)
    objective: str = "denoising"
    # the text encoders' transformers classes, in `text_parts` order
    encoders: tuple[str, ...] = ("CLIPTextModel",)
    # T5's token length (the SD3 script's --max_sequence_length)
    max_sequence_length: int = 77
    # the flow scripts' defaults: weighting_scheme, precondition_outputs
    weighting_scheme: str = "none"
    precondition_outputs: bool = False
    # FLUX: latents packed in 2x2 patches for the transformer, with position ids and
    # (guidance-distilled models) a guidance embedding
    packed: bool = False

    @property
    def token_names(self) -> tuple[str, ...]:
        """Per caption: the token ids cached for each tokenizer."""
        return tuple(
            "input_ids" + ("" if i == 0 else f"_{i + 1}") for i in range(len(self.text_parts))
        )

    @property
    def caption_tensors(self) -> dict[str, int]:
        """Per caption, what a cached sample holds, and how many dimensions one has."""
        found = {name: 1 for name in self.token_names}
        found["encoder_hidden_states"] = 2
        if self.pooled:
            found["text_embeds"] = 1
        return found

    def pipeline(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)


SD = Family(
    "sd",
    "StableDiffusionPipeline",
    "Stable Diffusion 1.x/2.x",
    (("tokenizer", "text_encoder"),),
    ("stable-diffusion", "stable-diffusion-diffusers"),
)
SDXL = Family(
    "sdxl",
    "StableDiffusionXLPipeline",
    "Stable Diffusion XL",
    (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    micro_conditioning=True,
    pooled=True,
    encoders=("CLIPTextModel", "CLIPTextModelWithProjection"),
)
SD3 = Family(
    "sd3",
    "StableDiffusion3Pipeline",
    "Stable Diffusion 3/3.5",
    (
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
        ("tokenizer_3", "text_encoder_3"),
    ),  # fmt: skip
    ("sd3", "sd3-diffusers"),
    pooled=True,
    denoiser="transformer",
    objective="flow",
    encoders=("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
    weighting_scheme="logit_normal",
    precondition_outputs=True,
)
FLUX = Family(
    "flux",
    "FluxPipeline",
    "FLUX.1",
    (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    ("flux", "flux-diffusers"),
    pooled=True,
    denoiser="transformer",
    objective="flow",
    encoders=("CLIPTextModel", "T5EncoderModel"),
    max_sequence_length=512,
    packed=True,
)
FAMILIES = {f.pipeline_class: f for f in (SD, SDXL, SD3, FLUX)}
BY_NAME = {f.name: f for f in FAMILIES.values()}


def known_family(model: Path) -> Family | None:
    """The family of a folder whose pipeline class this pipeline trains, else None (no
    error: for callers with an SD default)."""
    return FAMILIES.get(pipeline_class(model) or "")


def pipeline_class(model: Path) -> str | None:
    """The pipeline class a diffusers folder names, or None without model_index.json."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except ValueError:
        return None


def family_of(model: Path, key: str = "model.source") -> Family:
    """The family of the diffusers folder `model`. ConfigError naming `key`, the
    pipeline class and what is supported, for a model this pipeline cannot train."""
    name = pipeline_class(model)
    found = FAMILIES.get(name or "")
    if found is None:
        supported = ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES.values())
        raise ConfigError(
            f"{key}: {model} is a {name or 'model without a pipeline class'}; this pipeline "
            f"trains {supported}"
        )
    needed = [p for pair in found.text_parts for p in pair] + [found.denoiser, "vae", "scheduler"]
    missing = [p for p in needed if not (Path(model) / p).is_dir()]
    if missing:
        raise ConfigError(
            f"{key}: {model} names {name} in model_index.json but lacks "
            f"{', '.join(missing)}; it is not a complete {found.label} folder"
        )
    return found
