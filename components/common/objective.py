"""The denoising objective of the diffusers text-to-image recipe, shared by training
and evaluation, so the held-out loss the gate compares is computed by the code that
trained.

`denoising_loss` takes the latents, noise and timesteps (training draws them per step;
evaluation fixes them), adds noise (+ `input_perturbation`), builds the epsilon or v
target, optionally applies DREAM, and returns the MSE, optionally min-SNR weighted
(`snr_gamma`), per sample or as the mean. A model that predicts another kind of target
than the scheduler's (the base model of a v-prediction fine-tune, in evaluation) has
its output converted to the scheduler's kind first (`as_prediction`), so both models
are scored on the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from components.common.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Objective:
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    dream_training: bool = False
    dream_detail_preservation: float = 1.0


def denoising_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    objective: Objective = Objective(),
    perturbation: torch.Tensor | None = None,
    reduction: str = "mean",
    model_prediction: str | None = None,
    added: dict | None = None,
) -> torch.Tensor:
    """The recipe's loss for noised `latents`: a scalar (`mean`) or one value per sample
    (`none`). `noise` already holds any noise offset; `perturbation` is the extra
    noise of `input_perturbation` (None: off). The target is of the scheduler's
    prediction type; `model_prediction` says what `unet` outputs when that differs
    (its output is converted to the target's kind). ConfigError for a prediction type
    the recipe cannot train. `added`: the UNet's `added_cond_kwargs` (SDXL's pooled
    text embedding and size/crop ids; see `conditioning.py`)."""
    extra = {"added_cond_kwargs": added} if added is not None else {}
    if perturbation is not None:
        noisy_latents = noise_scheduler.add_noise(latents, noise + perturbation, timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = noise_scheduler.config.prediction_type
    target = target_of(noise_scheduler, prediction, latents, noise, timesteps)
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
    model_pred = unet(noisy_latents, timesteps, hidden, **extra, return_dict=False)[0]
    if model_prediction is not None and model_prediction != prediction:
        model_pred = as_prediction(
            noise_scheduler, model_pred, model_prediction, prediction, noisy_latents, timesteps
        )
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = loss.mean(dim=list(range(1, loss.ndim)))
    if objective.snr_gamma is not None:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, objective.snr_gamma)
    return per_sample if reduction == "none" else per_sample.mean()


def target_of(noise_scheduler, prediction: str, latents, noise, timesteps) -> torch.Tensor:
    """What a model of `prediction` type regresses on: the noise, or the velocity."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(
        f"prediction_type {prediction!r} cannot be trained by this recipe "
        f"({' or '.join(PREDICTION_TYPES)}); set train.prediction_type"
    )


def as_prediction(noise_scheduler, pred, source: str, target: str, noisy, timesteps):
    """A model output of kind `source` as the equivalent `target`-kind prediction, given
    the noisy latents x_t = a·x0 + s·ε (a² = alphas_cumprod[t], s² = 1 - a²):
    v = a·ε - s·x0 = (ε - s·x_t) / a, and ε = s·x_t + a·v."""
    for kind in (source, target):
        if kind not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {kind!r}: not one of {', '.join(PREDICTION_TYPES)}")
    if source == target:
        return pred
    alphas = noise_scheduler.alphas_cumprod.to(pred.device)[timesteps].float()
    shape = (-1, *[1] * (pred.ndim - 1))
    a, s = alphas.sqrt().view(shape), (1 - alphas).sqrt().view(shape)
    pred, noisy = pred.float(), noisy.float()
    if source == "epsilon":  # -> v
        return (pred - s * noisy) / a
    return s * noisy + a * pred  # v -> epsilon


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), for ε or v targets, as the recipe."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)


def text_conditioning(text, batch, device, dtype, family=None):
    """(encoder_hidden_states, added_cond_kwargs or None): the cached text states when
    `cache.text_embeddings`, else the frozen encoders'. `text`: a
    `conditioning.TextEncoders`, or (SD) a bare text encoder."""
    from components.common.conditioning import TextEncoders, denoiser_inputs
    from components.common.families import SD

    if not isinstance(text, TextEncoders):
        text = TextEncoders(SD, [], [text] if text is not None else None)
    return denoiser_inputs(family or text.family, text, batch, device, dtype)
