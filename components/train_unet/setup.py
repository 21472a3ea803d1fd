"""Everything a run needs before its first step: checks, models, optimizer.

`check_environment` runs before any work, so a setting that cannot work here (fp16 or
xformers without CUDA, a missing optional package, a resume path that does not
exist) costs the user one line and exit status 2, not a model load.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from components.common.conditioning import TextEncoders
from components.common.config import TrainConfig
from components.common.errors import ConfigError, T2IError
from components.common.families import family_of
from components.common.models import (
    check_model_dir,
    load_noise_scheduler,
    load_unet,
    weights_sha256,
)
from components.common.records import LatentManifest
from components.train_unet import lora

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The objectives the recipe trains (upstream raises on any other prediction type).
TRAINABLE_PREDICTIONS = ("epsilon", "v_prediction")
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch`


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `mixed_precision` settled: the key's value, or when it is null the
    launcher's (`accelerate launch --mixed_precision`, `accelerate config`), else "no".
    ConfigError when the key and the launcher disagree (neither silently wins)."""
    launcher = os.environ.get(LAUNCHER_PRECISION, "").strip().lower() or None
    if cfg.mixed_precision is None:
        if launcher not in (None, "no", "fp16", "bf16"):
            raise ConfigError(
                f"the launcher asks for mixed precision {launcher!r}; train.mixed_precision "
                "supports no, fp16 and bf16: set one of them"
            )
        return cfg.model_copy(update={"mixed_precision": launcher or "no"})
    if launcher is not None and launcher != cfg.mixed_precision:
        raise ConfigError(
            f"train.mixed_precision is {cfg.mixed_precision!r} but the launcher asks for "
            f"{launcher!r} (accelerate launch --mixed_precision, or `accelerate config`); "
            "make them agree, or set train.mixed_precision: null to take the launcher's"
        )
    return cfg


def check_environment(cfg: TrainConfig, cuda: bool | None = None) -> None:
    """ConfigError for settings that cannot run on this machine or with these packages."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if cfg.enable_xformers_memory_efficient_attention:
        if not cuda:
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention needs a CUDA GPU; "
                "PyTorch SDPA attention is used without it"
            )
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install '.[gpu]')"
            )
    if cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.use_8bit_adam: bitsandbytes is not installed (pip install '.[adam8bit]')"
        )
    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to=wandb: wandb is not installed (pip install wandb)")
    resume = cfg.resume_from_checkpoint
    if resume not in (None, "latest") and not (Path(resume) / "COMMITTED").is_file():
        raise ConfigError(f"train.resume_from_checkpoint {resume!r}: no committed checkpoint there")


def resolve_model(cfg: TrainConfig, stage_model: Path) -> tuple[Path, Path]:
    """(model folder, folder whose `unet/` is trained). The second differs only for a hub
    model with `non_ema_revision` (with `use_ema`): the recipe trains that revision's
    UNet while the EMA starts from `revision`'s."""
    name = cfg.pretrained_model_name_or_path
    if name is None or Path(name).is_dir():
        if cfg.non_ema_revision:
            raise ConfigError(
                "train.non_ema_revision needs a hub model in pretrained_model_name_or_path; "
                "a local folder has no revisions"
            )
        model = check_model_dir(Path(stage_model if name is None else name))
        family_of(model, "train.pretrained_model_name_or_path" if name else "--model")
        return model, model
    model = _download(name, cfg.revision)
    family_of(model, "train.pretrained_model_name_or_path")
    if cfg.non_ema_revision:
        return model, _download(name, cfg.non_ema_revision, ["unet/*", "model_index.json"])
    return model, model


def _download(name: str, revision: str | None, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no access
        raise T2IError(
            f"train.pretrained_model_name_or_path {name!r} (revision {revision}): cannot "
            f"download ({type(e).__name__}); offline (HF_HUB_OFFLINE=1) only cached models load"
        ) from None


@dataclass
class Models:
    unet: torch.nn.Module
    text: TextEncoders  # the family's tokenizers and frozen text encoders
    noise_scheduler: object
    ema: object | None
    empty_prompt: dict[str, torch.Tensor] | None


def load_models(
    cfg: TrainConfig, model: Path, trained_unet: Path, device, latents_manifest: LatentManifest
) -> Models:
    """The trainable UNet (from `trained_unet`'s folder), its EMA (from `model`'s), the
    frozen text encoder and the noise scheduler. T2IError when the latents were made
    with another VAE than this model's."""
    cached_vae = latents_manifest.model.get("vae")
    other_vae = latents_manifest.cache_config.get("pretrained_vae_model_name_or_path")
    if cached_vae and (model / "vae").is_dir() and not other_vae:
        if weights_sha256(model, "vae") != cached_vae:
            raise T2IError(
                f"the latents were encoded with another VAE than {model}'s; re-run `t2i "
                "cache` with this model"
            )
    family = family_of(model)
    if cfg.dream_training and family.micro_conditioning:
        raise ConfigError(
            f"train.dream_training: not for {family.label} (its UNet needs the pooled text "
            "and size conditioning DREAM's extra pass does not give it); turn it off"
        )
    # `variant` (e.g. fp16-rounded weights) is for the frozen parts only, as upstream:
    # a full fine-tune trains the full-precision UNet; LoRA's UNet is frozen.
    variant = {"variant": cfg.variant} if cfg.variant else {}
    noise_scheduler = training_scheduler(model, cfg)
    dtype = WEIGHT_DTYPES.get(cfg.mixed_precision, torch.float32)
    # With cached text states (and no tag shuffling) no step runs a text encoder: they
    # are loaded only for the empty prompt's states, then let go.
    cached = latents_manifest.cache_config.get("text_embeddings") and not cfg.shuffle_caption
    encoders = not cached or bool(cfg.proportion_empty_prompts)
    text = TextEncoders.load(model, encoders=encoders, device=device, dtype=dtype, **variant)
    unet = load_unet(trained_unet, **(variant if cfg.lora_rank else {}))
    from diffusers.training_utils import EMAModel

    ema = None
    if cfg.lora_rank:
        if dtype != torch.float32:  # the frozen base in the compute dtype; the adapter fp32
            unet.to(dtype)
        lora.add_adapter(unet, cfg)
        if cfg.use_ema:  # an EMA of the adapter's parameters
            ema = EMAModel(lora.trainable(unet), foreach=cfg.foreach_ema)
    elif cfg.use_ema:
        ema_unet = load_unet(model, **variant)
        ema = EMAModel(
            ema_unet.parameters(),
            model_cls=type(ema_unet),
            model_config=ema_unet.config,
            foreach=cfg.foreach_ema,
        )
    if ema is not None:
        ema.to("cpu" if cfg.offload_ema else device)
        if cfg.offload_ema and torch.cuda.is_available():
            ema.pin_memory()
    empty = None
    if cfg.proportion_empty_prompts:  # the empty caption's ids and text states, as upstream
        ids = text.tokenize([""])
        states = text.encode(ids)
        empty = {k: v[0] for k, v in ids.items()}
        empty |= {k: v[0].float().cpu() for k, v in states.items()}
    if cached:
        text.encoders = None
    return Models(unet, text, noise_scheduler, ema, empty)


def training_scheduler(model: Path, cfg: TrainConfig):
    """The base model's noise scheduler with `train.prediction_type` applied. ConfigError
    when the resulting objective is one the recipe cannot train (e.g. `sample`)."""
    family = family_of(model)
    check_objective(cfg, family)
    noise_scheduler = load_noise_scheduler(model)
    if family.objective == "flow":
        return noise_scheduler
    if cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in TRAINABLE_PREDICTIONS:
        raise ConfigError(
            f"{model}/scheduler: prediction_type {prediction!r} cannot be trained by this "
            "recipe (epsilon or v_prediction); set train.prediction_type"
        )
    if cfg.dream_training and prediction != "epsilon":
        raise ConfigError(
            f"train.dream_training works on the epsilon target only (as diffusers'), and this "
            f"run's is {prediction}: set train.prediction_type: epsilon or turn DREAM off"
        )
    return noise_scheduler


# Flags of one objective that the other does not have (the diffusers scripts' split).
_DENOISING_ONLY = {
    "prediction_type": None, "snr_gamma": None, "noise_offset": 0.0,
    "input_perturbation": 0.0, "dream_training": False, "timestep_bias_strategy": "none",
}  # fmt: skip
_FLOW_ONLY = {"weighting_scheme": None, "precondition_outputs": None, "guidance_scale": None}


def check_objective(cfg: TrainConfig, family) -> None:
    """ConfigError naming a train key the family's objective has no use for (set, it
    would silently do nothing)."""
    other = _DENOISING_ONLY if family.objective == "flow" else _FLOW_ONLY
    kind = "flow matching" if family.objective == "flow" else "the denoising objective"
    for key, off in other.items():
        if getattr(cfg, key) != off:
            raise ConfigError(
                f"train.{key}: not used by {kind}, which {family.label} trains with; "
                f"remove it (or set it to {off!r})"
            )


def make_optimizer(cfg: TrainConfig, params, lr: float, device) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyper-parameters: bitsandbytes 8-bit when asked, else
    PyTorch's fused kernel where the device has one (same update, fewer launches)."""
    kwargs = dict(
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(params, fused=fused, **kwargs)
