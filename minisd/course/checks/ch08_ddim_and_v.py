"""Chapter 08 (DDIM and v-prediction): one DDIM step."""

from __future__ import annotations

from minisd.ddim import DDIMSampler
from minisd.schedule import NoiseSchedule

from . import Task

TITLE = "DDIM and v-prediction"
GOALS = [
    "Derive the DDIM update from x̂₀ and ε̂, and see how η moves between deterministic DDIM and "
    "DDPM.",
    "Sample in 20–50 steps instead of 1000, and invert an image to noise with deterministic DDIM.",
    "Convert between ε-, x₀- and v-prediction, as SD 2.x's 768px model needs.",
]
PREREQUISITES = {
    "Math": "ordinary differential equations and Euler's method; error orders (log-log slopes).",
    "PyTorch": "`torch.as_tensor`, loops over timesteps.",
}
READING_MINUTES = 70


def check_ddim_step(ctx):
    schedule = NoiseSchedule()
    steps = ctx.choice([10, 20, 25, 50])
    cases = [("η = 0", 0.0), ("η = 1", 1.0), ("random η", round(ctx.uniform(0.1, 0.9), 3))]
    for label, eta in cases:
        sampler = DDIMSampler(schedule, steps, eta=eta)
        last = label == "η = 0" and ctx.choice([True, False])
        t = int(sampler.timesteps[-1]) if last else int(ctx.choice(sampler.timesteps[:-1].tolist()))
        shape = (ctx.integer(1, 3), 4, ctx.integer(2, 6), ctx.integer(2, 6))
        x_t, eps = ctx.randn(*shape), ctx.randn(*shape)
        noise = ctx.randn(*shape) if eta > 0 else None
        a_t, a_prev = sampler.alpha_bars(t, x_t)
        expected = sampler.step(eps, t, x_t, variance_noise=noise).prev_sample
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        mistakes = {
            "your step leaves out σ² in the direction term √(1 − ᾱ_prev − σ²)·ε̂":
                a_prev.sqrt() * x0
            + (1 - a_prev).sqrt() * eps
            + (sigma * noise if noise is not None else 0),
            "your step does not add the noise σ·z": a_prev.sqrt() * x0
            + (1 - a_prev - sigma**2).sqrt() * eps,
            "your σ leaves out η": a_prev.sqrt() * x0
            + (1 - a_prev - sigma**2 / max(eta, 1e-9) ** 2).sqrt() * eps
            + (sigma / max(eta, 1e-9) * noise if noise is not None else 0),
            "your step ignores η: it always takes the deterministic (η = 0) step": a_prev.sqrt()
            * x0
            + (1 - a_prev).sqrt() * eps,
            "your step clamps x̂₀ to [−1, 1]; SD's DDIM does not clip": a_prev.sqrt()
            * x0.clamp(-1, 1)
            + (1 - a_prev - sigma**2).sqrt() * eps
            + (sigma * noise if noise is not None else 0),
        }
        desc = f"{label} (η = {eta}), t = {t} of {steps} steps" + (
            " (the last step: ᾱ_prev = ᾱ₀)" if last else ""
        )
        # the ᾱs come as floats, or as 0-dim tensors (what minisd's samplers hold)
        as_tensors = label == "η = 1"
        alpha_bars = (a_t, a_prev) if as_tensors else (float(a_t), float(a_prev))
        kind = "0-dim tensors" if as_tensors else "floats"
        with ctx.case(
            f"{desc}, alpha_bar_t = {float(a_t):.4f}, alpha_bar_prev = {float(a_prev):.4f} ({kind})"
        ):
            got = ctx.call(eps, x_t, *alpha_bars, eta=eta, noise=noise)
            ctx.expect_close(got, expected, what="x_prev", atol=2e-5, mistakes=mistakes)



# ------------------------------------------------------------------ warm-up: SD's timesteps

def check_ddim_timesteps(ctx):
    schedule = NoiseSchedule()
    for n in (50, ctx.integer(2, 30), ctx.integer(31, 200)):
        expected = [int(t) for t in DDIMSampler(schedule, n).timesteps]   # minisd's sampler: the reference
        with ctx.case(f"{n} steps"):
            got = ctx.call(n, 1000)
            got = got.tolist() if hasattr(got, "tolist") else got
            if not isinstance(got, (list, tuple)) or [int(t) for t in got] != expected:
                hint = ""
                if isinstance(got, (list, tuple)) and got and [int(t) for t in got] == [t - 1 for t in expected]:
                    hint = " (SD's scheduler adds steps_offset = 1)"
                elif isinstance(got, (list, tuple)) and got and [int(t) for t in got] == expected[::-1]:
                    hint = " (sampling runs from the noisiest timestep down)"
                ctx.fail(f"expected {expected[:6]}{' …' if len(expected) > 6 else ''}, got "
                         f"{list(got)[:6] if isinstance(got, (list, tuple)) else got}{hint}")


# ------------------------------------------------------------------ stretch: a measured order

def check_convergence_order(ctx):
    import numpy as np
    for label, order in (("a first-order method", 1.0), ("a second-order method", 2.0),
                         ("a random order", ctx.uniform(0.3, 3.0))):
        steps = sorted({ctx.integer(4, 12), ctx.integer(13, 40), ctx.integer(41, 120), ctx.integer(121, 400)})
        errors = [ctx.uniform(0.5, 5.0) * n ** -order * ctx.uniform(0.9, 1.1) for n in steps]
        expected = -np.polyfit(np.log(steps), np.log(errors), 1)[0]      # least squares in log-log: reference
        with ctx.case(f"{label}: steps {steps}"):
            got = ctx.call(list(steps), list(errors))
            try:
                got = float(got)
            except (TypeError, ValueError):
                ctx.fail(f"expected a number, got {type(got).__name__}")
            if abs(got + expected) < 1e-6 * max(1.0, abs(expected)):
                ctx.fail(f"expected {expected:.4f}, got {got:.4f}: the order is minus the slope (errors fall)")
            if abs(got - expected) > 1e-6 * max(1.0, abs(expected)):
                ctx.fail(f"expected {expected:.4f}, got {got:.4f} (a least-squares fit of log(error) against "
                         f"log(steps) over all points)")


TASKS = [
    Task("ddim_step", "(model_output, x_t, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None)",
         "One DDIM step for an ε-predicting model: from x_t, the predicted noise `model_output`, and the noise levels "
         "ᾱ_t and ᾱ_prev (floats or 0-dim tensors), compute x̂₀, σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) "
         "(DDIM eq. 16), and "
         "return x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ_t²)·ε̂ + σ_t·noise (the noise term only when η > 0).",
         check_ddim_step,
         "η = 0, η = 1 and a random η with given noise, the ᾱs as floats and as 0-dim tensors, random step counts, "
         "timesteps and shapes (sometimes the "
         "last step), against minisd's DDIMSampler.",
         level="core", minutes=30,
             forbidden=("minisd.ddim.DDIMSampler.step",),
             allowed="torch.as_tensor, sqrt and arithmetic; not minisd's DDIMSampler.step."),
    Task("ddim_timesteps", "(num_steps, num_train_timesteps=1000)",
         "The timesteps SD's DDIM visits for `num_steps` steps, as a list of ints from the noisiest down: "
         "'leading' spacing with steps_offset = 1 (50 steps: 981, 961, …, 1).",
         check_ddim_timesteps,
         "50 and random step counts, against minisd's DDIMSampler.",
         level="warm-up", minutes=10, allowed="plain Python or torch."),
    Task("convergence_order", "(num_steps, errors)",
         "The order p of a sampler measured from its errors: fit log(error) = c − p·log(steps) by least squares "
         "over all the given points and return p (a float). Then use it (ungraded) on DDIM's inversion errors.",
         check_convergence_order,
         "synthetic errors of known orders with 10% noise, against numpy's polyfit in log-log.",
         level="stretch", minutes=20, allowed="torch, numpy or math (numpy.polyfit is fine)."),

]
