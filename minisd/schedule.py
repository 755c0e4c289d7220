"""The forward (noising) process of a diffusion model, and the pieces every sampler shares.

Forward process (DDPM, Ho et al. 2020, eq. 4): with βₜ the noise added at step t, αₜ = 1 − βₜ and ᾱₜ
= ∏ₛ≤ₜ αₛ,

    q(xₜ | x₀) = N(√ᾱₜ · x₀, (1 − ᾱₜ) · I)     so     xₜ = √ᾱₜ · x₀ + √(1 − ᾱₜ) · ε,   ε ~ N(0, I).

The network is trained to predict either ε ("epsilon", SD 1.x and SD 2.x-base), the velocity
v = √ᾱₜ · ε − √(1 − ᾱₜ) · x₀ ("v_prediction", SD 2.x 768px; Salimans & Ho 2022, sec. 4), or x₀
itself ("sample"). Any of them, together with xₜ, determines both x₀ and ε:

    epsilon:       x₀ = (xₜ − √(1 − ᾱₜ) · ε) / √ᾱₜ
    v_prediction:  x₀ = √ᾱₜ · xₜ − √(1 − ᾱₜ) · v,      ε = √ᾱₜ · v + √(1 − ᾱₜ) · xₜ
    sample:        x₀ = output,                          ε = (xₜ − √ᾱₜ · x₀) / √(1 − ᾱₜ)

Beta schedules (index t = 0 … T−1):
    scaled_linear  βₜ = linspace(√β_start, √β_end, T)²   (SD: 0.00085 … 0.012, T = 1000)
    linear         βₜ = linspace(β_start, β_end, T)      (original DDPM used 1e-4 … 0.02)
    cosine         βₜ = min(1 − ᾱ(t+1)/ᾱ(t), 0.999),   ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
                   with s = 0.008
                   (Nichol & Dhariwal 2021, eq. 17; diffusers calls it "squaredcos_cap_v2")

Precision: the schedule is held in float32 and ᾱ is a float32 cumulative product, as diffusers does.
The original CompVis code takes the product in float64 and rounds afterwards; the two ᾱ differ by up
to 1.1e-6 relative and 1/√ᾱ (the factor that turns ε into x₀) by 5.5e-6, so a float64 schedule could
not match diffusers to 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .checks import check_choice, check_number

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class ScheduleConfig:
    beta_schedule: str = "scaled_linear"  # how βₜ grows (module docstring)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    # Lin et al. 2024, Algorithm 1: shift and scale √ᾱ so that ᾱ_{T−1} = 0 (pure noise at the end)
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_number("num_train_timesteps", self.num_train_timesteps, 1, 10**7, integer=True)
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                "need 0 < beta_start <= beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}"
            )


def cosine_betas(
    num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999
) -> torch.Tensor:
    """βₜ = 1 − ᾱ(t+1)/ᾱ(t), ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2); capped so the last steps don't
    destroy everything."""
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta).to(torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR: Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", WACV 2024), Algorithm 1.

    SD's schedule ends at ᾱ_{T−1} ≈ 0.0047: the "pure noise" the sampler starts from still holds a
    little signal that training saw and sampling never does. Shift √ᾱ so its last entry is 0 and
    scale it so its first entry is unchanged, then turn ᾱ back into β:
        √ᾱ' = (√ᾱ − √ᾱ_{T−1}) · √ᾱ₀ / (√ᾱ₀ − √ᾱ_{T−1}),   β'ₜ = 1 − ᾱ'ₜ / ᾱ'ₜ₋₁   (β'_{T−1} = 1)
    float32, in diffusers' order of operations.
    """
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    T = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        root = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32)
        betas = root**2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    else:
        betas = cosine_betas(T)
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


class NoiseSchedule:
    """βₜ, αₜ, ᾱₜ for t = 0 … T−1, the forward process q(xₜ | x₀), and conversions between ε, v and
    x₀.

    `t` arguments are integer timesteps: a Python int, a 0-dim tensor, or a LongTensor [B] (one per
    batch item).
    """

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config if config is not None else ScheduleConfig()
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        # ᾱₜ, float32 like diffusers (see module docstring)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def alpha_bar(self, t, like: torch.Tensor) -> torch.Tensor:
        """ᾱₜ in the dtype of `like`, shaped to broadcast against it: [B, 1, 1, …] on `like`'s
        device for a per-item t, a 0-dim CPU tensor for one t (it broadcasts against any device)."""
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
            t = t.to("cpu")
        elif isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
        t = torch.as_tensor(t, dtype=torch.long)
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or have shape [B], got shape {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must be in [0, {self.num_train_timesteps - 1}], got {t.tolist()}"
            )
        value = self.alphas_cumprod[t]
        if t.ndim == 1:
            if like.ndim == 0 or like.shape[0] != t.shape[0]:
                raise ValueError(
                    f"t has {t.shape[0]} entries but the batch has shape {tuple(like.shape)}"
                )
            value = value.reshape(-1, *([1] * (like.ndim - 1)))
        if t.ndim == 0:
            # One number: kept as a CPU scalar, which PyTorch hands to GPU kernels by value. A copy
            # to the GPU here would make every sampler step wait for the GPU to finish.
            return value.to(dtype=like.dtype)
        return value.to(device=like.device, dtype=like.dtype)

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """xₜ = √ᾱₜ · x₀ + √(1 − ᾱₜ) · ε: jump straight from clean data to noise level t (diffusers'
        add_noise)."""
        _check_same_shape(x0=x0, noise=noise)
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = √ᾱₜ · ε − √(1 − ᾱₜ) · x₀ (diffusers' get_velocity)."""
        _check_same_shape(x0=x0, noise=noise)
        a = self.alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network should output at (xₜ, t): ε or v, depending on the prediction type."""
        _check_same_shape(x0=x0, noise=noise)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.v_target(x0, noise, t)

    def predict_x0_and_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recover (x₀, ε) from the network's output at xₜ (formulas in the module docstring)."""
        _check_same_shape(model_output=model_output, x_t=x_t)
        a = self.alpha_bar(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        elif self.prediction_type == "sample":  # the network predicts x₀ itself
            x0 = model_output
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            v = model_output
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * v
            eps = a.sqrt() * v + (1 - a).sqrt() * x_t
        return x0, eps

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ᾱₜ / (1 − ᾱₜ) (float32; same shape as t)."""
        shape = t.shape if isinstance(t, torch.Tensor) else ()
        a = self.alpha_bar(t, torch.empty(shape))
        return a / (1 - a)

    def sampling_timesteps(
        self, num_steps: int, spacing: str = "leading", steps_offset: int = 1
    ) -> torch.Tensor:
        """The descending timesteps a sampler visits, as diffusers' `set_timesteps` picks them.

        With T training steps and N sampling steps:
          leading   t = i·(T // N) + steps_offset, i = N−1 … 0   (SD: T=1000, N=50 → 981, 961, …, 1)
          trailing  t = round(T − i·T/N) − 1, i = 0 … N−1        (starts at T−1, the pure-noise end)
          linspace  t = round(linspace(0, T−1, N)) reversed
        `steps_offset` only shifts "leading". Leading with steps_offset ≥ 1 and N = T reaches t = T,
        which no sampler accepts (diffusers lists it too, and fails when it steps).
        """
        T = self.num_train_timesteps
        check_number("num_steps", num_steps, 1, T, integer=True)
        check_choice("spacing", spacing, SPACINGS)
        check_number("steps_offset", steps_offset, 0, T, integer=True)
        if spacing == "leading":
            timesteps = torch.arange(num_steps, dtype=torch.long) * (T // num_steps) + steps_offset
            return timesteps.flip(0)
        i = torch.arange(num_steps, dtype=torch.float64)
        if spacing == "trailing":
            # Written as T + i·δ with δ = (T − T/N) − T, which is how numpy's arange (used by
            # diffusers) steps, so the float64 values round to the same integers. (diffusers' arange
            # also yields an extra, invalid t = −1 for some N, e.g. 61; we return exactly N
            # timesteps.)
            delta = (T - T / num_steps) - T
            return torch.round(T + i * delta).long() - 1
        # linspace: i·(T−1)/(N−1) with the last entry set to exactly T−1, as numpy's linspace
        # computes it
        if num_steps == 1:
            return torch.zeros(1, dtype=torch.long)
        timesteps = i * ((T - 1) / (num_steps - 1))
        timesteps[-1] = T - 1
        return timesteps.round().long().flip(0)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per image, s = the `ratio`
    quantile of |x̂₀|, clamped to [1, max_value]; x̂₀ ← clamp(x̂₀, −s, s) / s. With s = 1 this is
    plain clipping to [−1, 1]; above 1 it pulls saturated pixels inward instead of flattening them.
    """
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


@dataclass
class X0Limits:
    """What a DDIM/DDPM step does to x̂₀ before using it (diffusers' clip_sample / thresholding).

    clip_sample: clamp x̂₀ to [−clip_sample_range, clip_sample_range] (the original DDPM code
    clips to [−1, 1]; SD's scheduler config turns it off: latents are not in [−1, 1]).
    thresholding: `dynamic_threshold` instead (takes precedence over clip_sample).
    """

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def check_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """Custom timesteps: strictly descending integers in [0, T − 1]."""
    t = torch.as_tensor(timesteps)
    if t.ndim != 1 or len(t) == 0 or t.is_floating_point():
        raise ValueError(f"timesteps must be a non-empty list of integers, got {timesteps!r:.80}")
    if bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"timesteps must be strictly descending, got {t.tolist()}")
    if t.min() < 0 or t.max() >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {t.tolist()}")
    return t.long()


def _check_same_shape(**tensors: torch.Tensor) -> None:
    (name_a, a), *rest = tensors.items()
    for name_b, b in rest:
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(
                f"{name_a} and {name_b} must be tensors, got {type(a).__name__}, {type(b).__name__}"
            )
        if a.shape != b.shape:
            raise ValueError(
                f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )


# -------------------------------------------------------------------------------------------------
# Shared by the samplers (ddim.py, ddpm.py)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x at the next (smaller) timestep of the sampler
    pred_x0: torch.Tensor  # the sampler's estimate of the clean sample at this step

    @property
    def pred_original_sample(self) -> torch.Tensor:  # diffusers' name for pred_x0
        return self.pred_x0


class Sampler(Protocol):
    timesteps: torch.Tensor

    def step(self, model_output, t, x_t, generator=None, variance_noise=None) -> StepOutput: ...


class TimestepSampler:
    """A reverse process over a descending list of timesteps τ_N > … > τ_1: each step goes from τᵢ
    to τᵢ₋₁.

    After the last timestep there is no τ₀ in the schedule; subclasses say which ᾱ stands in for it
    (`final_alpha_bar`): DDIM uses ᾱ₀ (SD's `set_alpha_to_one=False`), DDPM uses 1 (i.e. lands on
    clean data).
    """

    final_alpha_bar: float | None = None  # None means ᾱ₀
    order = 1  # one model call per step
    init_noise_sigma = 1.0  # x_T ~ N(0, I): the sample is xₜ itself

    def scale_model_input(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The UNet reads xₜ unchanged (σ-based samplers in minisd/samplers/ rescale it)."""
        return x_t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """xₜ = √ᾱₜ · x₀ + √(1 − ᾱₜ) · ε at one timestep t for the whole batch (img2img)."""
        return self.schedule.q_sample(x0, int(t), noise)

    def __init__(
        self, schedule: NoiseSchedule, timesteps: torch.Tensor, previous: dict | None = None
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        T = schedule.num_train_timesteps
        if timesteps.min() < 0 or timesteps.max() >= T:
            raise ValueError(
                f"sampling timesteps must lie in [0, {T - 1}], got {timesteps.min().item()} … "
                f"{timesteps.max().item()} (leading spacing with steps_offset=1 and num_steps == "
                "num_train_timesteps reaches T: use steps_offset=0 or spacing='trailing')"
            )
        self.schedule = schedule
        self.timesteps = timesteps
        # τᵢ → τᵢ₋₁: by default the next listed timestep (−1: after the last one)
        listed = dict(zip(timesteps.tolist(), timesteps[1:].tolist() + [-1]))
        self._previous = listed if previous is None else previous

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def previous_timestep(self, t) -> int:
        """τᵢ₋₁ for t = τᵢ: the next entry of `timesteps` (DDIM: see its `prev_rule`), or −1 after
        the last one."""
        t = int(t)
        if t not in self._previous:
            raise ValueError(
                f"t={t} is not one of this sampler's timesteps {self.timesteps.tolist()}"
            )
        return self._previous[t]

    def alpha_bars(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ at t, ᾱ at the previous timestep) as 0-dim tensors in the dtype of `like`."""
        prev = self.previous_timestep(t)
        a_t = self.schedule.alpha_bar(int(t), like)
        if prev >= 0:
            a_prev = self.schedule.alpha_bar(prev, like)
        elif self.final_alpha_bar is None:
            a_prev = self.schedule.alpha_bar(0, like)
        else:
            # a CPU scalar, as alpha_bar gives for one t
            a_prev = torch.tensor(self.final_alpha_bar, dtype=like.dtype)
        return a_t, a_prev

    def timesteps_for_strength(self, strength: float) -> torch.Tensor:
        """img2img: the tail of `timesteps` to run when starting from a noised image instead of pure
        noise.

        As diffusers' StableDiffusionImg2ImgPipeline: init_timestep = min(int(N·strength), N),
        t_start = max(N − init_timestep, 0), return timesteps[t_start:]. strength = 1 runs every
        step (the image is fully replaced by noise); strength = 0.3 with N = 50 runs the last 15.
        Start from `add_noise(x0, noise, returned[0])` and step through the returned timesteps.
        """
        check_number("strength", strength, 0, 1)
        n = self.num_steps
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        return self.timesteps[t_start:]

    @staticmethod
    def draw_noise(
        like: torch.Tensor, generator: torch.Generator | None, variance_noise: torch.Tensor | None
    ):
        """z ~ N(0, I) shaped like `like`: the given `variance_noise`, or fresh from `generator`."""
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            _check_same_shape(variance_noise=variance_noise, x_t=like)
            return variance_noise.to(device=like.device, dtype=like.dtype)
        # drawn on the generator's device (CPU generators give the same numbers whatever the target
        # device)
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(
            like.device
        )
