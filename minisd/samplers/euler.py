"""Euler's method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1 without its
second-order correction and with S_churn = 0; diffusers' EulerDiscreteScheduler).

With x = x₀ + σ·ε and D(x; σ) = x̂₀ the network's clean-sample estimate, the ODE of EDM eq. 1 in the
σ variable (Song et al. 2021's probability-flow ODE, eq. 13, rewritten) is

    dx/dσ = d(x, σ) = (x − D(x; σ)) / σ              (= ε̂, the predicted noise)

and one Euler step from σᵢ to σᵢ₊₁ is

    xᵢ₊₁ = xᵢ + (σᵢ₊₁ − σᵢ) · d(xᵢ, σᵢ).

For an ε-model that is xᵢ₊₁ = xᵢ + (σᵢ₊₁ − σᵢ)·ε̂: exactly DDIM (η = 0) written in x = xₜ/√ᾱ,
which is why chapter 12 calls DDIM "the Euler step of the probability-flow ODE".
"""

from __future__ import annotations

import torch

from minisd.samplers.sigma_schedule import SigmaSampler, predict_x0
from minisd.schedule import StepOutput


class EulerSampler(SigmaSampler):
    def step(
        self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None, variance_noise=None
    ) -> StepOutput:
        """One Euler step from σᵢ (the σ of timestep t) to σᵢ₊₁; deterministic (no noise drawn)."""
        i = self._current_index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        x0 = predict_x0(self.prediction_type, model_output, x, sigma)  # D(xᵢ; σᵢ)
        derivative = (x - x0) / sigma  # d(xᵢ, σᵢ)
        prev_sample = x + derivative * (sigma_next - sigma)
        return self._advance(prev_sample.to(model_output.dtype), x0)
