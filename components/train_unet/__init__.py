"""train: UNet fine-tuning on cached latents (the diffusers text-to-image recipe).

Each step draws latents = (mean + std * eps) * scaling_factor from the cached VAE
moments with a fresh eps, as the recipe's `latent_dist.sample()` does, adds noise at
a random timestep and regresses the UNet on the epsilon (or v) target.

Everything random in a step (which samples, eps, noise, timesteps) is a pure function
of (seed, micro-step), so resuming from a checkpoint continues exactly where the run
stopped, mid-epoch included, and N processes see the same global batch as one.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.cache_latents import load_split, read_latent_manifest
from components.common.config import TrainConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import atomic_dir, sha256_json, write_json_atomic
from components.common.models import (
    check_model_dir,
    load_noise_scheduler,
    load_text_encoder,
    load_unet,
    weights_sha256,
)
from components.train_unet import checkpoints

# Settings that change how a run is saved, not what it computes.
_NOT_IN_FINGERPRINT = {"checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint"}


@dataclass
class TrainReport:
    steps: int
    samples_seen: int
    initial_loss: float
    final_loss: float
    images_per_second: float
    resumed_from_step: int

    def summary(self) -> str:
        start = f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else ""
        return (
            f"trained {self.steps} steps{start}: loss {self.initial_loss:.4f} -> "
            f"{self.final_loss:.4f}, {self.images_per_second:.1f} img/s"
        )


class LatentBatches:
    """Deterministic batches over cached samples: micro-step -> (rank's samples, draws)."""

    def __init__(self, samples: list[dict], batch_size: int, seed: int, rank: int, world: int):
        self.samples, self.batch, self.seed = samples, batch_size, seed
        self.rank, self.world = rank, world
        self.global_batch = batch_size * world
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.train_batch_size={batch_size} x {world} processes is more than the "
                f"{len(samples)} training samples; lower train_batch_size"
            )
        self._perm_epoch, self._perm = -1, None

    def __call__(self, micro_step: int) -> tuple[dict[str, torch.Tensor], torch.Generator]:
        epoch, within = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.samples), generator=g), epoch
        lo = within * self.global_batch
        chosen = self._perm[lo : lo + self.global_batch].tolist()
        draws = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 * (micro_step + 1))
        flips = torch.rand(self.global_batch, generator=draws) < 0.5
        mine = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
        batch = {}
        for name in ("mean", "logvar"):
            rows = [
                self._view(self.samples[i], name, bool(f))
                for i, f in zip(chosen, flips, strict=True)
            ]
            batch[name] = torch.stack(rows)
        for name in ("input_ids", "encoder_hidden_states"):
            if name in self.samples[0]:  # hidden states: when `cache.text_embeddings`
                batch[name] = torch.stack([self.samples[i][name] for i in chosen])
        return {k: v[mine] for k, v in batch.items()}, _DrawsForRank(draws, mine)

    @staticmethod
    def _view(sample: dict, name: str, flip: bool) -> torch.Tensor:
        return sample[f"{name}_flip"] if flip and f"{name}_flip" in sample else sample[name]


class _DrawsForRank:
    """Random tensors drawn for the global batch, then sliced to this rank's part."""

    def __init__(self, generator: torch.Generator, rows: slice):
        self.generator, self.rows = generator, rows

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)[self.rows]

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)[self.rows]


def training_loss(
    unet,
    text_encoder,
    noise_scheduler,
    batch,
    draws,
    scaling_factor: float,
    global_batch: int,
    device,
) -> torch.Tensor:
    """One step of the recipe's objective on cached moments; returns the MSE loss."""
    mean, logvar = batch["mean"].to(device), batch["logvar"].to(device)
    shape = (global_batch, *mean.shape[1:])
    eps, noise = draws.randn(shape).to(device), draws.randn(shape).to(device)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps, global_batch).to(device)

    latents = (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if "encoder_hidden_states" in batch:  # cached by `t2i cache` (text encoder is frozen)
        encoder_hidden_states = batch["encoder_hidden_states"].to(device, latents.dtype)
    else:
        with torch.no_grad():
            ids = batch["input_ids"].to(device)
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def run(
    cfg: TrainConfig,
    latents: Path,
    model: Path,
    out: Path,
    reports: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainReport:
    """Fine-tune the UNet of `model` on the latent shards in `latents`.

    Writes a complete diffusers pipeline to `out` (atomically), train metrics and the
    loss log to `reports`, checkpoints to `checkpoint_dir`. Raises ConfigError for
    impossible settings (before any work) and T2IError for missing/corrupt inputs.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    out, model = Path(out), check_model_dir(Path(model))
    reports = Path(reports) if reports else out.parent / "train"
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out.parent / "checkpoints"
    _check_runtime(cfg)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    manifest = read_latent_manifest(latents)
    data = LatentBatches(
        load_split(latents, "train"),
        cfg.train_batch_size,
        cfg.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )

    noise_scheduler = load_noise_scheduler(model)
    if cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.mixed_precision, torch.float32
    )
    text_encoder = (
        load_text_encoder(model).requires_grad_(False).to(accelerator.device, weight_dtype)
    )
    unet = load_unet(model)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    updates_per_epoch = math.ceil(data.steps_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    # Stepped once per optimizer update (not prepared), so warmup counts updates.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_steps,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)

    fingerprint = sha256_json(
        {
            "config": cfg.model_dump(exclude=_NOT_IN_FINGERPRINT),
            "latents": [s["sha256"] for s in manifest["shards"]],
            "base_unet": weights_sha256(model, "unet"),
            "processes": accelerator.num_processes,
        }
    )
    step, history = 0, []
    resume = checkpoints.find_resume(checkpoint_dir, cfg.resume_from_checkpoint, fingerprint)
    if resume is not None:
        step = checkpoints.load(
            resume, accelerator.unwrap_model(unet), optimizer, lr_scheduler, accelerator.scaler
        )
        history = _read_history(resume)
        accelerator.print(f"resuming from {resume} (step {step})")
    resumed_from = step

    bar = tqdm(
        total=max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    started, images, accumulated = time.perf_counter(), 0, []
    while step < max_steps:
        micro_step = step * cfg.gradient_accumulation_steps + len(accumulated)
        batch, draws = data(micro_step)
        with accelerator.accumulate(unet):
            loss = training_loss(
                unet,
                text_encoder,
                noise_scheduler,
                batch,
                draws,
                manifest["vae_scaling_factor"],
                data.global_batch,
                accelerator.device,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        accumulated.append(accelerator.gather(loss.detach()).mean().item())
        images += data.global_batch
        if not accelerator.sync_gradients:
            continue
        history.append(
            [step + 1, sum(accumulated) / len(accumulated), lr_scheduler.get_last_lr()[0]]
        )
        lr_scheduler.step()
        step, accumulated = step + 1, []
        rate = images / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(
            loss=f"{history[-1][1]:.4f}", lr=f"{history[-1][2]:.2e}", img_s=f"{rate:.1f}"
        )
        if step % cfg.checkpointing_steps == 0 and accelerator.is_main_process:
            checkpoints.save(
                checkpoint_dir,
                step,
                fingerprint,
                accelerator.unwrap_model(unet),
                optimizer,
                lr_scheduler,
                accelerator.scaler,
                cfg.checkpoints_total_limit,
                history,
            )
    bar.close()
    accelerator.wait_for_everyone()

    elapsed = time.perf_counter() - started
    report = _report(
        history,
        step,
        resumed_from,
        images / elapsed if images else 0.0,
        data.global_batch * cfg.gradient_accumulation_steps,
    )
    if accelerator.is_main_process:
        save_pipeline(model, accelerator.unwrap_model(unet), noise_scheduler, out)
        write_reports(reports, report, history)
    accelerator.end_training()
    return report


def save_pipeline(base: Path, unet, noise_scheduler, out: Path) -> None:
    """Base model parts + the trained UNet (+ the training scheduler config) as one folder."""
    with atomic_dir(out) as tmp:
        shutil.copytree(
            base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", "base_model.json")
        )
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        noise_scheduler.save_pretrained(tmp / "scheduler")


def write_reports(reports: Path, report: TrainReport, history: list) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    write_json_atomic(reports / "metrics.json", asdict(report))
    tmp = reports / "loss.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(history)
    tmp.replace(reports / "loss.csv")


def _report(history, steps, resumed_from, rate, samples_per_step) -> TrainReport:
    if not history:
        raise T2IError("training ran no step (max_train_steps reached already?)")
    window = max(1, min(10, len(history) // 5))
    losses = [h[1] for h in history]
    return TrainReport(
        steps=steps,
        samples_seen=steps * samples_per_step,
        initial_loss=sum(losses[:window]) / window,
        final_loss=sum(losses[-window:]) / window,
        images_per_second=round(rate, 2),
        resumed_from_step=resumed_from,
    )


def _read_history(checkpoint: Path) -> list:
    import json

    return json.loads((checkpoint / "state.json").read_text()).get("history", [])


def _check_runtime(cfg: TrainConfig) -> None:
    """Settings that cannot work on this machine fail before any work."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
