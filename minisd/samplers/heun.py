"""Heun's method (the explicit trapezoidal rule) on the probability-flow ODE: Karras et al. 2022,
EDM, Algorithm 1 with S_churn = 0; diffusers' HeunDiscreteScheduler.

With d(x, σ) = (x − D(x; σ)) / σ (see euler.py), one step from σᵢ to σᵢ₊₁ takes two model calls:

    x̃ = xᵢ + (σᵢ₊₁ − σᵢ) · d(xᵢ, σᵢ)                              Euler predictor (EDM l. 5–6)
    xᵢ₊₁ = xᵢ + (σᵢ₊₁ − σᵢ) · ½ (d(xᵢ, σᵢ) + d(x̃, σᵢ₊₁))          trapezoidal corrector (l. 7–8)

and the last step (σᵢ₊₁ = 0, where d cannot be evaluated) is a plain Euler step. The error per
step falls as h³ instead of Euler's h², so the global error falls as h² (chapter 12 measures it).

So that the sampling loop stays one call per entry, `timesteps` lists every evaluation:
t₀, t₁, t₁, t₂, t₂, …, t_{N−1}, t_{N−1} (2N − 1 entries), and `step` alternates between the
predictor (which returns x̃, evaluated next at σᵢ₊₁) and the corrector (which returns xᵢ₊₁).
"""

from __future__ import annotations

import torch

from minisd.samplers.sigma_schedule import SigmaSampler, predict_x0
from minisd.schedule import StepOutput


class HeunSampler(SigmaSampler):
    order = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # σ₀, σ₁, σ₁, …, σ_{N−1}, σ_{N−1}, 0 and t₀, t₁, t₁, …: one entry per model evaluation
        s = self.sigmas
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        self.timesteps = torch.cat([self.timesteps[:1], self.timesteps[1:].repeat_interleave(2)])
        self._first = None  # predictor's (xᵢ, d(xᵢ, σᵢ), σᵢ₊₁ − σᵢ) while the corrector is due

    def step(
        self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None, variance_noise=None
    ) -> StepOutput:
        """Predictor or corrector, alternately; deterministic."""
        i = self._current_index(t)
        if self._first is None:  # predictor, at σᵢ
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            x0 = predict_x0(self.prediction_type, model_output, x, sigma)
            derivative = (x - x0) / sigma
            dt = sigma_next - sigma
            self._first = (x, derivative, dt)
            return self._advance(x + derivative * dt, x0)
        # corrector: model_output was evaluated at x̃ and σᵢ₊₁
        sigma_next = self.sigmas[i]
        x0 = predict_x0(self.prediction_type, model_output, x, sigma_next)
        x_i, first_derivative, dt = self._first
        self._first = None
        derivative = (first_derivative + (x - x0) / sigma_next) / 2
        return self._advance(x_i + derivative * dt, x0)
