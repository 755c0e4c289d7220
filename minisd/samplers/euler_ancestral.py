"""Euler ancestral: an Euler step down to σ_down, then fresh noise back up to σᵢ₊₁ (k-diffusion's
`sample_euler_ancestral`; diffusers' EulerAncestralDiscreteScheduler).

DDPM's ancestral step, seen in x = x₀ + σ·ε: going from σᵢ to σᵢ₊₁ it removes more noise than the
ODE would and adds new noise of variance σ_up², chosen so the total is again σᵢ₊₁:

    σ_up² = σᵢ₊₁² · (σᵢ² − σᵢ₊₁²) / σᵢ²,        σ_down² = σᵢ₊₁² − σ_up²
    xᵢ₊₁ = xᵢ + (σ_down − σᵢ) · d(xᵢ, σᵢ) + σ_up · z,     z ~ N(0, I),   d = (x − D(x; σ)) / σ

σ_up² is the DDPM posterior variance β̃ₜ divided by ᾱ_prev, so this is DDIM with η = 1 (chapter
08) written in σ. Because every step forgets part of the past, its images keep changing as the
step count grows, where the deterministic samplers converge to the ODE's solution.
"""

from __future__ import annotations

import torch

from minisd.samplers.sigma_schedule import SigmaSampler, draw_noise, predict_x0
from minisd.schedule import StepOutput


class EulerAncestralSampler(SigmaSampler):
    stochastic = True

    def step(
        self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None, variance_noise=None
    ) -> StepOutput:
        """One ancestral step; z from `variance_noise` or drawn from `generator` (every step, the
        last one included, as diffusers, so a seed gives the same stream)."""
        i = self._current_index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        x0 = predict_x0(self.prediction_type, model_output, x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        prev_sample = x + derivative * (sigma_down - sigma)
        z = draw_noise(model_output, generator, variance_noise).to(model_output.dtype)
        prev_sample = prev_sample + z * sigma_up
        return self._advance(prev_sample.to(model_output.dtype), x0)
