"""LoRA adapters on the UNet, through peft, as diffusers' `train_text_to_image_lora.py`.

`train.lora_rank > 0` freezes the UNet and adds a rank-r adapter to the
`lora_target_modules`; the optimizer, gradient clipping, EMA and checkpoints then see
only the adapter's parameters (`trainable`). Everything else in the loop is the same
code as full fine-tuning. The result is saved in diffusers' LoRA format, with its
peft config as metadata, so `pipeline.load_lora_weights(folder)` restores the same
alpha/rank scaling.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from components.common.config import TrainConfig
from components.common.errors import ConfigError
from components.common.models import ADAPTER_WEIGHTS, load_pipeline
from components.common.records import AdapterRecord


def lora_alpha(cfg: TrainConfig) -> float:
    return cfg.lora_alpha if cfg.lora_alpha is not None else float(cfg.lora_rank)


def add_adapter(unet: torch.nn.Module, cfg: TrainConfig) -> None:
    """Freeze `unet` and add the run's LoRA adapter (trainable, fp32). ConfigError when
    no module matches `train.lora_target_modules`."""
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(cfg.lora_target_modules),
    )
    unet.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):  # the initial adapter follows train.seed
            torch.manual_seed(cfg.seed)
            unet.add_adapter(config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"train.lora_target_modules {list(cfg.lora_target_modules)}: no such module in "
            "the UNet (usual: to_q, to_k, to_v, to_out.0; add proj_in, proj_out, ff.net.0.proj, "
            "ff.net.2 for more capacity)"
        ) from e
    for p in trainable(unet):
        p.data = p.data.float()  # the adapter trains in fp32 under mixed precision


def trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer step changes: all of them, or the adapter's."""
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of the trainable parameters (what a LoRA checkpoint holds)."""
    return {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet: torch.nn.Module, weights: dict[str, torch.Tensor], where) -> None:
    """Restore `trainable_state`; ConfigError when it is another adapter's."""
    expected = {n for n, p in unet.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ConfigError(f"{where}: holds another adapter than train.lora_* describe")
    unet.load_state_dict(weights, strict=False)


def save_adapter(unet: torch.nn.Module, folder: Path, base: Path | None = None) -> None:
    """The adapter as `folder/pytorch_lora_weights.safetensors` (diffusers format), as
    the family of `base` (default SD) saves its denoiser's LoRA."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from components.common.families import SD, family_of

    family = family_of(base) if base is not None else SD
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    part = family.denoiser
    saver = StableDiffusionPipeline if family.denoiser == "unet" else family.pipeline()
    saver.save_lora_weights(
        folder,
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
        **{f"{part}_lora_layers": layers,
           f"{part}_lora_adapter_metadata": unet.peft_config["default"].to_dict()},
    )  # fmt: skip
    canonical_header(Path(folder) / ADAPTER_WEIGHTS)


def canonical_header(path: Path) -> None:
    """Put a safetensors file's metadata in sorted order. safetensors writes it in a
    per-process hash order, so one adapter saved by two processes (a resumed run) had
    two sha256s, and the registry's dedupe on it saw two models."""
    import json
    import struct

    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # (never: the same entries, reordered)
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def save_merged(base: Path, folder: Path, ignore) -> None:
    """Beside the adapter saved in `folder`: `base` (less `ignore`) with the adapter
    merged into its UNet. Loading the adapter the way users will (`load_lora_weights`)
    also proves the file."""
    pipe = load_pipeline(folder, base)
    from components.common.models import denoiser_part

    part = denoiser_part(base)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    shutil.copytree(base, folder, dirs_exist_ok=True, ignore=ignore)
    getattr(pipe, part).save_pretrained(folder / part, safe_serialization=True)


def adapter_record(cfg: TrainConfig, base_unet_sha256: str) -> AdapterRecord:
    return AdapterRecord(
        weights=ADAPTER_WEIGHTS,
        rank=cfg.lora_rank,
        alpha=lora_alpha(cfg),
        target_modules=list(cfg.lora_target_modules),
        merged=cfg.lora_merge,
        base_unet_sha256=base_unet_sha256,
    )
