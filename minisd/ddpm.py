"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020) over all T timesteps or a strided subset of
them.

Each step samples from the forward-process posterior q(x_prev | xₜ, x₀) with x₀ replaced by the
network's estimate. From t to prev (prev = t − 1 for the full chain, or the next timestep of a
shorter list), the step's own noise is α'ₜ = ᾱₜ / ᾱ_prev, β'ₜ = 1 − α'ₜ (= βₜ when prev = t − 1),
and DDPM eq. 6–7 read

    μ(xₜ, x₀) = √ᾱ_prev · β'ₜ / (1 − ᾱₜ) · x₀  +  √α'ₜ · (1 − ᾱ_prev) / (1 − ᾱₜ) · xₜ
    β̃ₜ        = (1 − ᾱ_prev) / (1 − ᾱₜ) · β'ₜ        ("fixed_small" variance, clamped ≥ 1e-20)

    x_prev = μ + √β̃ₜ · z,   z ~ N(0, I),   noise added only while t > 0.

After the last timestep ᾱ_prev = 1, so the last step returns μ = x̂₀ (plus noise of std 1e-10 from
the clamp when the last timestep is not 0, exactly as diffusers does).

Timesteps as diffusers' DDPMScheduler: num_steps=None runs T−1, …, 0; otherwise
`schedule.sampling_timesteps` (default "leading"; steps_offset=1 as in SD's scheduler config,
diffusers' own default is 0), and prev is always the next timestep in the list.
"""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule, StepOutput, TimestepSampler


class DDPMSampler(TimestepSampler):
    final_alpha_bar = 1.0  # after the last step we are at clean data

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = None,
        spacing: str = "leading",
        steps_offset: int = 1,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if num_steps is None:
            timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1, dtype=torch.long)
        else:
            timesteps = schedule.sampling_timesteps(num_steps, spacing, steps_offset)
        super().__init__(schedule, timesteps)

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_prev | xₜ, x₀) for the step from t to its previous timestep (eq.
        6–7)."""
        a_t, a_prev = self.alpha_bars(t, x_t)
        alpha_step = a_t / a_prev  # α'ₜ
        beta_step = 1 - alpha_step  # β'ₜ
        x0_coef = a_prev.sqrt() * beta_step / (1 - a_t)
        xt_coef = alpha_step.sqrt() * (1 - a_prev) / (1 - a_t)
        mean = x0_coef * x0 + xt_coef * x_t
        variance = ((1 - a_prev) / (1 - a_t) * beta_step).clamp(min=1e-20)
        return mean, variance

    def step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """x_prev ~ N(μ(xₜ, x̂₀), β̃ₜ) for t in `self.timesteps`; z from `variance_noise` or drawn
        from `generator`."""
        x0, _ = self.schedule.predict_x0_and_eps(model_output, x_t, int(t))
        mean, variance = self.posterior(x0, x_t, t)
        prev_sample = mean
        if int(t) > 0:
            prev_sample = mean + variance.sqrt() * self.draw_noise(x_t, generator, variance_noise)
        return StepOutput(prev_sample=prev_sample, pred_x0=x0)
