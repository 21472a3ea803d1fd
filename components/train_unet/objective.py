"""Training's draws for the shared objective (`components/common/objective.py`).

latents = (mean + std·ε)·scaling_factor with a fresh ε (= `latent_dist.sample()`),
noise (+ `noise_offset`), a uniform timestep and the `input_perturbation` noise, all
drawn for the global batch from the step's generator and sliced to this rank's rows.
"""

from __future__ import annotations

import torch

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


def training_loss(
    unet,
    text_encoder,
    noise_scheduler,
    batch: dict[str, torch.Tensor],
    draws,
    *,
    scaling_factor: float,
    global_batch: int,
    device,
    objective: Objective | None = None,
) -> torch.Tensor:
    """One micro-step's loss (a scalar) for this rank's part of the global batch:
    `draws` gives the step's random tensors for the `global_batch` (sliced to this
    rank's rows), `scaling_factor` is the VAE's."""
    objective = objective or Objective()
    mean = batch["mean"].to(device, non_blocking=True)
    logvar = batch["logvar"].to(device, non_blocking=True)
    shape = (global_batch, *mean.shape[1:])
    eps, noise = draws.randn(shape).to(device), draws.randn(shape).to(device)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps, global_batch).to(device)
    if objective.noise_offset:
        offset = draws.randn((global_batch, shape[1], 1, 1)).to(device)
        noise = noise + objective.noise_offset * offset
    latents = (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor
    perturbation = None
    if objective.input_perturbation:
        perturbation = objective.input_perturbation * draws.randn(shape).to(device)
    hidden = text_conditioning(text_encoder, batch, device, latents.dtype)
    return denoising_loss(
        unet, noise_scheduler, latents, noise, timesteps, hidden, objective, perturbation
    )
