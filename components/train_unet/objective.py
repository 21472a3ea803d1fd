"""Training's draws for the shared objective (`components/common/objective.py`).

latents = (mean + std·ε)·scaling_factor with a fresh ε (= `latent_dist.sample()`),
noise (+ `noise_offset`), a uniform timestep and the `input_perturbation` noise, all
drawn for the global batch from the step's generator and sliced to this rank's rows.
"""

from __future__ import annotations

import torch

from components.common.conditioning import TextEncoders, predict
from components.common.families import SD
from components.common.flow import (
    FlowObjective,
    flow_matching_loss,
    timestep_density,
    timesteps_and_sigmas,
)
from components.common.objective import (
    Objective,
    denoising_loss,
    snr_weights,
    text_conditioning,
)
from components.train_unet.data import step_generator

__all__ = ["Objective", "StepDraws", "snr_weights", "training_loss"]


class StepDraws:
    """Random tensors of one micro-step: drawn for the global batch on `device`, then
    sliced to this rank's `rows`."""

    def __init__(self, seed: int, micro_step: int, rows: slice, device):
        self.generator = step_generator(seed, micro_step, device)
        self.rows, self.device = rows, device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)[self.rows]

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)[self.rows]

    def density(self, flow: FlowObjective, n: int) -> torch.Tensor:
        """u for `n` flow-matching timesteps, from the step's generator."""
        return timestep_density(flow, n, self.generator, self.device)[self.rows]

    def weighted(self, weights: torch.Tensor, n: int) -> torch.Tensor:
        """`n` timesteps drawn with replacement in proportion to `weights` (the SDXL
        script's `torch.multinomial(weights, bsz, replacement=True)`)."""
        w = weights.to(self.device)
        return torch.multinomial(w, n, replacement=True, generator=self.generator)[self.rows]


def training_loss(
    unet,
    text,
    noise_scheduler,
    batch: dict[str, torch.Tensor],
    draws,
    *,
    scaling_factor: float,
    global_batch: int,
    device,
    objective: Objective | None = None,
    timestep_weights: torch.Tensor | None = None,
    shift_factor: float | None = None,
    flow: FlowObjective | None = None,
) -> torch.Tensor:
    """One micro-step's loss (a scalar) for this rank's part of the global batch:
    `draws` gives the step's random tensors for the `global_batch` (sliced to this
    rank's rows), `scaling_factor` is the VAE's (flow families: `noise_scheduler` may
    be its `flow.Schedule` on the device); `text` the frozen text encoders
    (`conditioning.TextEncoders`, or an SD text encoder); `timestep_weights` the
    SDXL recipe's timestep bias (None: uniform)."""
    family = text.family if isinstance(text, TextEncoders) else SD
    if family.objective == "flow":
        return _flow_loss(unet, text, noise_scheduler, batch, draws, family, scaling_factor,
                          shift_factor, global_batch, device, flow or FlowObjective())  # fmt: skip
    objective = objective or Objective()
    mean = batch["mean"].to(device, non_blocking=True)
    logvar = batch["logvar"].to(device, non_blocking=True)
    shape = (global_batch, *mean.shape[1:])
    eps, noise = draws.randn(shape).to(device), draws.randn(shape).to(device)
    if timestep_weights is None:
        high = noise_scheduler.config.num_train_timesteps
        timesteps = draws.randint(high, global_batch).to(device)
    else:
        timesteps = draws.weighted(timestep_weights, global_batch).to(device)
    if objective.noise_offset:
        offset = draws.randn((global_batch, shape[1], 1, 1)).to(device)
        noise = noise + objective.noise_offset * offset
    latents = (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor
    perturbation = None
    if objective.input_perturbation:
        perturbation = objective.input_perturbation * draws.randn(shape).to(device)
    hidden, added = text_conditioning(text, batch, device, latents.dtype)
    return denoising_loss(
        unet, noise_scheduler, latents, noise, timesteps, hidden, objective, perturbation,
        added=added,
    )  # fmt: skip


def timestep_weights(cfg, num_timesteps: int) -> torch.Tensor | None:
    """The SDXL recipe's timestep bias (`generate_timestep_weights`): None for uniform
    sampling, else each timestep's weight. ConfigError for a range beyond the
    scheduler's timesteps."""
    from components.common.errors import ConfigError

    strategy = cfg.timestep_bias_strategy
    if strategy == "none":
        return None
    weights = torch.ones(num_timesteps)
    count = int(cfg.timestep_bias_portion * num_timesteps)
    if strategy == "later":
        biased = slice(-count, None) if count else slice(0, 0)
    elif strategy == "earlier":
        biased = slice(0, count)
    else:
        if cfg.timestep_bias_end > num_timesteps:
            raise ConfigError(
                f"train.timestep_bias_end {cfg.timestep_bias_end}: beyond the scheduler's "
                f"{num_timesteps} timesteps"
            )
        biased = slice(cfg.timestep_bias_begin, cfg.timestep_bias_end)
    weights[biased] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def _flow_loss(unet, text, scheduler, batch, draws, family, scale, shift, global_batch, device,
               flow: FlowObjective) -> torch.Tensor:  # fmt: skip
    """Flow matching (SD3's script): latents (z - shift)·scale from the cached moments,
    σ from the scheme's density, the loss of `flow.py`."""
    mean = batch["mean"].to(device, non_blocking=True)
    logvar = batch["logvar"].to(device, non_blocking=True)
    shape = (global_batch, *mean.shape[1:])
    eps, noise = draws.randn(shape).to(device), draws.randn(shape).to(device)
    latents = ((mean + torch.exp(0.5 * logvar) * eps) - (shift or 0.0)) * scale
    # u stays on the device it was drawn on: with a `Schedule` there, no host sync
    timesteps, sigmas = timesteps_and_sigmas(scheduler, draws.density(flow, global_batch))
    hidden, added = text_conditioning(text, batch, device, latents.dtype)
    return flow_matching_loss(
        lambda x, t: predict(family, unet, x, t, hidden, added, flow.guidance_scale),
        latents, noise, timesteps.to(device), sigmas.to(device), flow,
    )  # fmt: skip
