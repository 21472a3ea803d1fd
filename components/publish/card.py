"""The model card (`README.md`): Hub metadata plus a body a person reads.

Metadata follows the Hub's model-card spec through `huggingface_hub.ModelCardData`
(license, library, pipeline tag, base model and relation, datasets, tags, a widget of
the evaluation samples and a `model-index` of the evaluation results).
"""

from __future__ import annotations

import json
from typing import Any

from components.common.records import EvaluationRecord, TrainRecord
from components.common.tiny import TINY_SOURCES

TAGS = ["text-to-image", "diffusers", "diffusers-training", "t2i-pipeline"]


def _family(train: TrainRecord):
    from components.common.families import BY_NAME

    return BY_NAME[train.family]


# The training settings worth a row in the card, in recipe order.
_SETTINGS = [
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_grad_norm",
    "mixed_precision",
    "prediction_type",
    "snr_gamma",
    "noise_offset",
    "use_ema",
    "gradient_checkpointing",
    "seed",
]
_LORA_SETTINGS = ["lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_merge"]


def render_card(
    *,
    repo_id: str | None,
    name: str,
    local_path: str | None = None,
    license_: str | None,
    version: int,
    train: TrainRecord,
    evaluation: EvaluationRecord,
    lineage: dict[str, Any],
) -> str:
    """The card's full text (YAML metadata + markdown). `repo_id` is the Hub repo, or
    None for the local registry (the usage snippet then loads `local_path`)."""
    from huggingface_hub import ModelCard

    meta = card_metadata(repo_id or name, license_, train, evaluation)
    load = repo_id or local_path or f"path/to/registry/{name}/{version}"
    body = _body(load, name, version, train, evaluation, lineage, license_)
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}"))


def card_metadata(model_name: str, license_: str | None, train, evaluation):
    from huggingface_hub import EvalResult, ModelCardData

    base = train.base_model
    dataset = train.pack.dataset_name
    results = [
        EvalResult(
            task_type="text-to-image",
            dataset_type=dataset or "custom",
            dataset_name=dataset or f"held-out split of {train.pack.source}",
            dataset_split="validation",
            metric_type="loss" if c.key == "val_loss" else c.key,
            metric_name=f"{c.label} ({label})",
            metric_value=round(value, 6),
        )
        for c in evaluation.comparisons
        for label, value in (("fine-tuned", c.tuned), ("base model", c.base))
    ]
    extra: dict[str, Any] = {}
    if base is not None and base.hub_id:
        relation = "adapter" if train.adapter else "finetune"
        extra.update(base_model=base.hub_id, base_model_relation=relation)
    if dataset:
        extra["datasets"] = [dataset]
    if base is not None and license_ == "other" and license_ == base.license:
        extra.update({k: v for k, v in (("license_name", base.license_name),
                                        ("license_link", base.license_link)) if v})  # fmt: skip
    return ModelCardData(
        license=license_,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=[*_family(train).tags[:1], *TAGS, *(["lora"] if train.adapter else [])],
        widget=[  # one per prompt: its first seed
            {"text": s.prompt, "output": {"url": f"eval/{s.images['tuned']}"}}
            for s in {s.prompt: s for s in reversed(evaluation.samples)}.values()
            if "tuned" in s.images
        ][::-1],
        model_name=model_name,
        eval_results=results or None,
        **extra,
    )


def _body(
    load: str, name, version, train: TrainRecord, evaluation: EvaluationRecord, lineage,
    license_: str | None = None,
):  # fmt: skip
    base = train.base_model
    family = _family(train)
    base_desc = f"a {family.label} model"
    if base is not None:
        base_desc = f"an offline tiny {family.label} model (t2i-pipeline's `{base.source}`)"
    if base is not None and base.hub_id:
        base_desc = f"[{base.hub_id}](https://huggingface.co/{base.hub_id})"
        if base.revision:
            base_desc += f" at revision `{base.revision}`"
    elif base is not None and base.source not in TINY_SOURCES:
        base_desc = f"a local model (`{base.source}`)"
    source = train.pack.dataset_name or train.pack.source
    settings = _SETTINGS + (_LORA_SETTINGS if train.adapter else [])
    lines = [
        f"# {name} (version {version})",
        "",
        *_intro(base_desc, train, source),
        "",
        *(_license_lines(base) if base is not None and license_ == base.license else []),
        "## Usage",
        "",
        *_usage(load, base, train, evaluation),
        "",
        *_export_lines(lineage.get("exports") or {}, train),
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{k}` | `{train.config.get(k)}` |" for k in settings if k in train.config],
        f"| steps | {train.steps}{_resumed(train)} |",
        f"| loss | {train.initial_loss:.4f} -> {train.final_loss:.4f} |",
        f"| config hash | `{train.config_sha256[:16]}` |",
        "",
        "## Data",
        "",
        *_data_lines(train),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(evaluation),
        "",
        "![base vs fine-tuned samples, same prompts and seeds](eval/grid.png)",
        "",
        "## Lineage",
        "",
        "`lineage.json` in this repository holds the whole chain: the source's "
        "fingerprint, every shard's sha256, the latent cache keys, the base model's "
        "weights hash, the full training config, the evaluation and the code.",
        "",
        "```json",
        json.dumps(_lineage_summary(lineage), indent=2),
        "```",
        "",
        "## Limitations",
        "",
        "The model inherits the base model's limitations and biases and learns those of "
        "its training data. The held-out loss measures fit to the data's distribution; "
        "CLIP score (prompt alignment) and FD/KID (distance to held-out images) are only as "
        "good as the CLIP and feature models named in `lineage.json`, and on a few dozen "
        "images they are noisy. Look at the samples before relying on the numbers.",
        "",
    ]
    return "\n".join(lines)


def _license_lines(base) -> list[str]:
    """What the base model's license (inherited by this fine-tune) allows, when it is a
    non-commercial one (FLUX.1 dev's)."""
    name = (base.license_name or "") if base is not None else ""
    if "non-commercial" not in name:
        return []
    link = f" ({base.license_link})" if base.license_link else ""
    return [
        "## License",
        "",
        f"This fine-tune is bound by its base model's license, `{name}`{link}: "
        "**non-commercial use only**. Outputs and weights may not be used commercially "
        "unless the licensor grants it.",
        "",
    ]


def _intro(base_desc: str, train: TrainRecord, source: str) -> list[str]:
    recipe = (
        "with t2i-pipeline (the diffusers `train_text_to_image.py` recipe) for "
        f"{train.steps} steps on `{source}`."
    )
    denoiser = "UNet" if _family(train).denoiser == "unet" else "transformer"
    if train.adapter is None:
        return [
            f"A text-to-image model: the {denoiser} of {base_desc}, fine-tuned {recipe} "
            "The VAE, text encoders and tokenizers are the base model's, unchanged."
        ]
    a = train.adapter
    merged = (
        " This repository also holds the base pipeline with the adapter merged into its UNet."
        if a.merged
        else ""
    )
    return [
        f"A LoRA adapter (rank {a.rank}, alpha {a.alpha:g}, on {', '.join(a.target_modules)}) "
        f"for the {denoiser} of {base_desc}, trained {recipe} The base model is unchanged: load "
        f"it, then this adapter (`{a.weights}`).{merged}"
    ]


def _usage(load: str, base, train: TrainRecord, evaluation: EvaluationRecord) -> list[str]:
    cls = _family(train).pipeline_class
    first = [
        "```python",
        "import torch",
        f"from diffusers import {cls}",
        "",
    ]
    last = [
        'pipe = pipe.to("cuda")',
        f'image = pipe("{_first_prompt(evaluation)}").images[0]',
        "```",
    ]
    if train.adapter is None:
        return [
            *first,
            f'pipe = {cls}.from_pretrained("{load}", torch_dtype=torch.float16)',
            *last,
        ]
    base_id = base.hub_id if base is not None and base.hub_id else "path/to/the/base/model"
    return [
        *first,
        f'pipe = {cls}.from_pretrained("{base_id}", torch_dtype=torch.float16)',
        f'pipe.load_lora_weights("{load}")',
        *last,
    ]


def _export_lines(exports: dict[str, dict], train: TrainRecord) -> list[str]:
    """How to use the single files, for ComfyUI and AUTOMATIC1111 users."""
    if not exports:
        return []
    family = _family(train)
    if family.denoiser != "unet":
        return _transformer_export_lines(exports, train, family)
    lines = ["## ComfyUI and AUTOMATIC1111", ""]
    for name, entry in exports.items():
        if "kohya" in entry["format"]:
            lines.append(
                f"- `{name}`: the LoRA in kohya's format (alpha {train.adapter.alpha:g}, "
                f"rank {train.adapter.rank}): put it in `models/loras/` (ComfyUI) or "
                f"`models/Lora/` (AUTOMATIC1111, `<lora:{name.removesuffix('.safetensors')}:1>`"
                "), or `pipe.load_lora_weights(path)` in diffusers."
            )
        else:
            lines.append(
                f"- `{name}`: the whole model in one file ({entry['format']}): put it in "
                "`models/checkpoints/` (ComfyUI) or `models/Stable-diffusion/` "
                f"(AUTOMATIC1111), or `{_family(train).pipeline_class}.from_single_file(path, "
                "config=<this folder>)` in diffusers."
            )
    if train.config.get("prediction_type") == "v_prediction":
        lines.append(
            "- It predicts v (`v_prediction`): tell the UI so (AUTOMATIC1111: a `.yaml` "
            "beside it with `parameterization: v`; ComfyUI: a ModelSamplingDiscrete node "
            "set to v_prediction)."
        )
    return [*lines, _sums(exports), ""]


def _transformer_export_lines(exports: dict[str, dict], train: TrainRecord, family) -> list[str]:
    """SD3's and FLUX's files: ComfyUI (and Forge) load them; AUTOMATIC1111 does not."""
    encoders = "`clip_l`, `clip_g` and `t5xxl`" if family.name == "sd3" else "`clip_l` and `t5xxl`"
    loader = "TripleCLIPLoader" if family.name == "sd3" else "DualCLIPLoader"
    lines = ["## ComfyUI", ""]
    for name, entry in exports.items():
        if "kohya" in entry["format"]:
            reader = (
                "`pipe.load_lora_weights(path)` reads it in diffusers"
                if family.name == "flux"
                else "in diffusers, load this folder's `pytorch_lora_weights.safetensors`"
            )
            lines.append(
                f"- `{name}`: the LoRA in kohya's format on {family.label}'s original modules "
                f"(alpha {train.adapter.alpha:g}, rank {train.adapter.rank}; both times the "
                "parts on a fused weight such as `qkv`): put it in "
                f"`models/loras/` (ComfyUI, Forge); {reader}."
            )
        elif family.name == "sd3":
            lines.append(
                f"- `{name}`: the MMDiT and the VAE in one file ({entry['format']}): put it "
                f"in `models/checkpoints/` and load the base's {encoders} with a {loader} "
                f"node; in diffusers, `{family.pipeline_class}.from_single_file(path, "
                "config=<this folder>)`."
            )
        else:
            lines.append(
                f"- `{name}`: the transformer in one file ({entry['format']}): put it in "
                "`models/diffusion_models/` (a Load Diffusion Model node), with the base's "
                f"`ae.safetensors` and its {encoders} (a {loader} node); in diffusers, "
                "`FluxTransformer2DModel.from_single_file(path, config=<this folder>, "
                'subfolder="transformer")`.'
            )
    return [*lines, _sums(exports), ""]


def _sums(exports: dict[str, dict]) -> str:
    sums = ", ".join(f"`{n}` {e['sha256'][:16]}" for n, e in exports.items())
    return f"- sha256 (in `lineage.json` in full): {sums}"


def _resumed(train: TrainRecord) -> str:
    return f" (resumed at step {train.resumed_from_step})" if train.resumed_from_step else ""


def _first_prompt(evaluation: EvaluationRecord) -> str:
    prompt = evaluation.samples[0].prompt if evaluation.samples else "a photo"
    return prompt.replace('"', "'")


def _data_lines(train: TrainRecord) -> list[str]:
    pack = train.pack
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(pack.rejected_by_reason.items()))
    return [
        f"- source: `{pack.dataset_name or pack.source}` (fingerprint "
        f"`{pack.source_fingerprint[:16]}`)",
        f"- samples kept: {pack.samples.get('train', 0)} train, {pack.samples.get('val', 0)} "
        "held out",
        f"- rejected: {sum(pack.rejected_by_reason.values())} ({rejected or 'none'})",
        f"- shards: {len(pack.shards)} WebDataset shards, each with its sha256 in `lineage.json`",
    ]


def _evaluation_lines(evaluation: EvaluationRecord) -> list[str]:
    lines = ["| metric | base | fine-tuned | better |", "|---|---|---|---|"]
    lines += [
        f"| {c.label} | {c.base:.4g} | {c.tuned:.4g} | {c.better} |" for c in evaluation.comparisons
    ]
    verdict = "passed" if evaluation.passed else "failed"
    lines += ["", f"Gate ({verdict}):", ""]
    lines += [f"- {c.describe()}" for c in evaluation.checks]
    return lines


def _lineage_summary(lineage: dict[str, Any]) -> dict[str, Any]:
    base = lineage.get("base_model") or {}
    code = lineage.get("code") or {}
    return {
        "source": lineage["source"],
        "pack_manifest_sha256": lineage["pack"]["manifest_sha256"],
        "base_model": {k: base.get(k) for k in ("source", "revision", "unet_sha256")},
        "train_config_sha256": lineage["train"]["config_sha256"],
        "unet_sha256": lineage["unet_sha256"],
        "code": {
            k: code.get(k)
            for k in ("git_commit", "git_dirty", "package_version", "image", "image_digest")
            if code.get(k) is not None
        },
    }
