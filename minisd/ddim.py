"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

The DDIM paper writes αₜ for what DDPM calls ᾱₜ; below we keep DDPM's ᾱ. Eq. 12 of the paper, one
step from timestep t to the previous timestep of a shorter sub-sequence ("prev"):

    x_prev = √ᾱ_prev · x̂₀                          "predicted x₀"
           + √(1 − ᾱ_prev − σₜ²) · ε̂               "direction pointing to xₜ"
           + σₜ · z,   z ~ N(0, I)                  "random noise"

    with x̂₀ = (xₜ − √(1 − ᾱₜ) · ε̂) / √ᾱₜ  and, eq. 16,
    σₜ = η · √((1 − ᾱ_prev) / (1 − ᾱₜ)) · √(1 − ᾱₜ / ᾱ_prev).

η = 0 is the deterministic DDIM sampler; η = 1 makes σₜ² the DDPM posterior variance (ancestral
sampling).

Stable Diffusion's settings (diffusers' DDIMScheduler as SD configures it): "leading" timesteps with
steps_offset=1 (50 steps: 981, 961, …, 1), no clipping of x̂₀, and after the last timestep ᾱ_prev =
ᾱ₀ instead of 1 (`set_alpha_to_one=False`), so the result keeps a trace of noise of level √(1 − ᾱ₀)
≈ 0.029.

"prev" here is the next entry of the sampler's own timestep list (the paper's sub-sequence τ).
diffusers instead takes prev = t − T // N. The two agree for "leading" spacing and for "trailing"
when N divides T; for "linspace" (or "trailing" with other N) diffusers' prev is not a timestep the
sampler visits, and the two samplers differ.
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule, StepOutput, TimestepSampler


class DDIMSampler(TimestepSampler):
    final_alpha_bar = None  # ᾱ_prev after the last step is ᾱ₀ (SD's set_alpha_to_one=False)

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int,
        eta: float = 0.0,
        spacing: str = "leading",
        steps_offset: int = 1,
    ):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}"
            )
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        super().__init__(schedule, schedule.sampling_timesteps(num_steps, spacing, steps_offset))
        self.eta = float(eta)

    def sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        """σₜ of eq. 16 for the step from t to its previous timestep (0-dim, dtype of `like`)."""
        a_t, a_prev = self.alpha_bars(t, like)
        # σₜ² at η = 1: the DDPM posterior variance
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        return self.eta * variance.sqrt()

    def step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step of eq. 12 from timestep t (an entry of `self.timesteps`) to the previous one.

        Noise is drawn (from `generator`, or taken from `variance_noise`) only when η > 0.
        """
        a_t, a_prev = self.alpha_bars(t, x_t)
        x0, eps = self.schedule.predict_x0_and_eps(model_output, x_t, int(t))  # x̂₀ and ε̂
        sigma = self.sigma(t, x_t)

        # eq. 12 without σₜ·z
        prev_sample = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if self.eta > 0:
            prev_sample = prev_sample + sigma * self.draw_noise(x_t, generator, variance_noise)
        return StepOutput(prev_sample=prev_sample, pred_x0=x0)
