"""The recipe's training objective, on cached moments.

latents = (mean + std·ε)·scaling_factor with a fresh ε (= `latent_dist.sample()`),
noise (+ `noise_offset`), a uniform timestep, the noisy latents (from noise +
`input_perturbation`·ξ), the ε or v target, optional DREAM, and the MSE, optionally
min-SNR weighted (`snr_gamma`). Everything random is drawn for the global batch from
the step's generator and sliced to this rank's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from components.train_unet.data import step_generator


@dataclass(frozen=True)
class Objective:
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    dream_training: bool = False
    dream_detail_preservation: float = 1.0


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
    scaling_factor: float,
    global_batch: int,
    device,
    objective: Objective = Objective(),
) -> torch.Tensor:
    """One micro-step's loss (a scalar) for this rank's part of the global batch."""
    mean = batch["mean"].to(device, non_blocking=True)
    logvar = batch["logvar"].to(device, non_blocking=True)
    shape = (global_batch, *mean.shape[1:])
    eps, noise = draws.randn(shape).to(device), draws.randn(shape).to(device)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps, global_batch).to(device)
    if objective.noise_offset:
        offset = draws.randn((global_batch, shape[1], 1, 1)).to(device)
        noise = noise + objective.noise_offset * offset
    latents = (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor
    if objective.input_perturbation:
        perturbed = noise + objective.input_perturbation * draws.randn(shape).to(device)
        noisy_latents = noise_scheduler.add_noise(latents, perturbed, timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = text_conditioning(text_encoder, batch, device, latents.dtype)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    if objective.dream_training:
        from diffusers.training_utils import compute_dream_and_update_latents

        noisy_latents, target = compute_dream_and_update_latents(
            unet,
            noise_scheduler,
            timesteps,
            noise,
            noisy_latents,
            target,
            hidden,
            objective.dream_detail_preservation,
        )
    model_pred = unet(noisy_latents, timesteps, hidden, return_dict=False)[0]
    if objective.snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    weights = snr_weights(noise_scheduler, timesteps, objective.snr_gamma)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), for ε or v targets, as the recipe."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)


def text_conditioning(text_encoder, batch, device, dtype) -> torch.Tensor:
    """Cached hidden states when `cache.text_embeddings`, else the frozen text encoder."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"].to(device, dtype, non_blocking=True)
    with torch.no_grad():
        ids = batch["input_ids"].to(device, non_blocking=True)
        return text_encoder(ids, return_dict=False)[0]
