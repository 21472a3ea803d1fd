"""train: UNet fine-tuning on cached latents (the diffusers text-to-image recipe).

Each step draws latents = (mean + std * eps) * scaling_factor from the cached VAE
moments with a fresh eps, as the recipe's `latent_dist.sample()` does, adds noise at
a random timestep and regresses the UNet on the epsilon (or v) target
(`objective.py`). Batches stream from the latent shards (`data.py`).

Everything random in a step is a pure function of (seed, micro-step), and the data
position is a pure function of the micro-step, so resuming from a checkpoint
continues exactly where the run stopped, mid-epoch included, and N processes with
batch B see the same global batches as one process with batch N*B (and
`data_streams: N`).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.common.config import TrainConfig
from components.common.flow import Schedule, flow_objective
from components.common.io import atomic_dir, sha256_json
from components.common.models import denoiser_part, trained_weights_sha256, weights_sha256
from components.common.progress import progress
from components.common.records import (
    BASE_MODEL_RECORD,
    TRAIN_RECORD,
    LatentManifest,
    TrainRecord,
    environment,
    read_base_model_record,
    verify_latents,
    write_record,
)
from components.train_unet import checkpoints, lora
from components.train_unet.data import LatentStream, TagShuffle
from components.train_unet.monitor import (
    LossLog,
    TrainReport,
    log_validation,
    make_report,
    tracker_config,
    write_reports,
)
from components.train_unet.objective import (
    Objective,
    StepDraws,
    timestep_weights,
    training_loss,
)
from components.train_unet.setup import (
    Models,
    check_environment,
    load_models,
    make_optimizer,
    resolve_model,
    resolve_precision,
)

__all__ = ["TrainReport", "run", "check_data", "training_loss", "StepDraws", "save_pipeline"]

# Settings that change how a run is saved, shown or paced, not what it computes.
_NOT_IN_FINGERPRINT = {
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "max_train_steps",
    "num_train_epochs",
    "validation_prompts",
    "validation_epochs",
    "report_to",
    "logging_dir",
    "tracker_project_name",
    "logging_steps",
    "dataloader_num_workers",
    "resume_other_run",
}
# How the stream deals samples to data streams: a checkpoint written under another
# layout is not resumed (its data position would mean other samples).
DATA_LAYOUT = "balanced-ranges-1"


@dataclass
class Run:
    """One training run's parts, as the loop needs them."""

    cfg: TrainConfig
    accelerator: object
    models: Models
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    stream: LatentStream
    fingerprint: str
    model: Path
    checkpoint_dir: Path
    reports: Path
    latents: LatentManifest
    identity: checkpoints.RunIdentity
    run_id: str = ""  # the tracker run's name: new per run, kept by a resumed run
    base_unet_sha256: str = ""  # of the UNet training starts from (a LoRA adapter's base)
    samples_seen: int = 0  # counted as batches are trained (a resumed run: from its checkpoint)
    validated_at: int = -1  # the step of the last validation images

    @property
    def checkpoint_folder(self) -> Path:
        return checkpoints.run_folder(self.checkpoint_dir, self.identity)

    @property
    def ema_device(self):
        """Where the EMA's shadow parameters live: the training device, or the CPU."""
        return "cpu" if self.cfg.offload_ema else self.accelerator.device


def run(
    cfg: TrainConfig,
    latents: Path,
    model: Path,
    out: Path,
    reports: Path | None = None,
    checkpoint_dir: Path | None = None,
    metrics_dir: Path | None = None,
) -> TrainReport:
    """Fine-tune the UNet of `model` on the latent shards in `latents`.

    Writes a complete diffusers pipeline to `out` (atomically; EMA weights when
    `use_ema`), TensorBoard logs and validation images to `reports`, checkpoints to
    `checkpoint_dir`, `train_metrics.json` and `loss.csv` to `metrics_dir` (default:
    `reports`; under DVC a git-tracked folder). Raises ConfigError for
    impossible settings (before any work) and T2IError for missing/corrupt inputs.
    """
    cfg = resolve_precision(cfg)
    check_environment(cfg)
    out = Path(out)
    reports = Path(reports) if reports else out.parent / "train"
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out.parent / "checkpoints"
    model, trained_unet = resolve_model(cfg, model)
    manifest = verify_latents(latents)  # every shard's checksum, before step 0
    r = _prepare(cfg, Path(latents), manifest, (model, trained_unet), reports, checkpoint_dir)
    step, history = 0, []
    max_steps = r.identity.max_steps
    resume = checkpoints.find_resume(
        checkpoint_dir, cfg.resume_from_checkpoint, r.identity, cfg.resume_other_run
    )
    if resume.note:
        r.accelerator.print(resume.note)
    left_out_line, left_out = r.stream.epoch_summary()
    if left_out_line:
        r.accelerator.print(left_out_line)
    if resume.path is not None:
        step, history = _resume(r, resume.path)
    _init_trackers(r)
    started = time.perf_counter()
    log = train_steps(r, step, max_steps, LossLog(history))
    elapsed = time.perf_counter() - started
    per_step = r.stream.global_batch * cfg.gradient_accumulation_steps
    rate = (max_steps - step) * per_step / elapsed if elapsed and max_steps > step else 0.0
    log.flush()
    report = make_report(log.rows, max(step, max_steps), step, rate, r.samples_seen)
    report.samples_not_in_a_batch = left_out
    if cfg.validation_prompts and r.validated_at != report.steps:
        _validate(r, report.steps)  # the final model's images, as upstream ends
    r.accelerator.wait_for_everyone()
    if r.accelerator.is_main_process:
        unet = r.accelerator.unwrap_model(r.unet)
        if r.models.ema is not None:
            r.models.ema.copy_to(lora.trainable(unet))
        record = _record(r, report, log.rows)
        if cfg.lora_rank:
            save_adapter_model(model, unet, r.models.noise_scheduler, out, record)
        else:
            vae = _cache_vae(r.latents)
            save_pipeline(model, unet, r.models.noise_scheduler, out, record, vae)
        write_reports(Path(metrics_dir) if metrics_dir else reports, report, log.rows)
    # Every rank leaves together: tearing the process group down while rank 0 was
    # still saving left it waiting on a peer that had gone (a gloo hang at exit).
    r.accelerator.wait_for_everyone()
    r.accelerator.end_training()
    return report


def _resume(r: Run, path: Path) -> tuple[int, list]:
    """Load checkpoint `path` into the run; return (its step, the loss history)."""
    unet = r.accelerator.unwrap_model(r.unet)
    scaler = r.accelerator.scaler
    step = checkpoints.load(
        path, unet, r.optimizer, r.lr_scheduler, scaler, r.models.ema, r.ema_device
    )
    if r.models.ema is not None and r.cfg.offload_ema and torch.cuda.is_available():
        r.models.ema.pin_memory()
    state = checkpoints.read_state(path)
    epoch, batch = r.stream.position(step * r.cfg.gradient_accumulation_steps)
    forced = state.get("fingerprint") != r.fingerprint
    note = checkpoints.check_data_position(
        path, state.get("data_position"), {"epoch": epoch, "batch": batch}, forced
    )
    if note:
        r.accelerator.print(note)
    r.run_id = state.get("run_id") or r.run_id
    per_step = r.stream.global_batch * r.cfg.gradient_accumulation_steps
    r.samples_seen = int(state.get("samples_seen", step * per_step))
    r.validated_at = int(state.get("validated_at", -1))
    r.accelerator.print(f"resuming from {path} (step {step})")
    return step, state["history"]


def check_data(cfg: TrainConfig, latents: Path, processes: int, model: Path | None = None) -> str:
    """ConfigError, before any work (and before launching `processes` ranks: one line,
    not one traceback per rank), when this run cannot train: the latents cannot give
    every rank a full global batch (or, with buckets, no bucket fills one), or `model`
    (a local base model) is not one the trainer trains or predicts a target it cannot
    train. Returns what an epoch leaves out, in one line ("" when nothing)."""
    from components.common.records import read_latent_manifest
    from components.train_unet.setup import training_scheduler

    named = cfg.pretrained_model_name_or_path
    if named is not None and Path(named).is_dir():  # (a hub id is checked once fetched)
        model, key = Path(named), "train.pretrained_model_name_or_path"
    elif named is not None:
        model = None
    else:
        key = "--model"
    if model is not None:
        from components.common.families import family_of
        from components.common.models import check_model_dir

        family_of(check_model_dir(Path(model)), key)
        training_scheduler(Path(model), cfg)
    stream = LatentStream.from_manifest(
        Path(latents),
        read_latent_manifest(latents),
        cfg.max_train_samples,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
        world=processes,
        streams=cfg.data_streams,
    )
    return stream.epoch_summary()[0]


def _prepare(cfg, latents, manifest, models_at, reports, checkpoint_dir) -> Run:
    """Accelerator, data stream, models, optimizer and LR schedule; the run fingerprint.
    `models_at`: (model folder, folder of the UNet to train)."""
    model, trained_unet = models_at
    from diffusers.optimization import get_scheduler

    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    accelerator = _accelerator(cfg, reports)
    models = load_models(cfg, model, trained_unet, accelerator.device, manifest)
    stream = LatentStream.from_manifest(
        latents,
        manifest,
        cfg.max_train_samples,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        streams=cfg.data_streams,
        shuffle_buffer=cfg.shuffle_buffer,
        workers=cfg.dataloader_num_workers,
        empty_prompt=models.empty_prompt,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
        tags=TagShuffle(models.text, cfg.keep_tokens) if cfg.shuffle_caption else None,
    )
    unet = models.unet
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(cfg, lora.trainable(unet), lr, accelerator.device)
    # Stepped once per optimizer update (not prepared), so warmup counts updates.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=_max_steps(cfg, stream),
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    base_unet = weights_sha256(trained_unet, denoiser_part(trained_unet))
    inputs = {
        "config": cfg.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT),
        "latents": [s.sha256 for s in manifest.shards],
        "base_unet": base_unet,
        "processes": accelerator.num_processes,
        "streams": stream.streams,
        "data_layout": DATA_LAYOUT,
    }
    fingerprint = sha256_json(inputs)
    identity = checkpoints.RunIdentity(fingerprint, inputs, _max_steps(cfg, stream))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        models=models,
        unet=unet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        stream=stream,
        fingerprint=fingerprint,
        model=model,
        checkpoint_dir=checkpoint_dir,
        reports=reports,
        latents=manifest,
        identity=identity,
        run_id=f"{stamp}-{fingerprint[:8]}",
        base_unet_sha256=base_unet,
    )


def _accelerator(cfg: TrainConfig, reports: Path):
    """Accelerate with the run's precision, accumulation and trackers (TensorBoard logs
    under `reports/logging_dir`; the trackers start in `_init_trackers`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # so torchrun on CPU means gloo DDP, not N copies
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(reports), logging_dir=str(reports / cfg.logging_dir)
        ),
    )


def _init_trackers(r: Run) -> None:
    """One tracker run per training run: TensorBoard writes
    `<logging_dir>/<tracker_project_name>/<run id>/`, wandb names the run by its id. A
    resumed run keeps its id (from the checkpoint), so its curve continues."""
    cfg, acc = r.cfg, r.accelerator
    if not acc.is_main_process or cfg.report_to == "none":
        return
    if cfg.report_to == "tensorboard":
        acc.project_configuration.logging_dir = str(
            r.reports / cfg.logging_dir / cfg.tracker_project_name
        )
        acc.init_trackers(r.run_id, config=tracker_config(cfg))
    else:
        kwargs = {"wandb": {"name": r.run_id}}
        acc.init_trackers(cfg.tracker_project_name, tracker_config(cfg), init_kwargs=kwargs)


def _max_steps(cfg: TrainConfig, stream: LatentStream) -> int:
    if cfg.max_train_steps:
        return cfg.max_train_steps
    micro = stream.micro_steps_for_epochs(cfg.num_train_epochs)
    return math.ceil(micro / cfg.gradient_accumulation_steps)


def train_steps(r: Run, step: int, max_steps: int, log: LossLog) -> LossLog:
    """Optimizer steps `step`..`max_steps`: the recipe's loop, one micro-batch at a time."""
    cfg, acc = r.cfg, r.accelerator
    objective = Objective(
        cfg.snr_gamma,
        cfg.noise_offset,
        cfg.input_perturbation,
        cfg.dream_training,
        cfg.dream_detail_preservation,
    )
    rows = r.stream.rows
    bias = timestep_weights(cfg, r.models.noise_scheduler.config.num_train_timesteps)
    flow = flow_objective(cfg, r.models.text.family)
    scheduler = r.models.noise_scheduler
    if r.models.text.family.objective == "flow":  # its tables on the device, once
        scheduler = Schedule.of(scheduler, acc.device)
    bar = progress(max_steps, "train", "step", disable=not acc.is_main_process, initial=step)
    started, images, micro_losses = time.perf_counter(), 0, []
    epoch = r.stream.position(step * cfg.gradient_accumulation_steps)[0]
    epoch_ends = r.stream.micro_steps_for_epochs(epoch + 1)
    for micro_step, batch in r.stream.batches(step * cfg.gradient_accumulation_steps):
        if step >= max_steps:
            break
        with acc.accumulate(r.unet):
            draws = StepDraws(cfg.seed, micro_step, rows, acc.device)
            if cfg.lora_dropout:  # dropout draws from the global generator: seed it per step
                torch.manual_seed(draws.generator.initial_seed() + acc.process_index)
            loss = training_loss(
                r.unet,
                r.models.text,
                scheduler,
                batch,
                draws,
                scaling_factor=r.latents.vae_scaling_factor,
                global_batch=r.stream.global_batch,
                device=acc.device,
                objective=objective,
                timestep_weights=bias,
                shift_factor=r.latents.vae_shift_factor,
                flow=flow,
            )
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(lora.trainable(r.unet), cfg.max_grad_norm)
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
        micro_losses.append(acc.gather(loss.detach()).mean())
        images += r.stream.global_batch
        r.samples_seen += r.stream.global_batch
        if not acc.sync_gradients:
            continue
        _ema_step(r)
        log.add(step + 1, torch.stack(micro_losses).mean(), r.lr_scheduler.get_last_lr()[0])
        r.lr_scheduler.step()
        step, micro_losses = step + 1, []
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == max_steps:
            _show(acc, bar, log, images / (time.perf_counter() - started))
        if micro_step + 1 >= epoch_ends:  # (accumulation can straddle the end)
            # Upstream validates after epoch e when e % validation_epochs == 0 (0-based).
            if cfg.validation_prompts and epoch % cfg.validation_epochs == 0:
                _validate(r, step)
            epoch = r.stream.position(micro_step + 1)[0]
            epoch_ends = r.stream.micro_steps_for_epochs(epoch + 1)
        if step % cfg.checkpointing_steps == 0 and acc.is_main_process:
            _checkpoint(r, step, log)
    bar.close()
    return log


def _ema_step(r: Run) -> None:
    ema = r.models.ema
    if ema is None:
        return
    if r.cfg.offload_ema:
        ema.to(r.accelerator.device, non_blocking=True)
    ema.step(lora.trainable(r.accelerator.unwrap_model(r.unet)))
    if r.cfg.offload_ema:
        ema.to("cpu", non_blocking=True)


def _show(acc, bar, log: LossLog, rate: float) -> None:
    """Progress bar and trackers, every `logging_steps` (the only host sync for the loss)."""
    for step, loss, lr in log.flush():
        acc.log({"train_loss": loss, "lr": lr}, step=step)
    _, loss, lr = log.rows[-1]
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")


def _checkpoint(r: Run, step: int, log: LossLog) -> None:
    epoch, batch = r.stream.position(step * r.cfg.gradient_accumulation_steps)
    log.flush()  # the history goes into the checkpoint
    checkpoints.save(
        r.checkpoint_folder,
        step,
        r.identity,
        r.accelerator.unwrap_model(r.unet),
        r.optimizer,
        r.lr_scheduler,
        r.accelerator.scaler,
        keep=r.cfg.checkpoints_total_limit,
        history=log.rows,
        ema=r.models.ema,
        data_position={"epoch": epoch, "batch": batch},
        run_id=r.run_id,
        extra={"samples_seen": r.samples_seen, "validated_at": r.validated_at},
    )


def _validate(r: Run, step: int) -> None:
    if r.accelerator.is_main_process:
        log_validation(
            r.cfg,
            r.model,
            r.unet,
            r.models.ema,
            r.accelerator,
            r.reports / "validation",
            step,
            r.latents.resolution,
        )
    r.validated_at = step


def _record(r: Run, report: TrainReport, rows: list) -> TrainRecord:
    """The trained model's record (its UNet hash is filled in by `save_pipeline`)."""
    every = max(1, math.ceil(len(rows) / 500))
    curve = [(int(s), float(loss)) for s, loss, _ in rows[::every]]
    if rows and curve[-1][0] != int(rows[-1][0]):
        curve.append((int(rows[-1][0]), float(rows[-1][1])))
    return TrainRecord(
        loss_curve=curve,
        unet_sha256="",
        config=r.cfg.model_dump(mode="json"),
        config_sha256=r.fingerprint,
        steps=report.steps,
        seed=r.cfg.seed,
        resumed_from_step=report.resumed_from_step,
        initial_loss=report.initial_loss,
        final_loss=report.final_loss,
        images_per_second=report.images_per_second,
        base_model=read_base_model_record(r.model),
        latents=r.latents.lineage(),
        pack=r.latents.pack,
        environment=environment(),
        adapter=lora.adapter_record(r.cfg, r.base_unet_sha256) if r.cfg.lora_rank else None,
        family=r.models.text.family.name,
    )


def _cache_vae(latents: LatentManifest) -> Path | None:
    """The VAE folder the latents were made with when it is not the model's own
    (`cache.pretrained_vae_model_name_or_path`: SDXL's fp16-fix VAE)."""
    if not latents.cache_config.get("pretrained_vae_model_name_or_path"):
        return None
    from components.cache_latents.encode import vae_source
    from components.common.config import CacheConfig

    folder, sub = vae_source(Path("."), CacheConfig(**latents.cache_config))
    return folder / sub if sub else folder


def save_pipeline(
    base: Path,
    unet,
    noise_scheduler,
    out: Path,
    record: TrainRecord | None = None,
    vae: Path | None = None,
) -> None:
    """Base model parts + the trained UNet (+ the training scheduler config) as one
    folder, with the training record (`training_record.json`) when given; `vae`: the
    VAE the latents were made with, saved in place of the base's."""
    part = denoiser_part(base)  # unet, or a transformer family's transformer
    with atomic_dir(out) as tmp:
        skip = (part, BASE_MODEL_RECORD, TRAIN_RECORD) + (("vae",) if vae else ())
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip))
        if vae is not None:
            shutil.copytree(vae, tmp / "vae", ignore=shutil.ignore_patterns("*.bin", "*.ckpt"))
        unet.save_pretrained(tmp / part, safe_serialization=True)
        noise_scheduler.save_pretrained(tmp / "scheduler")
        if record is not None:
            _write_record(record, tmp)


def save_adapter_model(base: Path, unet, noise_scheduler, out: Path, record: TrainRecord) -> None:
    """A LoRA run's output: the adapter (`pytorch_lora_weights.safetensors`), the
    training scheduler config and the record; with `lora_merge`, also `base` with the
    adapter merged in (a complete pipeline). The base model's own parts stay out
    otherwise: users load the adapter onto the base they already have."""
    with atomic_dir(out) as tmp:
        lora.save_adapter(unet, tmp, base)
        if record.adapter is not None and record.adapter.merged:
            part = denoiser_part(base)
            skip = shutil.ignore_patterns(part, "scheduler", BASE_MODEL_RECORD, TRAIN_RECORD)
            lora.save_merged(base, tmp, skip)
        noise_scheduler.save_pretrained(tmp / "scheduler")
        _write_record(record, tmp)


def _write_record(record: TrainRecord, folder: Path) -> None:
    """The record, with the identity of the weights just written."""
    sha = trained_weights_sha256(folder)
    write_record(record.model_copy(update={"unet_sha256": sha}), folder / TRAIN_RECORD)
