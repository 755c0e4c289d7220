"""Chapter 00 (the big picture): recover the clean image from a noisy one and the noise in it."""

from __future__ import annotations


import torch

from minisd.schedule import NoiseSchedule, ScheduleConfig

from . import Task

TITLE = "The big picture"
GOALS = [
    "Name the three networks of Stable Diffusion (text encoder, UNet, VAE) and what flows between "
    "them.",
    "Explain the forward process x_t = √ᾱ·x₀ + √(1−ᾱ)·ε and why predicting ε is enough to recover "
    "x₀.",
    "Run the whole pipeline once and look at the intermediate results.",
]
PREREQUISITES = {
    "Math": "Gaussian noise, square roots; reading a formula x_t = √ᾱ·x₀ + √(1−ᾱ)·ε.",
    "PyTorch": "tensors, broadcasting, torch.randn.",
}
READING_MINUTES = 40


def check_predict_x0(ctx):
    schedule = NoiseSchedule()
    batch = ctx.integer(1, 4)
    shape = (batch, ctx.choice([1, 3, 4]), ctx.integer(2, 9), ctx.integer(2, 9))
    x0, eps = ctx.randn(*shape), ctx.randn(*shape)

    def mistakes(x_t, a):
        return {
            "your result matches (x_t − (1 − ᾱ)·ε)/ᾱ: the square roots are missing": lambda: (
                (x_t - (1 - a) * eps) / a
            ),
            "your result matches (x_t − √(1 − ᾱ)·ε)·√ᾱ: divide by √ᾱ instead of multiplying":
                lambda: (
                (x_t - (1 - a) ** 0.5 * eps) * a**0.5
            ),
            "your result matches (x_t − √ᾱ·ε)/√(1 − ᾱ): the two coefficients are swapped": lambda: (
                (x_t - a**0.5 * eps) / (1 - a) ** 0.5
            ),
        }

    t = ctx.integer(0, 999)
    a = float(schedule.alphas_cumprod[t])
    x_t = schedule.q_sample(x0, t, eps)
    expected, _ = schedule.predict_x0_and_eps(eps, x_t, t)
    with ctx.case(f"alpha_bar = {a:.4f} (a Python float)"):
        ctx.expect_close(ctx.call(x_t, eps, a), expected, what="x̂₀", mistakes=mistakes(x_t, a))
    with ctx.case("alpha_bar a 0-dim tensor"):
        ctx.expect_close(
            ctx.call(x_t, eps, torch.tensor(a)), expected, what="x̂₀", mistakes=mistakes(x_t, a)
        )
    t = ctx.randint(0, 1000, (batch,))
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = schedule.q_sample(x0, t, eps)
    expected, _ = schedule.predict_x0_and_eps(eps, x_t, t)
    with ctx.case(f"alpha_bar a tensor of shape {tuple(a.shape)} (one value per image)"):
        ctx.expect_close(ctx.call(x_t, eps, a), expected, what="x̂₀", mistakes=mistakes(x_t, a))



# ------------------------------------------------------------------ warm-ups: the noise in x_t, and ᾱ from β

def check_predict_eps(ctx):
    schedule = NoiseSchedule()
    shape = (ctx.integer(1, 3), ctx.choice([1, 3, 4]), ctx.integer(2, 8), ctx.integer(2, 8))
    x0, eps = ctx.randn(*shape), ctx.randn(*shape)
    t = ctx.integer(1, 998)
    a = float(schedule.alphas_cumprod[t])
    x_t = schedule.q_sample(x0, t, eps)
    with ctx.case(f"t = {t}, alpha_bar = {a:.4f}"):
        # |x_t − √ᾱ·x₀| ≤ a few units, divided by √(1−ᾱ) ≥ 0.04 here: float32 rounding reaches ~1e-5
        ctx.expect_close(ctx.call(x_t, x0, a), eps, what="ε", atol=5e-5, rtol=1e-4, mistakes={
            "your ε is missing the square roots": (x_t - a * x0) / (1 - a),
            "your ε divides by √ᾱ; the noise's coefficient is √(1 − ᾱ)": (x_t - a ** 0.5 * x0) / a ** 0.5})


def check_alphas_cumprod(ctx):
    for kind in ("scaled_linear", "linear", "cosine"):
        config = ScheduleConfig(beta_schedule=kind, num_train_timesteps=ctx.integer(10, 1000))
        betas = NoiseSchedule(config).betas
        expected = NoiseSchedule(config).alphas_cumprod           # minisd's schedule: the reference
        with ctx.case(f"{kind} betas, T = {config.num_train_timesteps}"):
            ctx.expect_close(ctx.call(betas.clone()), expected, what="ᾱ", atol=1e-6, rtol=1e-5, mistakes={
                "your ᾱ is 1 − cumsum(β): a product, not a sum": 1 - betas.cumsum(0),
                "your ᾱ is the cumulative product of β; it is the product of α = 1 − β": betas.cumprod(0),
                "your ᾱ_t leaves out step t itself (starts at 1)":
                    torch.cat([torch.ones(1), (1 - betas).cumprod(0)[:-1]])})


TASKS = [
    Task("predict_x0", "(x_t, eps, alpha_bar)",
         "Given a noisy sample x_t, the noise ε in it and the noise level ᾱ, return the clean sample x̂₀ by solving "
         "x_t = √ᾱ·x₀ + √(1−ᾱ)·ε for x₀. `alpha_bar` is a Python float or a tensor that broadcasts against x_t.",
         check_predict_x0,
         "random shapes and noise levels; alpha_bar as a float, a 0-dim tensor and a [B, 1, 1, 1] tensor.",
         level="warm-up", minutes=10,
             forbidden=("minisd.schedule.NoiseSchedule.predict_x0_and_eps",),
             allowed="torch.as_tensor, sqrt and arithmetic; not minisd's "
                "NoiseSchedule.predict_x0_and_eps."),
    Task("predict_eps", "(x_t, x0, alpha_bar)",
         "The noise in a noisy sample: given x_t, the clean x0 and the noise level ᾱ (a float), return ε, the "
         "noise that x_t = √ᾱ·x0 + √(1−ᾱ)·ε was made with.",
         check_predict_eps,
         "random shapes and noise levels.",
         level="warm-up", minutes=5, allowed="torch."),
    Task("alphas_cumprod", "(betas)",
         "The noise schedule's ᾱ_t for every t: given the per-step variances β [T], return ᾱ [T] with ᾱ_t the "
         "fraction of signal variance left after steps 0 … t.",
         check_alphas_cumprod,
         "scaled-linear, linear and cosine schedules of random lengths, against minisd's NoiseSchedule.",
         level="warm-up", minutes=10, allowed="torch."),

]
