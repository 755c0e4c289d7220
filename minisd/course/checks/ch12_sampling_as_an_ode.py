"""Chapter 12 (sampling as solving an ODE): Euler and DPM-Solver++(2M) steps, Karras sigmas."""

from __future__ import annotations

import torch

from minisd.samplers import make_sampler
from minisd.samplers.sigma_schedule import karras_sigmas
from minisd.schedule import NoiseSchedule, ScheduleConfig

from . import Task

TITLE = "Sampling as solving an ODE"
READING_MINUTES = 60
GOALS = [
    "Write sampling as integrating the probability-flow ODE dx/dσ = (x − D(x; σ))/σ, and see "
    "DDIM as its Euler step.",
    "Place the noise levels with Karras et al.'s σ^(1/ρ) spacing.",
    "Build the second-order solvers (Heun, DPM-Solver++ 2M) and the ancestral/SDE variants, "
    "and measure their error against the number of steps.",
]

# minisd's samplers driven with prediction_type="sample": the "model output" is the denoised D
X0_SCHEDULE = NoiseSchedule(ScheduleConfig(prediction_type="sample"))


def _shape(ctx):
    return (ctx.integer(1, 3), ctx.integer(1, 4), ctx.integer(2, 6), ctx.integer(2, 6))


def check_euler_step(ctx):
    steps = ctx.choice([5, 10, 20])
    sampler = make_sampler("euler", X0_SCHEDULE, steps, karras=ctx.choice([True, False]))
    for label, i in [
        ("the first step", 0),
        ("a middle step", ctx.integer(1, steps - 2)),
        ("the last step (to σ = 0)", steps - 1),
    ]:
        shape = _shape(ctx)
        x, denoised = ctx.randn(*shape, scale=3.0), ctx.randn(*shape)
        sigma, sigma_next = sampler.sigmas[i], sampler.sigmas[i + 1]
        sampler._index = i
        expected = sampler.step(denoised, sampler.timesteps[i].item(), x).prev_sample
        mistakes = {
            "your step moves by (σ − σ_next)·d: the sign of the step is flipped": x
            + (sigma - sigma_next) * (x - denoised) / sigma,
            "your slope is (denoised − x)/σ instead of (x − denoised)/σ": x
            + (sigma_next - sigma) * (denoised - x) / sigma,
            "your slope leaves out the division by σ": x + (sigma_next - sigma) * (x - denoised),
            "you return the denoised sample D instead of stepping": denoised,
        }
        as_floats = label != "a middle step"
        args = (float(sigma), float(sigma_next)) if as_floats else (sigma, sigma_next)
        kind = "floats" if as_floats else "0-dim tensors"
        with ctx.case(
            f"{label}: σ = {float(sigma):.4f} → {float(sigma_next):.4f} ({kind}), shape {shape}"
        ):
            got = ctx.call(x, denoised, *args)
            ctx.expect_close(got, expected, what="x_next", atol=1e-5, mistakes=mistakes)


def _dpm_reference(x, denoised, denoised_prev, sampler, i):
    """minisd's DPMSolverPlusPlus2MSampler at step i, run on x_t = α·x and divided back by α."""
    alpha = 1 / (1 + sampler.sigmas.double() ** 2).sqrt()
    sampler._index, sampler._previous_x0 = i, denoised_prev
    out = sampler.step(denoised, sampler.timesteps[i].item(), x * alpha[i].float()).prev_sample
    return out / alpha[i + 1].float()


def check_dpmpp_2m_step(ctx):
    steps = ctx.choice([8, 10, 20])
    sampler = make_sampler("dpmpp_2m", X0_SCHEDULE, steps, karras=ctx.choice([True, False]))
    cases = [
        ("the first step (no previous D: first order)", 0, False),
        ("a middle step (second order)", ctx.integer(1, steps - 2), True),
        ("another middle step", ctx.integer(1, steps - 2), True),
        ("the last step (to σ = 0)", steps - 1, True),
    ]
    for label, i, with_previous in cases:
        shape = _shape(ctx)
        x, denoised, previous = ctx.randn(*shape, scale=2.0), ctx.randn(*shape), ctx.randn(*shape)
        prev = previous if with_previous else None
        expected = _dpm_reference(x, denoised, prev, sampler, i)
        sigma, sigma_next = sampler.sigmas[i], sampler.sigmas[i + 1]
        sigma_prev = sampler.sigmas[i - 1] if i > 0 else None
        first_order = _dpm_reference(x, denoised, None, sampler, i)
        mistakes = {
            "your step ignores denoised_prev: it is first order (DDIM) everywhere": first_order
        }
        if with_previous and i < steps - 1:
            h = torch.log(sigma) - torch.log(sigma_next)
            r = (torch.log(sigma_prev) - torch.log(sigma)) / h
            ratio = sigma_next / sigma
            mistakes[
                "your extrapolation uses (1/r)·(D − D_prev) instead of (1/(2r))·(D − D_prev)"
            ] = ratio * x - (ratio - 1) * (denoised + (denoised - previous) / r)
            mistakes["your r is h/h_prev instead of h_prev/h"] = ratio * x - (ratio - 1) * (
                denoised + (denoised - previous) * r / 2
            )
        args = (float(sigma), float(sigma_next), None if sigma_prev is None else float(sigma_prev))
        with ctx.case(
            f"{label}: step {i} of {steps}, σ = {float(sigma):.4f} → {float(sigma_next):.4f}"
        ):
            got = ctx.call(x, denoised, prev, *args)
            ctx.expect_close(got, expected, what="x_next", atol=2e-5, mistakes=mistakes)


def check_karras_sigmas(ctx):
    for label, rho in [("ρ = 7", 7.0), ("another ρ", round(ctx.uniform(1.5, 12.0), 2))]:
        sigma_min = round(ctx.uniform(0.002, 0.1), 4)
        sigma_max = round(ctx.uniform(5.0, 80.0), 2)
        n = ctx.integer(2, 30)
        expected = karras_sigmas(sigma_min, sigma_max, n, rho)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        mistakes = {
            "your sigmas go from sigma_min up to sigma_max; they must descend": expected.flip(0),
            "your sigmas are evenly spaced in σ itself, not in σ^(1/ρ)": sigma_max
            + ramp * (sigma_min - sigma_max),
            "you appended a final 0: return only the n noise levels": torch.cat(
                [expected, expected.new_zeros(1)]
            ),
        }
        with ctx.case(
            f"{label}: sigma_min = {sigma_min}, sigma_max = {sigma_max}, n = {n}, rho = {rho}"
        ):
            got = ctx.call(sigma_min, sigma_max, n, rho=rho)
            ctx.expect_close(
                got, expected, what="the sigmas", atol=1e-9, rtol=1e-6, mistakes=mistakes
            )


TASKS = [
    Task(
        "euler_step",
        "(x, denoised, sigma, sigma_next)",
        "One Euler step of the probability-flow ODE in the σ variable: from x at noise level σ "
        "and the denoiser's output D, move along the slope d = (x − D)/σ to σ_next.",
        check_euler_step,
        "first, middle and last steps (σ_next = 0) of default and Karras schedules, σ as floats "
        "and as 0-dim tensors, random shapes, against minisd's EulerSampler.",
    ),
    Task(
        "dpmpp_2m_step",
        "(x, denoised, denoised_prev, sigma, sigma_next, sigma_prev=None)",
        "One DPM-Solver++(2M) step in the σ variable (λ = −log σ): first order without a "
        "previous denoised sample, otherwise with D extrapolated linearly in λ from the previous "
        "step's.",
        check_dpmpp_2m_step,
        "the first step, middle steps and the last step (to σ = 0), default and Karras "
        "schedules, against minisd's DPMSolverPlusPlus2MSampler (moved from x_t to the σ "
        "variable).",
    ),
    Task(
        "karras_sigmas",
        "(sigma_min, sigma_max, n, rho=7.0)",
        "Karras et al.'s noise levels: n values from sigma_max down to sigma_min, "
        "evenly spaced in σ^(1/ρ).",
        check_karras_sigmas,
        "ρ = 7 and a random ρ, random ranges and counts, against "
        "minisd.samplers.sigma_schedule.karras_sigmas.",
    ),
]
