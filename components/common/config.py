"""The one config schema: `params.yaml` (DVC) and the KFP pipeline parameters.

Each stage reads one section (plus `data` for pack). Names follow the upstream
diffusers `train_text_to_image.py` flags. Unknown keys, wrong types and impossible
values are `ConfigError`s naming the file and the key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.common.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    # A folder or file; ignored when dataset_name is set.
    source: str = "data/sample"
    format: Literal["auto", "imagefolder", "captions", "datasets", "webdataset"] = "auto"
    image_column: str = "image"
    caption_column: str = "text"
    # A `datasets` name (hub or local cache), as the recipe's --dataset_name.
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    # How a local folder's content is fingerprinted on a scheduled run (and pack's
    # per-file hashes): stat (a file whose size, mtime and inode are unchanged since it
    # was hashed keeps its hash: a file rewritten in place with the same size and
    # mtime is missed) or content (every byte read, every time).
    fingerprint: Literal["stat", "content"] = "stat"


class ModelConfig(Section):
    # "tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" (built offline: SD / SDXL / SD3 /
    # FLUX.1 layout), a Hugging Face hub id, or a local diffusers folder (SD 1.x/2.x,
    # SDXL, SD3/3.5 or FLUX.1: the family comes from the model).
    source: str = "tiny"
    revision: str | None = None
    seed: int = 0
    # tiny only: steps the VAE is pretrained on pictures of coloured shapes (0: random
    # VAE, whose samples are noise). About a minute on 2 CPU cores at 400.
    tiny_vae_steps: int = Field(400, ge=0)
    # tiny only: the objective its scheduler names. v_prediction: the demo learns the
    # prompt's colours within its minutes (on epsilon it learnt the shapes, not them);
    # epsilon: SD 1.x's.
    tiny_prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"


class PackConfig(Section):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    shard_max_samples: int = Field(1000, ge=1)
    shard_max_bytes: int = Field(1 << 30, ge=1)
    # auto: keep the source's bytes when they already decode to the stored image (RGB
    # JPEG/PNG/WebP, no EXIF rotation, not downscaled), else PNG (lossless) or, for
    # photo sources (JPEG/WebP), JPEG at `quality`. png | jpg | webp: always re-encode.
    image_format: Literal["auto", "png", "jpg", "webp"] = "auto"
    quality: int = Field(95, ge=1, le=100)
    # Longest side is downscaled (LANCZOS) to this; null keeps the original size.
    max_image_side: int | None = Field(1024, ge=8)
    min_image_side: int = Field(8, ge=1)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    # Larger images are rejected as decompression bombs (Pillow's default limit).
    max_image_pixels: int = Field(89_478_485, ge=1)
    # Transparency is flattened onto this colour (a name: white, black, gray, ...; or
    # #RRGGBB); `reject` rejects images that have transparency (reason: transparent).
    alpha_background: str = "white"
    # An image this close to one colour after conversion (the largest per-channel
    # standard deviation of its 0-255 values) is rejected as `blank`; 0 keeps them all.
    blank_threshold: float = Field(2.0, ge=0)
    empty_caption: Literal["reject", "keep", "filename"] = "reject"
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # Worker processes; 0 = one per CPU core. Not part of the output's identity.
    num_workers: int = Field(0, ge=0)

    @field_validator("alpha_background")
    @classmethod
    def _colour(cls, v: str) -> str:
        if v == "reject":
            return v
        from PIL import ImageColor

        try:
            ImageColor.getrgb(v)
        except ValueError:
            raise ValueError(
                f"must be a colour (white, black, gray, #RRGGBB) or reject, got {v!r}"
            ) from None
        return v


class CacheConfig(Section):
    resolution: int = Field(32, ge=8)
    center_crop: bool = True
    random_flip: bool = False
    # The recipe's --image_interpolation_mode (its default is lanczos).
    image_interpolation_mode: Literal[
        "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"
    ] = "lanczos"
    batch_size: int = Field(32, ge=1)
    # What is stored (fp16: half of fp32's bytes, and the loss from fp16 moments is
    # within 1.2e-5 of the on-the-fly loss; bf16's 1.2e-4); the VAE itself runs in
    # vae_dtype (auto: bf16 on CUDA, fp32 on CPU).
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    vae_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    vae_slicing: bool = False
    vae_tiling: bool = False
    # Also cache the text encoders' states (training then runs no text encoder). null:
    # the family's default: off for SD 1.x/2.x and SDXL, on for SD3 and FLUX (T5-XXL).
    text_embeddings: bool | None = None
    # Another VAE for the latents (a folder or hub id): SDXL's fp16-fix VAE
    # (madebyollin/sdxl-vae-fp16-fix), which train saves with the model. Without it an
    # SDXL VAE runs in fp32 (it overflows in fp16).
    pretrained_vae_model_name_or_path: str | None = None
    seed: int = 0
    # Aspect-ratio buckets: each image is resized and cropped to the bucket (width,
    # height: multiples of bucket_step, area close to resolution², aspect within
    # pack.max_aspect_ratio) nearest its aspect ratio, instead of a square.
    buckets: bool = False
    # null: the model's own (its VAE's downscaling times its UNet's: 64 for SD, 8 for
    # the tiny demo); a value is checked against the model when the cache runs.
    bucket_step: int | None = Field(None, ge=8)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


class TrainConfig(Section):
    # Model. null: the base-model stage's output (`t2i train --model`); else a local
    # diffusers folder or a hub id (loaded with revision / variant).
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    non_ema_revision: str | None = None  # the UNet to train from, when use_ema
    seed: int = 0
    # Schedule.
    train_batch_size: int = Field(16, ge=1)
    num_train_epochs: int | None = Field(None, ge=1)
    max_train_steps: int | None = Field(300, ge=1)
    max_train_samples: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    scale_lr: bool = False
    lr_scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    # Optimiser.
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    use_8bit_adam: bool = False
    # Objective.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    input_perturbation: float = Field(0.0, ge=0)
    dream_training: bool = False
    dream_detail_preservation: float = Field(1.0, ge=0)
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1)
    # Flow matching (SD3, FLUX): the diffusers scripts' flags. weighting_scheme null:
    # the family's script default (SD3: logit_normal; FLUX: none); sigma_sqrt / cosmap
    # weight the loss, logit_normal / mode the timestep density. precondition_outputs
    # null: the family's (SD3: true; FLUX: false).
    weighting_scheme: Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"] | None = None
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    precondition_outputs: bool | None = None
    # FLUX dev (guidance-distilled): the guidance its embedding is trained at (null: 3.5,
    # the FLUX scripts' default; a model without the embedding ignores it).
    guidance_scale: float | None = Field(None, ge=0)
    # The SDXL recipe's timestep bias (any family): none samples timesteps uniformly;
    # earlier / later weigh the first / last timestep_bias_portion of them by
    # timestep_bias_multiplier; range weighs [timestep_bias_begin, timestep_bias_end).
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_begin: int = Field(0, ge=0)
    timestep_bias_end: int = Field(1000, ge=1)
    timestep_bias_portion: float = Field(0.25, ge=0, le=1)
    # Captions. A sample with several captions trains on one per epoch, drawn from
    # (seed, epoch, key). shuffle_caption: its comma-separated tags in an order drawn
    # per step, the first keep_tokens tags kept in place (kohya's shuffle_caption /
    # keep_tokens); the text encoder then runs every step (cached text embeddings are
    # of the unshuffled caption).
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    # LoRA (peft): 0 fine-tunes the whole UNet; r > 0 trains a rank-r adapter on the
    # lora_target_modules (default: the attention projections, as diffusers' LoRA
    # recipe) and writes it as pytorch_lora_weights.safetensors; lora_merge also writes
    # the base pipeline with the adapter merged in. lora_alpha null: = lora_rank.
    lora_rank: int = Field(0, ge=0, le=1024)
    lora_alpha: float | None = Field(None, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1
    )
    lora_merge: bool = False
    # EMA.
    use_ema: bool = False
    offload_ema: bool = False
    foreach_ema: bool = False
    # Memory / speed.
    # null: the launcher's (`accelerate launch --mixed_precision`), else "no"; a value
    # that disagrees with the launcher's is an error.
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    # Data stream: samples pass a shuffle buffer; a global batch is made of
    # data_streams disjoint shard streams (null: one per process).
    shuffle_buffer: int = Field(1000, ge=1)
    data_streams: int | None = Field(None, ge=1)
    # Checkpoints.
    checkpointing_steps: int = Field(100, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1)
    resume_from_checkpoint: str | None = "latest"
    # An explicit resume_from_checkpoint of another config or data is refused unless
    # this is true (then its weights, optimizer state and step are taken as they are).
    resume_other_run: bool = False
    # Monitoring.
    validation_prompts: list[str] | None = None
    validation_epochs: int = Field(5, ge=1)
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "text2image-fine-tune"
    logging_steps: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.max_train_steps is None and self.num_train_epochs is None:
            raise ValueError("set max_train_steps or num_train_epochs")
        if self.offload_ema and not self.use_ema:
            raise ValueError("offload_ema needs use_ema: true")
        if self.non_ema_revision and not self.use_ema:
            raise ValueError("non_ema_revision needs use_ema: true")
        if self.timestep_bias_begin >= self.timestep_bias_end:
            raise ValueError(
                f"timestep_bias_begin ({self.timestep_bias_begin}) must be below "
                f"timestep_bias_end ({self.timestep_bias_end})"
            )
        if self.keep_tokens and not self.shuffle_caption:
            raise ValueError(
                "keep_tokens needs shuffle_caption: true (it keeps leading tags in place)"
            )
        if not self.lora_rank and (self.lora_merge or self.lora_alpha or self.lora_dropout):
            raise ValueError("lora_alpha, lora_dropout and lora_merge need lora_rank > 0")
        if self.lora_rank and self.non_ema_revision:
            raise ValueError(
                "non_ema_revision picks the UNet a full fine-tune starts from; a LoRA adapter "
                "(lora_rank > 0) trains on the base UNet: remove one of them"
            )
        return self


class GateConfig(Section):
    """Each check is optional (null: not checked); every set check must pass."""

    # tuned held-out loss / base held-out loss.
    max_val_loss_ratio: float | None = Field(1.0, gt=0)
    # tuned CLIP score - base CLIP score (prompt alignment), on evaluate.prompts.
    min_clip_score_delta: float | None = None
    # tuned FD / base FD (distribution distance to the held-out images).
    max_fd_ratio: float | None = Field(None, gt=0)
    # tuned FID / base FID (needs evaluate.inception_weights).
    max_fid_ratio: float | None = Field(None, gt=0)


class EvaluateConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["a red circle on a blue background"], min_length=1
    )
    images_per_prompt: int = Field(2, ge=1, le=64)
    # Captions drawn from the validation split; one image each, compared with the real
    # held-out images by FD / KID (and FID with local Inception weights).
    heldout_captions: int = Field(16, ge=2)
    scheduler: Literal["ddim", "dpmpp", "euler", "pndm"] = "dpmpp"
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    batch_size: int = Field(16, ge=1)  # images generated at once
    seed: int = 0
    val_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    # tiny (built offline from `seed`, like the tiny SD model), a hub id or a local
    # folder. Usual for SD 1.x: openai/clip-vit-large-patch14 and facebook/dinov2-base.
    clip_model: str = "tiny"
    fd_model: str = "tiny"
    # FID: a local copy of NVIDIA's TorchScript Inception, inception-2015-12-05.pt (the
    # file StyleGAN2-ADA and clean-fid load). null: no FID.
    inception_weights: str | None = None
    gate: GateConfig = GateConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, values: Any) -> Any:
        if isinstance(values, dict) and "max_val_loss_ratio" in values:
            raise ValueError("max_val_loss_ratio moved to evaluate.gate.max_val_loss_ratio")
        return values

    @model_validator(mode="after")
    def _gate_metrics_computed(self) -> EvaluateConfig:
        if self.gate.max_fid_ratio is not None and self.inception_weights is None:
            raise ValueError(
                "gate.max_fid_ratio needs evaluate.inception_weights (FID is computed only "
                "with the Inception file); set it, or set gate.max_fid_ratio: null"
            )
        return self

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("prompts must be non-empty strings")
        return v

    @field_validator("val_timesteps")
    @classmethod
    def _timesteps_in_range(cls, v: list[int]) -> list[int]:
        if not v or any(t < 0 or t > 999 for t in v):
            raise ValueError("must be a non-empty list of timesteps in 0..999")
        return v


# `org/name`, as the Hub accepts it: letters, digits, `-`, `_`, `.`; no `--` or `..`.
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class PublishConfig(Section):
    name: str = Field("t2i-tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # local: the registry below; hub: the Hugging Face Hub (hub_model_id); both.
    target: Literal["local", "hub", "both"] = "local"
    registry: str = "artifacts/registry"
    # The recipe's --hub_model_id: `org/name`. The token is never a param: HF_TOKEN,
    # `hf auth login`, or a Kubernetes secret mounted as HF_TOKEN.
    hub_model_id: str | None = None
    private: bool = True
    # Required for the Hub; null: the base model card's license (else an error). A
    # fine-tune is bound by its base's license: a value other than the base card's is
    # refused unless license_override is true (you hold the rights to relicense).
    license: str | None = None
    license_override: bool = False
    tag_format: str = "v{version}"
    # Files ComfyUI and AUTOMATIC1111 load, beside the diffusers folder: the full model
    # as one LDM-layout (SDXL: SGM) `<name>.safetensors` (the real SD 1.x/2.x or SDXL
    # topology only), a LoRA as a
    # kohya-format `<name>.kohya.safetensors`. single_file_half: fp16 tensors.
    single_file: bool = True
    single_file_half: bool = False
    # Experiments (`dvc exp run`, `t2i pipeline run-local`) publish only when true; the
    # receipt of one that did not says so. Committed runs (`dvc repro`, KFP) publish.
    from_experiments: bool = False
    # 429, 5xx and connection errors are retried this many times, waiting
    # retry_backoff_s, then twice that, ... (with jitter).
    max_retries: int = Field(5, ge=0, le=20)
    retry_backoff_s: float = Field(1.0, ge=0, le=60)
    # Refused: see _no_token_in_params. Excluded, so it never reaches a dump or KFP.
    hub_token: None = Field(None, exclude=True)

    @field_validator("hub_token", mode="before")
    @classmethod
    def _no_token_in_params(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(
                "refused: a params value is stored in git, in dvc.lock and in the KFP UI; "
                "give the token as HF_TOKEN or with `hf auth login` (on Kubernetes, a secret "
                "mounted as HF_TOKEN)"
            )
        return None

    @field_validator("hub_model_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and (not _HUB_REPO_ID.match(v) or "--" in v or ".." in v):
            raise ValueError(
                f"must be `org/name` (letters, digits, '-', '_', '.'; no '--' or '..'), got {v!r}"
            )
        return v

    @field_validator("tag_format")
    @classmethod
    def _tag_format(cls, v: str) -> str:
        if v.count("{version}") != 1 or not re.match(r"^[A-Za-z0-9._/{}-]+$", v):
            raise ValueError(f"must hold {{version}} once and make a git tag name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _hub_needs_repo(self) -> PublishConfig:
        if self.target in ("hub", "both") and not self.hub_model_id:
            raise ValueError(f"target {self.target!r} needs publish.hub_model_id (`org/name`)")
        return self


class Toleration(Section):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


_QUANTITY = r"^[0-9]+(\.[0-9]+)?([mkMGTPE]i?|[KMGTPE]i)?$"  # a Kubernetes quantity


class Resources(Section):
    """What one stage's pod asks of the cluster (requests = limits)."""

    cpu: str | None = Field(None, pattern=_QUANTITY)  # e.g. "4", "500m"
    memory: str | None = Field(None, pattern=_QUANTITY)  # e.g. "16Gi"
    gpus: int = Field(0, ge=0, le=64)
    accelerator: str = "nvidia.com/gpu"  # the resource name GPUs are counted in
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    # An in-memory /dev/shm for data-loading workers (null: the runtime's default).
    shm_size: str | None = Field(None, pattern=_QUANTITY)
    # Local disk the stage may fill: a generic ephemeral volume of this size (a PVC of
    # `pipeline.scratch_storage_class` for the pod's life) at /scratch, its TMPDIR and
    # HF_HOME; a TrainJob's nodes get it as an ephemeral-storage request and limit.
    ephemeral_storage: str | None = Field(None, pattern=_QUANTITY)
    # train only: nodes > 1 trains on that many nodes through Kubeflow Trainer (a
    # TrainJob; `gpus` is then per node), the KFP task launching and following it.
    nodes: int = Field(1, ge=1, le=1024)


_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a Kubernetes object name
STAGES = (
    "fingerprint",
    "base_model",
    "pack",
    "cache",
    "train",
    "evaluate",
    "publish",
    "summary",
)


def _default_resources() -> dict[str, Resources]:
    gpu = Resources(cpu="8", memory="32Gi", gpus=1, shm_size="8Gi")
    return {
        "fingerprint": Resources(cpu="1", memory="2Gi"),
        "base_model": Resources(cpu="2", memory="16Gi"),
        "pack": Resources(cpu="8", memory="16Gi"),
        "cache": gpu,
        "train": gpu,
        "evaluate": gpu,
        "publish": Resources(cpu="2", memory="16Gi"),
        "summary": Resources(cpu="1", memory="1Gi"),
    }


RETRIED_BY_DEFAULT = ("cache", "cache_worker", "train", "evaluate")


class RetryPolicy(Section):
    """KFP retries of a failed task of `stages`: `count` times, waiting backoff_s, x
    factor each. Retries are for pods the cluster loses (preempted GPU nodes, evictions):
    the GPU stages by default. A deterministic failure (bad config or data) is never
    retried in effect: a retried attempt of a stage that failed that way exits at once
    with the same line."""

    count: int = Field(2, ge=0, le=10)
    backoff_s: int = Field(60, ge=0)
    factor: float = Field(2.0, ge=1.0)
    stages: list[str] = Field(default_factory=lambda: list(RETRIED_BY_DEFAULT))

    @field_validator("stages")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = (*STAGES, "cache_worker", "cache_merge")
        unknown = [s for s in v if s not in known]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(known)}")
        return v


class SecretKey(Section):
    """One key of a Kubernetes secret (`kubectl create secret generic NAME
    --from-literal=KEY=...`)."""

    name: str = Field(pattern=_K8S_NAME)
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$")


class StorageSecret(Section):
    """A Kubernetes secret whose keys are object-store credential variables; each key
    becomes the environment variable of the same name."""

    name: str = Field(pattern=_K8S_NAME)
    keys: list[str] = Field(
        default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], min_length=1
    )


class WorkspaceClaim(Section):
    """The workspace PVC, created by the first run that finds no KFP cache entry for it
    (kfp-kubernetes CreatePVC, cached: later runs reuse it). `storage_class` is
    required: an empty class means a statically provisioned volume."""

    size: str = Field("200Gi", pattern=_QUANTITY)
    storage_class: str = Field(pattern=_K8S_NAME)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"


class TrainerConfig(Section):
    """Kubeflow Trainer v2.3 (`trainer.kubeflow.org/v1alpha1` TrainJob), for training
    on `pipeline.resources.train.nodes` > 1 nodes (and `t2i pipeline trainjob`)."""

    # The ClusterTrainingRuntime the TrainJob refers to: ours
    # (pipelines/k8s/trainer-runtime.yaml: a lost node restarts the job, which resumes
    # from the shared checkpoint) or any torch runtime, e.g. torch-distributed.
    runtime: str = Field("t2i-torch-distributed", pattern=_K8S_NAME)
    # A Kueue LocalQueue: the job waits in it (suspended) until admitted.
    queue: str | None = Field(None, pattern=_K8S_NAME)
    # Whole-job restarts after a node fails (the runtime's JobSet failurePolicy).
    max_restarts: int = Field(3, ge=0, le=100)
    # The job's deadline, in seconds (null: none; a fine-tune can take days).
    active_deadline_seconds: int | None = Field(None, ge=1)


class PipelineConfig(Section):
    name: str = "t2i-finetune"
    # The project image every KFP component runs; pin a tag or digest, never :latest.
    image: str = "ghcr.io/t2i-pipeline/t2i-pipeline:0.1.0"
    host: str | None = None
    experiment: str = "t2i-finetune"
    schedule_cron: str = "0 0 3 * * 1"
    # >1: the cache stage runs as this many parallel tasks (disjoint shards) + a merge.
    cache_workers: int = Field(1, ge=1, le=256)
    # pack_workers > 1: pack in that many parallel tasks (each its part of the listing,
    # by key hash), then a merge; they share the workspace's store.
    pack_workers: int = Field(1, ge=1, le=256)
    # An object store for the shards and latent shards (s3://bucket/prefix, gs://...):
    # they live there once, by sha256, and the KFP outputs carry manifests that point
    # there; every pod reads the shards it needs from it (no shared volume needed).
    # Credentials: storage_secret. null: the workspace holds them (or, without one, the
    # outputs themselves).
    store: str | None = None
    # The storage class of the stages' /scratch volumes (resources.<stage>.
    # ephemeral_storage); null: the cluster's default class.
    scratch_storage_class: str | None = Field(None, pattern=_K8S_NAME)
    # Per stage (base_model, pack, cache, train, evaluate, publish); a stage left out
    # keeps its default. Applied with kfp-kubernetes when the DAG is compiled.
    resources: dict[str, Resources] = Field(default_factory=_default_resources)
    retries: RetryPolicy = RetryPolicy()
    # An existing PersistentVolumeClaim, mounted at workspace_path in every stage that
    # keeps state across runs: the fetched source, pack's and cache's content-keyed
    # stores, train's checkpoints (keyed by the run), a registry given as a relative path,
    # and the run notes the summary reads. null: no workspace (every run starts afresh).
    workspace_pvc: str | None = Field("t2i-workspace", pattern=_K8S_NAME)
    workspace_path: str = Field("/workspace", pattern=r"^/")
    # null: workspace_pvc exists already (kubectl apply -f pipelines/k8s/workspace-pvc.yaml);
    # {size, storage_class, access_mode}: the run creates it (once; then reused).
    workspace_create: WorkspaceClaim | None = None
    # Data on a volume: an existing PVC mounted at data_path in fingerprint and pack
    # (data.source then names a path under it, e.g. /data/shapes).
    data_pvc: str | None = Field(None, pattern=_K8S_NAME)
    data_path: str = Field("/data", pattern=r"^/")
    # on_change: train only when the data fingerprint or the config differ from what the
    # last run decided (its record on the workspace; without one, the latest published
    # version's lineage); always: train on every run, from step 0.
    retrain: Literal["on_change", "always"] = "on_change"
    # Secrets reach pods as environment variables, never as parameters.
    hf_token_secret: SecretKey | None = None  # -> HF_TOKEN (every stage that may read the Hub)
    storage_secret: StorageSecret | None = None  # -> e.g. AWS_* (fingerprint, pack, publish)
    notify_secret: SecretKey | None = None  # -> T2I_NOTIFY_URL: the summary is posted there
    trainer: TrainerConfig = TrainerConfig()

    @field_validator("resources", mode="before")
    @classmethod
    def _stages(cls, v: Any) -> Any:
        if isinstance(v, dict):
            unknown = sorted(set(v) - set(STAGES))
            if unknown:
                raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
            merged: dict[str, Any] = dict(_default_resources())
            for stage, given in v.items():  # field by field over the stage's defaults
                if isinstance(given, dict):
                    given = {**merged[stage].model_dump(), **given}
                merged[stage] = given
            return merged
        return v

    @model_validator(mode="after")
    def _create_needs_a_name(self) -> PipelineConfig:
        if self.workspace_create is not None and not self.workspace_pvc:
            raise ValueError("workspace_create needs workspace_pvc: the name of the PVC to create")
        many = [s for s, r in self.resources.items() if r.nodes > 1]
        if [s for s in many if s != "train"]:
            raise ValueError(f"resources.{many[0]}.nodes: only train runs on several nodes")
        if many:
            if not self.workspace_pvc:
                raise ValueError(
                    "resources.train.nodes > 1 needs pipeline.workspace_pvc: the nodes share "
                    "the latents, the base model and the checkpoints on it"
                )
        if self.store is not None and self.cache_workers > 1 and not self.workspace_pvc:
            raise ValueError(
                "cache_workers > 1 with store needs pipeline.workspace_pvc: the workers "
                "record there which latent shards they uploaded"
            )
        if self.pack_workers > 1 and not self.workspace_pvc:
            raise ValueError(
                "pack_workers > 1 needs pipeline.workspace_pvc: the workers share its store"
            )
        claim = self.workspace_create
        if claim is not None and claim.access_mode != "ReadWriteMany" and self.shared_workspace:
            what = (
                "resources.train.nodes > 1" if many
                else "cache_workers > 1" if self.cache_workers > 1 else "pack_workers > 1"
            )  # fmt: skip
            raise ValueError(
                f"{what} needs a ReadWriteMany workspace (pods on several nodes mount it at "
                "once): set workspace_create.access_mode: ReadWriteMany"
            )
        return self

    @property
    def shared_workspace(self) -> bool:
        """Whether pods on several nodes mount the workspace at once (train nodes, or
        pack or cache workers writing into its store)."""
        return bool(self.workspace_pvc) and (
            self.resources["train"].nodes > 1 or self.cache_workers > 1 or self.pack_workers > 1
        )

    @field_validator("store")
    @classmethod
    def _object_store(cls, v: str | None) -> str | None:
        from components.common.objects import check_uri

        return None if v is None else check_uri(v)

    @field_validator("image")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if v.endswith(":latest") or (":" not in v.rsplit("/", 1)[-1] and "@" not in v):
            raise ValueError(f"must be pinned by a tag or digest (not :latest), got {v!r}")
        return v


class Params(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pack: PackConfig = PackConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    publish: PublishConfig = PublishConfig()
    pipeline: PipelineConfig = PipelineConfig()


def yaml_load(text: str) -> Any:
    """Parse YAML 1.2, as DVC reads and rewrites `params.yaml` (`dvc exp run -S`).

    Under YAML 1.2 `no`, `on` and `off` are strings and `1e-4` is a number (PyYAML's
    YAML 1.1 reads `mixed_precision: no` as False once DVC drops the quotes). A key
    given twice is an error, not a silent last-one-wins.
    """
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into a key path and a YAML-parsed value."""
    from ruamel.yaml import YAMLError

    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({problem})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def describe_errors(err: ValidationError, where: str, section: str | None = None) -> str:
    """One line naming every bad key: `params.yaml: train.lr: unknown key`. `section`:
    the errors are of that section alone (its name is put before each key)."""
    parts = []
    for e in err.errors():
        loc = (section, *e["loc"]) if section else tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = _unknown_key(loc) if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        # Our own validators name the value when it helps; a secret is never echoed.
        echo = e["type"] not in ("extra_forbidden", "value_error") and "token" not in key
        if echo and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        parts.append(f"{key}: {msg}")
    return f"{where}: " + "; ".join(parts)


def _unknown_key(loc: tuple) -> str:
    """`unknown key`, with the closest valid name when there is one."""
    model: Any = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        model = field.annotation if field else None
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return f"unknown key (did you mean `{close[0]}`?)" if close else "unknown key"


def load_params(path: Path | str | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Load, override and validate the params file.

    `path=None` starts from the defaults. Raises `ConfigError` (one line, naming the
    file and key) for a missing/unreadable file, bad YAML, unknown keys, wrong types
    or impossible values.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        from ruamel.yaml import YAMLError

        try:
            raw = yaml_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: params file not found (pass --params FILE)") from None
        except YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None)
            why = f": {problem}" if problem else ""
            raise ConfigError(f"{path}: not valid YAML{at}{why}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        raw = apply_overrides(raw, list(overrides))
        where += " (with --set overrides)"
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, where)) from None


def validate_section(model: type[Section], values: dict[str, Any], where: str) -> Section:
    """Validate section `where` given as a dict (the KFP parameters take this path)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, f"pipeline parameter {where}_params", where)) from None
