"""The samplers, by name: one interface for DDIM, DDPM and the σ-based ODE/SDE solvers.

    sampler = make_sampler("dpmpp_2m", schedule, steps=20, karras=True)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps.tolist():              # Heun lists each of its two evaluations
        output = unet(sampler.scale_model_input(x, t), t, context)
        x = sampler.step(output, t, x, generator=generator).prev_sample

Every sampler has `timesteps`, `init_noise_sigma`, `scale_model_input(x, t)`, `step(model_output,
t, x, generator=None, variance_noise=None) -> StepOutput(prev_sample, pred_x0 a.k.a.
pred_original_sample)`, `add_noise(x0, noise, t)` and `timesteps_for_strength(strength)` (img2img).
The σ-based samplers keep state between steps: make a new one for every image batch.

    name           file                 model calls   noise   diffusers scheduler
    ddim           ../ddim.py           N             η > 0   DDIMScheduler
    ddpm           ../ddpm.py           N             yes     DDPMScheduler
    euler          euler.py             N             no      EulerDiscreteScheduler
    euler_a        euler_ancestral.py   N             yes     EulerAncestralDiscreteScheduler
    heun           heun.py              2N − 1        no      HeunDiscreteScheduler
    dpmpp_2m       dpm_solver.py        N             no      DPMSolverMultistepScheduler
    dpmpp_2m_sde   dpm_solver.py        N             yes     ... algorithm_type="sde-dpmsolver++"
"""

from __future__ import annotations

from minisd.ddim import DDIMSampler
from minisd.ddpm import DDPMSampler
from minisd.samplers.dpm_solver import DPMSolverPlusPlus2MSampler, DPMSolverPlusPlus2MSDESampler
from minisd.samplers.euler import EulerSampler
from minisd.samplers.euler_ancestral import EulerAncestralSampler
from minisd.samplers.heun import HeunSampler
from minisd.samplers.sigma_schedule import SigmaSampler
from minisd.schedule import NoiseSchedule

SAMPLERS = {
    "ddim": DDIMSampler,
    "ddpm": DDPMSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "heun": HeunSampler,
    "dpmpp_2m": DPMSolverPlusPlus2MSampler,
    "dpmpp_2m_sde": DPMSolverPlusPlus2MSDESampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    steps: int,
    karras: bool = False,
    eta: float = 0.0,
    **options,
):
    """A fresh sampler `name` over `steps` steps of `schedule`.

    karras: Karras et al. 2022 σ spacing (σ-based samplers only). eta: DDIM's η (DDIM only).
    options: passed on (spacing, steps_offset, and the DDIM/DDPM options of ddim.py / ddpm.py).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    cls = SAMPLERS[name]
    if eta != 0 and cls is not DDIMSampler:
        raise ValueError(f"eta applies to the DDIM sampler only, not {name!r}")
    if karras and not issubclass(cls, SigmaSampler):
        raise ValueError(
            f"karras sigmas apply to the σ-based samplers "
            f"({', '.join(n for n, c in SAMPLERS.items() if issubclass(c, SigmaSampler))}), "
            f"not {name!r}"
        )
    if cls is DDIMSampler:
        return cls(schedule, steps, eta=eta, **options)
    if cls is DDPMSampler:
        return cls(schedule, steps, **options)
    return cls(schedule, steps, karras=karras, **options)


__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "make_sampler",
    "DDIMSampler",
    "DDPMSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "HeunSampler",
    "DPMSolverPlusPlus2MSampler",
    "DPMSolverPlusPlus2MSDESampler",
    "SigmaSampler",
]
