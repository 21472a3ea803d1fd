"""Flow matching, as diffusers' SD3 and FLUX scripts train it
(`examples/dreambooth/train_dreambooth_sd3.py`, `..._flux.py`), shared by training and
the evaluation gate (as `objective.py` is for the denoising families).

- Timesteps: u ~ the `weighting_scheme`'s density (`logit_normal`: sigmoid of
  N(logit_mean, logit_std); `mode`: 1 - u - mode_scale·(cos²(πu/2) - 1 + u); else
  uniform), then timestep = scheduler.timesteps[int(u·N)] and σ its sigma
  (`FlowMatchEulerDiscreteScheduler`, with the model's shift).
- Noisy input (1 - σ)·x + σ·ε; target ε - x, or with `precondition_outputs` (SD3) the
  prediction mapped to x̂ = x_t - σ·v and the target x.
- Loss weighting by the same scheme: `sigma_sqrt` σ⁻², `cosmap` 2 / (π(1 - 2σ + 2σ²)),
  else 1; the MSE per sample, then the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowObjective:
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    guidance_scale: float = 3.5  # FLUX dev's guidance embedding (its script's default)


def flow_objective(cfg, family) -> FlowObjective:
    """The run's flow objective: `train.*`, null values taken from the family's script."""
    return FlowObjective(
        weighting_scheme=cfg.weighting_scheme or family.weighting_scheme,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
        precondition_outputs=(
            family.precondition_outputs
            if cfg.precondition_outputs is None
            else cfg.precondition_outputs
        ),
        guidance_scale=3.5 if cfg.guidance_scale is None else cfg.guidance_scale,
    )


def timestep_density(
    objective: FlowObjective, n: int, generator: torch.Generator, device="cpu"
) -> torch.Tensor:
    """u in [0, 1) for `n` samples, from the scheme's density (diffusers'
    `compute_density_for_timestep_sampling`)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        weighting_scheme=objective.weighting_scheme,
        batch_size=n,
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
        mode_scale=objective.mode_scale,
        device=device,
        generator=generator,
    )


@dataclass(frozen=True)
class Schedule:
    """A flow scheduler's training timesteps and sigmas on one device, copied there once
    (the scheduler keeps them on the CPU), so a step indexes them where u was drawn."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    count: int  # num_train_timesteps

    @classmethod
    def of(cls, scheduler, device) -> Schedule:
        n = len(scheduler.timesteps)
        return cls(scheduler.timesteps.to(device), scheduler.sigmas[:n].to(device),
                   scheduler.config.num_train_timesteps)  # fmt: skip


def timesteps_and_sigmas(schedule, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training timesteps and sigmas at int(u·N) of a `Schedule` (or a scheduler,
    copied to u's device for this call). `mode` can reach the ends: the index is kept
    inside the schedule."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule.of(schedule, u.device)
    index = (u * schedule.count).long().clamp(0, len(schedule.timesteps) - 1)
    return schedule.timesteps[index], schedule.sigmas[index]


def sigma_timesteps(scheduler, sigma: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` copies of the schedule's entry nearest `sigma`: the evaluation's fixed σ."""
    i = int((scheduler.sigmas[: len(scheduler.timesteps)] - sigma).abs().argmin())
    return scheduler.timesteps[i].repeat(n), scheduler.sigmas[i].repeat(n)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    objective: FlowObjective = FlowObjective(),
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss of `predict(noisy, timesteps)` (the family's denoiser, conditioned) on
    latents `x0` (already shifted and scaled) at `sigmas`, a scalar (`mean`) or one
    value per sample (`none`)."""
    s = sigmas.to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    noisy = (1.0 - s) * x0 + s * noise
    pred = predict(noisy, timesteps.to(x0.device))
    if objective.precondition_outputs:
        pred, target = pred * (-s) + noisy, x0
    else:
        target = noise - x0
    weighting = loss_weighting(objective.weighting_scheme, s)
    per_sample = (
        (weighting.float() * (pred.float() - target.float()) ** 2).reshape(len(x0), -1).mean(1)
    )
    return per_sample if reduction == "none" else per_sample.mean()
