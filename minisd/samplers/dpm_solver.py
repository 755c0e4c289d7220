"""DPM-Solver++ 2M and its stochastic variant 2M SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", Algorithm 2; diffusers'
DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order=2,
solver_type "midpoint").

Work in xₜ = αₜ·x₀ + σₜ·ε with αₜ = √ᾱₜ, σₜ = √(1 − ᾱₜ) (so σ_EDM = σₜ/αₜ) and the half-log-SNR
λₜ = log(αₜ/σₜ). The probability-flow ODE written for the data prediction x̂₀ has the exact
solution (DPM-Solver++ eq. 9)

    x_t = (σ_t/σ_s)·x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂₀(λ) dλ.

Holding x̂₀ constant over the step gives the first-order update (= DDIM, eq. 10); with
h = λ_t − λ_s,

    x_t = (σ_t/σ_s)·x_s − α_t·(e^(−h) − 1)·x̂₀(s).

"2M" (multistep, second order) reuses the previous step's x̂₀ to extrapolate it linearly in λ:
with r = h_prev / h,

    D = x̂₀(s) + (1/(2r))·(x̂₀(s) − x̂₀(s_prev))
    x_t = (σ_t/σ_s)·x_s − α_t·(e^(−h) − 1)·D                      (Algorithm 2, line 5)

one model call per step, as Euler, but second-order accurate. The first step (no history) and the
last (down to σ = 0) are first order, as diffusers does.

2M SDE (k-diffusion's `sample_dpmpp_2m_sde`, diffusers' "sde-dpmsolver++"): the same
integration for the reverse SDE instead of the ODE; its linear part decays twice as fast and fresh
noise makes up the variance:

    x_t = (σ_t/σ_s)·e^(−h)·x_s + α_t·(1 − e^(−2h))·D + σ_t·√(1 − e^(−2h))·z,   z ~ N(0, I).

Timesteps are whole numbers, spaced as diffusers does for this scheduler ("linspace": N of
round(linspace(0, T−1, N+1)), the last dropped); Karras sigmas span the whole training range and
their timesteps are rounded.
"""

from __future__ import annotations

import torch

from minisd.samplers.sigma_schedule import (
    SigmaSampler,
    draw_noise,
    interpolate,
    karras_sigmas,
    sigma_to_t,
)
from ..checks import check_choice, check_number
from ..schedule import StepOutput, X0Limits

DPM_SPACINGS = ("linspace", "leading", "trailing")


def dpm_timesteps(T: int, num_steps: int, spacing: str, steps_offset: int) -> torch.Tensor:
    """diffusers' DPMSolverMultistepScheduler timesteps: descending integers, float64."""
    check_number("num_steps", num_steps, 1, T, integer=True)
    check_choice("spacing", spacing, DPM_SPACINGS)
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    if spacing == "linspace":
        t = i * ((T - 1) / num_steps)
        t[-1] = T - 1
        return t.round().flip(0)[:-1]
    if spacing == "leading":
        return (i * (T // (num_steps + 1))).flip(0)[:-1] + steps_offset
    return torch.round(T + i[:-1] * ((T - T / num_steps) - T)) - 1


class DPMSolverPlusPlus2MSampler(SigmaSampler):
    sde = False

    def __init__(
        self,
        schedule,
        num_steps,
        karras=False,
        spacing="linspace",
        steps_offset=1,
        limits: X0Limits | None = None,
        final_sigma: str = "zero",
        lower_order_final: bool = True,
    ):
        super().__init__(schedule, num_steps, False, spacing, steps_offset)
        check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
        # diffusers' final_sigmas_type and lower_order_final: the last step ends at σ = 0 (and is
        # first order), or at the smallest training σ (first order only for N < 15 steps)
        self.final_sigma, self.lower_order_final = final_sigma, lower_order_final
        self.karras = bool(karras)
        self.limits = limits if limits is not None else X0Limits()  # thresholding of x̂₀
        T = len(self.train_sigmas)
        t = dpm_timesteps(T, num_steps, spacing, steps_offset)
        if self.karras:  # over the whole training range, whatever the spacing
            sigma_min, sigma_max = self.train_sigmas[0].item(), self.train_sigmas[-1].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps)
            t = sigma_to_t(sigmas, self.train_sigmas)
            if schedule.config.beta_schedule != "cosine":
                t = t.round()
        else:
            sigmas = interpolate(t, self.train_sigmas)
        last = 0.0 if final_sigma == "zero" else self.train_sigmas[0].item()
        self.sigmas = torch.cat([sigmas, sigmas.new_full((1,), last)]).float()
        self.timesteps = t.float()
        self._previous_x0 = None  # x̂₀ of the previous step, for the 2M extrapolation

    init_noise_sigma = 1.0  # xₜ itself, not x₀ + σ·ε: the noise starts at unit variance

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        self._current_index(t)
        return x  # already the UNet's xₜ

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(self.sigmas[self.index_of(t)])
        return alpha * x0 + sigma * noise

    @staticmethod
    def alpha_sigma(sigma_edm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(αₜ, σₜ) from σ_EDM = σₜ/αₜ, using αₜ² + σₜ² = 1."""
        alpha = 1 / ((sigma_edm**2 + 1) ** 0.5)
        return alpha, sigma_edm * alpha

    def lam(self, i: int) -> torch.Tensor:
        """λ = log αₜ − log σₜ at entry i of `sigmas`."""
        alpha, sigma = self.alpha_sigma(self.sigmas[i])
        return torch.log(alpha) - torch.log(sigma)

    def data_prediction(self, model_output, x, i):
        """x̂₀ from the network's output at xₜ."""
        alpha, sigma = self.alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (x - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * model_output
        else:
            x0 = model_output
        return self.limits.apply(x0)

    def step(
        self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None, variance_noise=None
    ) -> StepOutput:
        """One DPM-Solver++(2M) step from timestep t to the next (2M SDE: z from `variance_noise`
        or drawn from `generator`)."""
        i = self._current_index(t)
        x = x.float()
        x0 = self.data_prediction(model_output, x, i)
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[i + 1])
        _, sigma_s = self.alpha_sigma(self.sigmas[i])
        h = self.lam(i + 1) - self.lam(i)
        # D = x̂₀(s) + ½·slope, slope = (x̂₀(s) − x̂₀(s_prev)) / r; the two terms are kept apart
        # below (as diffusers does) so the float32 rounding, and so the result, is the same
        n = len(self.timesteps)
        last_first_order = self.final_sigma == "zero" or (self.lower_order_final and n < 15)
        if self._previous_x0 is None or (i == n - 1 and last_first_order):
            slope = None  # first order: x̂₀ held constant over the step
        else:  # second order: x̂₀ extrapolated linearly in λ from the previous step's
            r = (self.lam(i) - self.lam(i - 1)) / h
            slope = (1.0 / r) * (x0 - self._previous_x0)
        self._previous_x0 = x0
        if not self.sde:
            decay, weight = sigma_t / sigma_s, -(alpha_t * (torch.exp(-h) - 1.0))
            noise_term = None
        else:
            decay, weight = sigma_t / sigma_s * torch.exp(-h), alpha_t * (1 - torch.exp(-2.0 * h))
            z = draw_noise(x, generator, variance_noise)
            noise_term = sigma_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * z
        prev_sample = decay * x + weight * x0
        if slope is not None:
            prev_sample = prev_sample + 0.5 * weight * slope
        if noise_term is not None:
            prev_sample = prev_sample + noise_term
        return self._advance(prev_sample.to(model_output.dtype), x0)


class DPMSolverPlusPlus2MSDESampler(DPMSolverPlusPlus2MSampler):
    sde = True
    stochastic = True
