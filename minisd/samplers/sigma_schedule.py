"""The σ view of the noise schedule, and the machinery the σ-based samplers share.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM),
sec. 2 and Table 1: divide xₜ = √ᾱₜ · x₀ + √(1 − ᾱₜ) · ε by √ᾱₜ and the sample becomes

    x = xₜ / √ᾱₜ = x₀ + σ · ε,        σ(t) = √((1 − ᾱₜ) / ᾱₜ)        (SD: σ from 0.029 to 14.6)

plain data plus noise of standard deviation σ. In this variable the probability-flow ODE of Song
et al. 2021 (eq. 13) is EDM eq. 1 with σ(t) = t,

    dx/dσ = (x − D(x; σ)) / σ,        D(x; σ) = x̂₀, the network's estimate of the clean sample,

which every sampler in this folder integrates from σ_max down to 0. The UNet was trained on xₜ,
so its input is x · √ᾱ = x / √(σ² + 1) (`scale_model_input`), and its output turns into x̂₀ by

    epsilon:       x̂₀ = x − σ · ε̂
    v_prediction:  x̂₀ = x / (σ² + 1) − σ / √(σ² + 1) · v̂
    sample:        x̂₀ = the output

Step counts and spacings (as diffusers' Euler/Heun schedulers pick them): N timesteps, possibly
fractional ("linspace": linspace(0, T−1, N) reversed), σ interpolated linearly in t between the
training σ's, and a final σ = 0 appended. Karras sigmas (EDM eq. 5, ρ = 7):

    σᵢ = (σ_max^(1/ρ) + i/(N−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,   i = 0 … N−1

spend more steps at low noise; each σᵢ is mapped back to a (fractional) t for the UNet by
interpolating log σ. The float64 / float32 switches below follow diffusers so that its numbers are
reproduced to float32 rounding.
"""

from __future__ import annotations

import torch

from ..checks import check_choice, check_number
from ..schedule import NoiseSchedule, StepOutput

SIGMA_SPACINGS = ("linspace", "leading", "trailing")


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ(t) = √((1 − ᾱₜ) / ᾱₜ) for t = 0 … T−1, float32 (increasing)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def spaced_timesteps(T: int, num_steps: int, spacing: str, steps_offset: int) -> torch.Tensor:
    """Descending, possibly fractional timesteps, float64 (as diffusers' Euler and Heun
    `set_timesteps`)."""
    check_number("num_steps", num_steps, 1, T, integer=True)
    check_choice("spacing", spacing, SIGMA_SPACINGS)
    i = torch.arange(num_steps, dtype=torch.float64)
    if spacing == "linspace":  # numpy's linspace in float64, rounded to float32 as diffusers does
        t = i * ((T - 1) / (num_steps - 1)) if num_steps > 1 else i
        if num_steps > 1:
            t[-1] = T - 1
        return t.float().double().flip(0)
    if spacing == "leading":
        return (i * (T // num_steps) + steps_offset).flip(0)
    # trailing, stepped as numpy's arange(T, 0, −T/N) does
    return torch.round(T + i * ((T - T / num_steps) - T)) - 1


def interpolate(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values[t] for fractional t by linear interpolation between neighbours (numpy's interp),
    float64."""
    values = values.double()
    low = t.floor().long().clamp(0, len(values) - 1)
    high = (low + 1).clamp(max=len(values) - 1)
    w = t - low.double()
    return values[low] + w * (values[high] - values[low])


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0):
    """EDM eq. 5: σ spaced uniformly in σ^(1/ρ) from σ_max to σ_min, float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each σ: log σ interpolated linearly between training steps."""
    log_train = train_sigmas.float().log().double()  # float32 logs, as diffusers (numpy) takes them
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    # index of the last training σ at or below each σ (clipped so a neighbour above exists)
    low = (log_sigma[None, :] >= log_train[:, None]).long().cumsum(0).argmax(0)
    low = low.clamp(max=len(log_train) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def predict_x0(prediction_type: str, model_output, x, sigma):
    """x̂₀ = D(x; σ) from the network's output at x = x₀ + σ·ε (module docstring)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


class SigmaSampler:
    """A sampler over σ₀ > σ₁ > … > σ_N = 0, one model call per entry of `timesteps`.

    The loop that drives any sampler here (the same for DDIM and DDPM, which scale nothing):

        x = noise * sampler.init_noise_sigma
        for t in sampler.timesteps.tolist():
            output = unet(sampler.scale_model_input(x, t), t, ...)
            x = sampler.step(output, t, x, generator).prev_sample

    `step` must be called once per timestep, in order: multistep and two-stage samplers keep their
    state between calls (like diffusers' schedulers). Which entry is being stepped is found from
    the first t passed, so img2img may start part-way down the list.
    """

    order = 1  # model calls per step of the underlying solver (Heun: 2)
    stochastic = False  # draws noise in `step`

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int,
        karras: bool = False,
        spacing: str = "linspace",
        steps_offset: int = 1,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        self.karras, self.spacing = bool(karras), spacing
        alphas_cumprod = schedule.alphas_cumprod.clone()
        if schedule.config.rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2**-24  # ᾱ = 0 would make σ infinite (diffusers' choice)
        self.train_sigmas = training_sigmas(alphas_cumprod)
        t = spaced_timesteps(len(alphas_cumprod), num_steps, spacing, steps_offset)
        sigmas = interpolate(t, self.train_sigmas)
        if self.karras:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
            t = sigma_to_t(sigmas, self.train_sigmas)
        self.num_steps = num_steps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # σ_N = 0: clean data
        self.timesteps = t.float()
        self._index = None

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of x at the first step: σ_max (√(σ_max² + 1) for "leading",
        as diffusers, whose leading timesteps stop short of T − 1)."""
        sigma_max = self.sigmas.max().item()
        return sigma_max if self.spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def index_of(self, t) -> int:
        """Position of timestep t in `timesteps`; where t appears twice (Heun), the second."""
        matches = (self.timesteps == torch.tensor(float(t), dtype=torch.float32)).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"t={t} is not one of this sampler's timesteps {self.timesteps.tolist()}"
            )
        return matches[1 if len(matches) > 1 else 0].item()

    def _current_index(self, t) -> int:
        if self._index is None:
            self._index = self.index_of(t)
        if self._index >= len(self.timesteps):
            raise ValueError("this sampler has already taken all its steps: make a new one")
        expected = self.timesteps[self._index].item()
        if float(torch.tensor(float(t), dtype=torch.float32)) != expected:
            raise ValueError(f"expected the step at t={expected} next, got t={t}")
        return self._index

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The UNet's input xₜ = x · √ᾱ = x / √(σ² + 1)."""
        sigma = self.sigmas[self._current_index(t)]
        return x / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x = x₀ + σ(t) · ε, the starting point of img2img at timestep t."""
        return x0 + self.sigmas[self.index_of(t)] * noise

    def timesteps_for_strength(self, strength: float) -> torch.Tensor:
        """img2img: the tail of `timesteps` run from a noised image (as diffusers: the last
        int(N·strength) solver steps, each of `order` model calls)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        t_start = max(self.num_steps - min(int(self.num_steps * strength), self.num_steps), 0)
        return self.timesteps[t_start * self.order :]

    def _advance(self, prev_sample, pred_x0) -> StepOutput:
        self._index += 1
        return StepOutput(prev_sample=prev_sample, pred_x0=pred_x0)


def draw_noise(like: torch.Tensor, generator, variance_noise) -> torch.Tensor:
    """z ~ N(0, I) shaped like `like`: `variance_noise`, or drawn from `generator` in float32."""
    if variance_noise is not None:
        if generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        if variance_noise.shape != like.shape:
            raise ValueError(
                f"variance_noise has shape {tuple(variance_noise.shape)}, the sample "
                f"{tuple(like.shape)}"
            )
        return variance_noise.to(device=like.device, dtype=torch.float32)
    device = generator.device if generator is not None else like.device
    z = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return z.to(like.device)
