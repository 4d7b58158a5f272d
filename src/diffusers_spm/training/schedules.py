"""The partial denoising and the loss timestep, per prediction space (docs/training.md, "The algorithm").

- `DiffusionSchedule` (SD 1.x, 2.x, XL): the reference's DDIM; after `k` of `T` steps the loss is
  taken at entry `k * 1000 / T` of the 1000-step schedule, in epsilon space (v and x0 predictions
  are converted: `losses.to_epsilon`).
- `FlowSchedule` (SD3, Flux): the family's `FlowMatchEulerDiscreteScheduler` with its shift (and,
  with `use_dynamic_shifting`, the shift `mu` for the latents' size); after `k` Euler steps the
  latents sit at `sigmas[k]`, so the loss is taken at `timesteps[k]`, in velocity space (`e - x0`),
  the space the model predicts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from ..families import DenoiserFamily
from .losses import to_epsilon


class DiffusionSchedule:
    """The reference's DDIM (default spacing and offsets) with the base model's betas."""

    def __init__(self, base_config: Any, prediction_type: str, steps: int, device: torch.device) -> None:
        self.prediction_type, self.steps = prediction_type, steps
        self.scheduler = self._ddim(base_config)
        self.scheduler.set_timesteps(steps, device=device)
        loss_schedule = self._ddim(base_config)
        loss_schedule.set_timesteps(loss_schedule.config.num_train_timesteps)
        self.loss_timesteps = loss_schedule.timesteps
        self.init_noise_sigma = self.scheduler.init_noise_sigma

    def _ddim(self, base: Any) -> DDIMScheduler:
        return DDIMScheduler(
            num_train_timesteps=base.get("num_train_timesteps", 1000), beta_start=base.get("beta_start", 0.00085),
            beta_end=base.get("beta_end", 0.012), beta_schedule=base.get("beta_schedule", "scaled_linear"),
            clip_sample=False, prediction_type=self.prediction_type,
        )

    def timesteps(self, latent_shape: Sequence[int]) -> torch.Tensor:
        """The T-step schedule the partial denoising walks (the same for every size)."""
        return self.scheduler.timesteps

    def loss_timestep(self, steps: int, latent_shape: Sequence[int]) -> torch.Tensor:
        return self.loss_timesteps[int(steps * len(self.loss_timesteps) / self.steps)]

    def to_loss_space(self, output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return to_epsilon(output, sample, self.scheduler.alphas_cumprod[int(timestep)], self.prediction_type)


class FlowSchedule:
    """Flow matching, `x_s = (1 - s) x0 + s e` with velocity `e - x0`, on the family's own schedule."""

    prediction_type = "flow"
    init_noise_sigma = 1.0  # the schedule starts at s = 1: pure noise

    def __init__(self, base_config: Any, family: DenoiserFamily, denoiser: nn.Module, steps: int,
                 device: torch.device) -> None:
        self.family, self.denoiser, self.steps, self.device = family, denoiser, steps, device
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(base_config)

    def timesteps(self, latent_shape: Sequence[int]) -> torch.Tensor:
        """The T-step schedule for latents of this shape; resets the scheduler's step counter."""
        kwargs = self.family.timestep_kwargs(self.scheduler, self.steps, self.denoiser, latent_shape)
        self.scheduler.set_timesteps(self.steps, device=self.device, **kwargs)
        return self.scheduler.timesteps

    def loss_timestep(self, steps: int, latent_shape: Sequence[int]) -> torch.Tensor:
        """Where `steps` Euler steps leave the latents: `sigmas[steps]`, as a timestep."""
        return self.timesteps(latent_shape)[steps]

    def to_loss_space(self, output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return output.float()


Schedule = DiffusionSchedule | FlowSchedule


def schedule_for(pipe: Any, family: DenoiserFamily, denoiser: nn.Module, prediction_type: str, steps: int,
                 device: torch.device) -> Schedule:
    base: SchedulerMixin = pipe.scheduler
    if prediction_type == "flow":
        return FlowSchedule(base.config, family, denoiser, steps, device)
    return DiffusionSchedule(base.config, prediction_type, steps, device)
