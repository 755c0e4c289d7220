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
diffusers' own default is 0) or a custom descending list `timesteps`; prev is always the next
timestep in the list.

Variance types (diffusers' `variance_type`; Nichol & Dhariwal 2021 sec. 3.1 for the learned ones):
    fixed_small       β̃ₜ (above; what DDPM and SD use)
    fixed_small_log   the same, computed as exp(½ log β̃ₜ)
    fixed_large       β'ₜ (the step's own β: the upper bound of Ho et al. sec. 3.2)
    learned           the network outputs 2C channels; the second C are the variance itself
    learned_range     the second C are v ∈ [−1, 1]: log variance = ½(v+1)·log β'ₜ + ½(1−v)·log β̃ₜ
x̂₀ can be clipped or dynamically thresholded first (schedule.X0Limits).
"""
from __future__ import annotations

import torch

from minisd.schedule import (
    NoiseSchedule,
    StepOutput,
    TimestepSampler,
    X0Limits,
    check_choice,
    check_timesteps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class DDPMSampler(TimestepSampler):
    final_alpha_bar = 1.0  # after the last step we are at clean data

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = None,
        spacing: str = "leading",
        steps_offset: int = 1,
        *,
        timesteps=None,
        variance_type: str = "fixed_small",
        limits: X0Limits | None = None,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if timesteps is not None:
            if num_steps is not None:
                raise ValueError("give either num_steps or timesteps (a custom list), not both")
            timesteps = check_timesteps(timesteps, schedule.num_train_timesteps)
        elif num_steps is None:
            timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1, dtype=torch.long)
        else:
            timesteps = schedule.sampling_timesteps(num_steps, spacing, steps_offset)
        super().__init__(schedule, timesteps)
        self.variance_type = variance_type
        self.limits = limits if limits is not None else X0Limits()

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
        """x_prev ~ N(μ(xₜ, x̂₀), variance) for t in `self.timesteps`; z from `variance_noise` or
        drawn from `generator`. Learned variance types read model_output [B, 2C, …]."""
        predicted_variance = None
        if self.variance_type.startswith("learned"):
            if model_output.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs a model output with "
                    f"{2 * x_t.shape[1]} channels (prediction, variance), "
                    f"got {model_output.shape[1]}"
                )
            model_output, predicted_variance = model_output.split(x_t.shape[1], dim=1)
        x0, _ = self.schedule.predict_x0_and_eps(model_output, x_t, int(t))
        x0 = self.limits.apply(x0)
        mean, variance = self.posterior(x0, x_t, t)
        prev_sample = mean
        if int(t) > 0:
            z = self.draw_noise(x_t, generator, variance_noise)
            prev_sample = mean + self.noise_std(t, variance, predicted_variance, x_t) * z
        return StepOutput(prev_sample=prev_sample, pred_x0=x0)

    def noise_std(self, t, posterior_variance, predicted_variance, like) -> torch.Tensor:
        """The standard deviation of the step's noise, for the chosen variance type."""
        a_t, a_prev = self.alpha_bars(t, like)
        beta_step = 1 - a_t / a_prev  # β'ₜ
        if self.variance_type == "fixed_small":
            return posterior_variance.sqrt()
        if self.variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))
        if self.variance_type == "fixed_large":
            return beta_step.sqrt()
        if self.variance_type == "learned":
            return predicted_variance.sqrt()
        frac = (predicted_variance + 1) / 2  # learned_range
        log_variance = frac * torch.log(beta_step) + (1 - frac) * torch.log(posterior_variance)
        return torch.exp(0.5 * log_variance)
