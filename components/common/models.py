"""Loading the parts of a diffusers Stable Diffusion folder, with clear errors."""

from __future__ import annotations

from pathlib import Path

from components.common.errors import T2IError

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set, read now (huggingface_hub reads it once, at import), with
    the values huggingface_hub treats as true."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def default_device() -> str:
    """CUDA when there is a GPU, else CPU: inference stages (cache, evaluate) use it."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_dir(path: Path, parts: tuple[str, ...] = PARTS) -> Path:
    """Return `path` if it is a diffusers SD folder holding `parts`, else raise T2IError."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise T2IError(
            f"{path}: not a diffusers model folder (no model_index.json); "
            "run `t2i base-model` or point --model at one"
        )
    if parts is PARTS:  # the family's denoiser (a transformer, for SD3)
        parts = tuple(denoiser_part(path) if p == "unet" else p for p in parts)
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise T2IError(f"{path}: model folder lacks {', '.join(missing)}")
    return path


# `options` go to `from_pretrained` (e.g. variant="fp16").


def load_vae(path: Path, **options):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(check_model_dir(path), subfolder="vae", **options)


def load_unet(path: Path, **options):
    """The denoiser of a pipeline folder: its UNet, or (SD3) its transformer, of the
    class `model_index.json` names."""
    import json

    import diffusers

    part = denoiser_part(path)
    index = json.loads((check_model_dir(path, (part,)) / "model_index.json").read_text())
    cls = getattr(diffusers, index.get(part, ["diffusers", "UNet2DConditionModel"])[1])
    return cls.from_pretrained(path, subfolder=part, **options)


def denoiser_part(path: Path) -> str:
    """The denoiser's subfolder: `unet`, or `transformer` for a transformer family."""
    from components.common.families import known_family

    family = known_family(path)
    return family.denoiser if family is not None else "unet"


def load_text_encoder(path: Path, **options):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(check_model_dir(path), subfolder="text_encoder", **options)


def load_tokenizer(path: Path, **options):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(check_model_dir(path), subfolder="tokenizer", **options)


def load_noise_scheduler(path: Path, **options):
    """The training scheduler: DDPM from the model's scheduler config, as the recipes
    do; a flow-matching family's own (FlowMatchEulerDiscreteScheduler, its shift)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from components.common.families import known_family

    family = known_family(path)
    flow = family is not None and family.objective == "flow"
    cls = FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler
    return cls.from_pretrained(check_model_dir(path), subfolder="scheduler", **options)


def weights_sha256(path: Path, part: str, check: bool = True) -> str:
    """Hash of one part's weights and config, independent of where the folder lives.

    Used in cache keys and receipts. Config keys that only record provenance
    (`_name_or_path`, library versions) are left out. `check=False`: `path/part` is
    a part on its own (a VAE folder), not in a pipeline folder.
    """
    import hashlib
    import json

    folder = (check_model_dir(path, (part,)) if check else Path(path)) / part
    hashes = _weights_index(folder)
    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0")
        if file.suffix == ".json":
            config = json.loads(file.read_text())
            if isinstance(config, dict):
                config = {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS}
            h.update(json.dumps(config, sort_keys=True).encode())
        else:
            h.update(hashes.sha256(file).encode())
    hashes.save()
    return h.hexdigest()


def _weights_index(folder: Path):
    """A stat index of a model part's files, kept outside the model folder (never copied
    or published with it; see `StatIndex.outside`)."""
    from components.common.stat_index import StatIndex

    return StatIndex.outside(folder)


_PROVENANCE_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version"}


# A LoRA adapter in diffusers format (`pipeline.load_lora_weights(folder)` finds it).
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"


def is_adapter(model: Path) -> bool:
    """The trained model folder holds a LoRA adapter (perhaps beside a merged pipeline)."""
    return (Path(model) / ADAPTER_WEIGHTS).is_file()


def trained_weights_sha256(model: Path) -> str:
    """The identity of what training produced: the adapter file's hash for a LoRA run,
    else the UNet's `weights_sha256`. Receipts, registries and the Hub dedupe on it."""
    from components.common.io import sha256_file

    if is_adapter(model):
        return sha256_file(Path(model) / ADAPTER_WEIGHTS)
    return weights_sha256(model, denoiser_part(model))


def load_pipeline(model: Path, base: Path | None = None, **options):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) of a
    trained model folder: the folder itself, or for a LoRA adapter `base` with the
    adapter loaded (and the run's scheduler config, which
    may set another prediction type). T2IError when `base` is missing."""
    from components.common.families import family_of

    model = Path(model)
    if not is_adapter(model):
        return family_of(model).pipeline().from_pretrained(check_model_dir(model), **options)
    if base is None:
        raise T2IError(f"{model}: a LoRA adapter; the base model it applies to is needed")
    pipe = family_of(base).pipeline().from_pretrained(check_model_dir(base), **options)
    pipe.load_lora_weights(model, weight_name=ADAPTER_WEIGHTS)
    trained = model / "scheduler" / "scheduler_config.json"
    if trained.is_file():  # train.prediction_type may differ from the base's
        import json

        prediction = json.loads(trained.read_text()).get("prediction_type")
        if prediction:
            pipe.scheduler.register_to_config(prediction_type=prediction)
    return pipe
