"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

The DDIM paper writes αₜ for what DDPM calls ᾱₜ; below we keep DDPM's ᾱ. Eq. 12 of the paper, one
step from timestep t to the previous timestep of a shorter sub-sequence ("prev"):

    x_prev = √ᾱ_prev · x̂₀                          "predicted x₀"
           + √(1 − ᾱ_prev − σₜ²) · ε̂               "direction pointing to xₜ"
           + σₜ · z,   z ~ N(0, I)                  "random noise"

    with x̂₀ = (xₜ − √(1 − ᾱₜ) · ε̂) / √ᾱₜ  and, eq. 16,
    σₜ = η · √((1 − ᾱ_prev) / (1 − ᾱₜ)) · √(1 − ᾱₜ / ᾱ_prev).

η = 0 is the deterministic DDIM sampler; η = 1 makes σₜ² the DDPM posterior variance (ancestral
sampling). With η = 0 the step is Euler's method on the probability-flow ODE (chapter 12).

Stable Diffusion's settings (diffusers' DDIMScheduler as SD configures it): "leading" timesteps with
steps_offset=1 (50 steps: 981, 961, …, 1), no clipping of x̂₀, and after the last timestep ᾱ_prev =
ᾱ₀ instead of 1 (`set_alpha_to_one=False`), so the result keeps a trace of noise of level √(1 − ᾱ₀)
≈ 0.029.

Which timestep is "prev" (`prev_rule`):
  "diffusers" (default)  prev = t − T // N, as diffusers' DDIMScheduler, so its images reproduce.
  "listed"               prev = the next entry of the sampler's own list (the paper's sub-sequence
                         τ), minisd's earlier behaviour.
The two agree for "leading" spacing and for "trailing" when N divides T. For "linspace" (or
"trailing" with other N) diffusers' prev is not a timestep the sampler visits: e.g. linspace with
N = 10 visits 999, 888, …, 111, 0 but steps 999 → 899, 888 → 788, …: each step lands 11 timesteps
short of where the next one is evaluated, a small inconsistency the "listed" rule removes.

Options as diffusers': clip_sample / thresholding of x̂₀ (schedule.X0Limits), set_alpha_to_one,
custom `timesteps` (these always use the "listed" rule), and prediction_type "sample" or a
zero-terminal-SNR schedule through the NoiseSchedule. `DDIMInversion` runs the step backwards,
from an image to the noise that regenerates it.
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

PREV_RULES = ("diffusers", "listed")


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(
            f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}"
        )
    return float(eta)


class DDIMSampler(TimestepSampler):
    final_alpha_bar = None  # ᾱ_prev after the last step is ᾱ₀ (SD's set_alpha_to_one=False)

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = None,
        eta: float = 0.0,
        spacing: str = "leading",
        steps_offset: int = 1,
        *,
        timesteps=None,
        prev_rule: str = "diffusers",
        set_alpha_to_one: bool = False,
        limits: X0Limits | None = None,
    ):
        self.eta = _check_eta(eta)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_choice("prev_rule", prev_rule, PREV_RULES)
        if (num_steps is None) == (timesteps is None):
            raise ValueError("give either num_steps or timesteps (a custom list), not both")
        T = schedule.num_train_timesteps
        previous = None
        if timesteps is not None:
            timesteps = check_timesteps(timesteps, T)
        else:
            timesteps = schedule.sampling_timesteps(num_steps, spacing, steps_offset)
            if prev_rule == "diffusers":
                previous = {t: max(t - T // num_steps, -1) for t in timesteps.tolist()}
        super().__init__(schedule, timesteps, previous)
        self.final_alpha_bar = 1.0 if set_alpha_to_one else None
        self.limits = limits if limits is not None else X0Limits()

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
        x0 = self.limits.apply(x0)  # (ε̂ is kept as predicted, as diffusers does)
        sigma = self.sigma(t, x_t)

        # eq. 12 without σₜ·z
        prev_sample = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if self.eta > 0:
            prev_sample = prev_sample + sigma * self.draw_noise(x_t, generator, variance_noise)
        return StepOutput(prev_sample=prev_sample, pred_x0=x0)


class DDIMInversion:
    """DDIM run backwards (η = 0): from a clean latent x₀ up to the x_T that DDIM maps back to it
    (diffusers' DDIMInverseScheduler; used to edit real images, e.g. Mokady et al. 2023).

    Eq. 12 with η = 0 is a deterministic map between consecutive timesteps; solving it the other
    way with ε̂ evaluated at the *current* (lower-noise) point gives, from s = t − T//N to t,

        x_t = √ᾱ_t · x̂₀ + √(1 − ᾱ_t) · ε̂,     x̂₀ = (x_s − √(1 − ᾱ_s) · ε̂) / √ᾱ_s

    The UNet is called at timestep t (as diffusers does) while x is still at s: an approximation
    that is exact in the limit of many steps. Timesteps ascend: "leading" 1, 21, …, 981 for 50
    steps (steps_offset=1), "trailing" 19, 39, …, 999 for 50 steps ("linspace" is not offered, as
    diffusers). Before the first step ᾱ_s is ᾱ₀ (or 1 with set_alpha_to_one=True).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int,
        spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_choice("spacing", spacing, ("leading", "trailing"))
        self.schedule = schedule
        self.timesteps = schedule.sampling_timesteps(num_steps, spacing, steps_offset).flip(0)
        self.stride = schedule.num_train_timesteps // num_steps
        self.initial_alpha_bar = None if not set_alpha_to_one else 1.0
        self.limits = X0Limits(clip_sample=clip_sample, clip_sample_range=clip_sample_range)

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step(self, model_output, t, x, generator=None, variance_noise=None) -> StepOutput:
        """One inverse step: x at timestep t − T//N (or clean) → x at timestep t."""
        t = int(t)
        T = self.schedule.num_train_timesteps
        s = min(t - self.stride, T - 1)
        a_t = self.schedule.alpha_bar(t, x)
        if s >= 0:
            a_s = self.schedule.alpha_bar(s, x)
        elif self.initial_alpha_bar is None:
            a_s = self.schedule.alpha_bar(0, x)
        else:
            a_s = torch.tensor(self.initial_alpha_bar, dtype=x.dtype)
        # x̂₀, ε̂ as if x were at s: the prediction formulas with ᾱ_s
        if self.schedule.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - (1 - a_s) ** 0.5 * eps) / a_s**0.5
        elif self.schedule.prediction_type == "v_prediction":
            x0 = a_s**0.5 * x - (1 - a_s) ** 0.5 * model_output
            eps = a_s**0.5 * model_output + (1 - a_s) ** 0.5 * x
        else:
            x0 = model_output
            eps = (x - a_s**0.5 * x0) / (1 - a_s) ** 0.5
        x0 = self.limits.apply(x0)
        prev_sample = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
        return StepOutput(prev_sample=prev_sample, pred_x0=x0)
