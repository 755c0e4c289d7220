"""Chapter 07 (DDPM): the forward process in one jump, and the posterior q(x_{t−1} | x_t, x₀)."""

from __future__ import annotations

import torch

from minisd.ddpm import DDPMSampler
from minisd.schedule import NoiseSchedule, ScheduleConfig

from . import Task

TITLE = "DDPM: noising and denoising"
GOALS = [
    "Derive q(x_t | x₀) = N(√ᾱ_t·x₀, (1−ᾱ_t)·I) from the one-step noising process and sample it in "
    "one jump.",
    "Derive the posterior q(x_{t−1} | x_t, x₀) that DDPM's reverse step samples from.",
    "Run DDPM sampling and see why it needs hundreds of steps.",
]
PREREQUISITES = {
    "Math": "Gaussian products and conditioning, Bayes' rule, Markov chains.",
    "PyTorch": "indexing a schedule tensor, broadcasting per batch item, a small training loop.",
}
READING_MINUTES = 70


def _schedule(ctx) -> NoiseSchedule:
    kind = ctx.choice(["scaled_linear", "linear", "cosine"])
    beta_start, beta_end = (0.00085, 0.012) if kind == "scaled_linear" else (0.0001, 0.02)
    return NoiseSchedule(ScheduleConfig(beta_schedule=kind, beta_start=beta_start, beta_end=beta_end))


def check_q_sample(ctx):
    schedule = _schedule(ctx)
    a_all = schedule.alphas_cumprod
    for label, batch, width in (
        ("a batch", ctx.integer(2, 4), None),
        ("batch size equal to the width", 3, 3),
    ):
        width = width or ctx.choice([5, 6, 7])
        x0 = ctx.randn(batch, ctx.integer(1, 4), ctx.integer(2, 6), width)
        noise = ctx.randn(*x0.shape)
        t = ctx.randint(0, schedule.num_train_timesteps, (batch,))
        while len(set(t.tolist())) < batch:  # different timesteps per item, so a mix-up shows
            t = ctx.randint(0, schedule.num_train_timesteps, (batch,))
        expected = schedule.q_sample(x0, t, noise)
        a = a_all[t].reshape(-1, 1, 1, 1)
        mistakes = {
            "your x_t uses ᾱ and 1 − ᾱ without square roots": lambda: a * x0 + (1 - a) * noise,
            "your x_t swaps the two coefficients": lambda: (1 - a).sqrt() * x0 + a.sqrt() * noise,
            "your x_t uses ᾱ at t − 1": lambda: (lambda b: b.sqrt() * x0 + (1 - b).sqrt() * noise)(
                a_all[(t - 1).clamp(min=0)].reshape(-1, 1, 1, 1)
            ),
            "your ᾱ_t (shape [B]) broadcasts along the last axis (width), not the batch: reshape "
            "it to [B, 1, 1, 1]": lambda: (
                a_all[t].sqrt() * x0 + (1 - a_all[t]).sqrt() * noise
            ),
        }
        with ctx.case(
            f"{label}: x0 {tuple(x0.shape)}, t = {t.tolist()}, a {schedule.config.beta_schedule} schedule"
        ):
            ctx.expect_close(ctx.call(x0, t, noise, a_all), expected, what="x_t", mistakes=mistakes)
    t = ctx.integer(0, schedule.num_train_timesteps - 1)
    with ctx.case(f"one timestep t = {t} (an int) for the whole batch: x0 {tuple(x0.shape)}"):
        ctx.expect_close(ctx.call(x0, t, noise, a_all), schedule.q_sample(x0, t, noise), what="x_t")


def _posterior_reference(schedule, x0, x_t, t):
    sampler = DDPMSampler(schedule)  # all T timesteps: the step from t goes to t − 1
    return sampler.posterior(x0, x_t, int(t))


def check_ddpm_posterior(ctx):
    schedule = _schedule(ctx)
    a_all = schedule.alphas_cumprod
    for t in (ctx.integer(1, schedule.num_train_timesteps - 1), ctx.integer(1, 100), 0):
        shape = (ctx.integer(1, 3), ctx.integer(1, 4), ctx.integer(2, 6), ctx.integer(2, 6))
        x0, x_t = ctx.randn(*shape), ctx.randn(*shape)
        mean, variance = _posterior_reference(schedule, x0, x_t, t)
        a_t, a_prev = a_all[t], (a_all[t - 1] if t > 0 else torch.tensor(1.0))
        beta = 1 - a_t / a_prev
        mistakes = {
            "your mean uses ᾱ_t where the one-step α_t = ᾱ_t/ᾱ_{t−1} belongs": lambda: (
                a_prev.sqrt() * beta / (1 - a_t) * x0 + a_t.sqrt() * (1 - a_prev) / (1 - a_t) * x_t
            ),
            "your mean swaps the coefficients of x₀ and x_t": lambda: (
                a_prev.sqrt() * beta / (1 - a_t) * x_t
                + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x0
            ),
        }
        with ctx.case(
            f"t = {t}"
            + (" (the last step: ᾱ_prev = 1)" if t == 0 else "")
            + f", {schedule.config.beta_schedule} schedule"
        ):
            got = ctx.call(x0, x_t, t, a_all)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                ctx.fail(
                    f"expected a pair (mean, variance), got {type(got).__name__}"
                    + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
                )
            got_mean, got_variance = got
            ctx.expect_close(got_mean, mean, what="mean", mistakes=mistakes)
            if isinstance(got_variance, (int, float)):
                got_variance = torch.tensor(float(got_variance))
            got_variance = ctx.expect_tensor(got_variance, "the variance")
            try:
                got_variance = torch.broadcast_to(got_variance, mean.shape)
            except RuntimeError:
                ctx.fail(
                    "the variance should be a number or broadcast against x_t "
                    f"{tuple(mean.shape)}, got shape "
                    f"{tuple(got_variance.shape)}"
                )
            variance_mistakes = {
                "your variance is β_t (the forward step's); the posterior's is (1 − ᾱ_{t−1})/(1 − "
                "ᾱ_t)·β_t": torch.broadcast_to(
                    beta, mean.shape
                ),
            }
            ctx.expect_close(
                got_variance,
                torch.broadcast_to(variance, mean.shape),
                what="variance",
                atol=1e-7,
                mistakes=variance_mistakes,
            )



# ------------------------------------------------------------------ stretch: the optimal denoiser of a mixture

def _oracle_by_quadrature(x_t, alpha_bar, means, stds, weights):
    """E[ε | x_t] by numerical integration over x₀ on a fine grid, in float64 and in log space:
    independent of the closed form. The grid covers the data and every x₀ that could explain x_t."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    x = x_t.double()
    m, s, w = means.double(), stds.double(), weights.double()
    spread = 10 * ((1 - a) / a).sqrt()
    low = min(float((m - 10 * s).min()), float((x / a.sqrt()).min() - spread))
    high = max(float((m + 10 * s).max()), float((x / a.sqrt()).max() + spread))
    grid = torch.linspace(low, high, 200001, dtype=torch.float64)
    log_prior = torch.logsumexp(
        torch.log(w)[:, None] - torch.log(s)[:, None] - 0.5 * ((grid[None] - m[:, None]) / s[:, None]) ** 2,
        dim=0)
    eps = (x[:, None] - a.sqrt() * grid[None]) / (1 - a).sqrt()   # the ε that takes x₀ = grid to x_t
    posterior = (log_prior[None] - 0.5 * eps ** 2).softmax(dim=-1)  # p(x₀ | x_t) on the grid
    return (posterior * eps).sum(-1)


def check_oracle_eps(ctx):
    k = ctx.integer(1, 3)
    means, stds = ctx.rand(k, low=-3, high=3), ctx.rand(k, low=0.2, high=1.0)
    weights = ctx.rand(k, low=0.2, high=1.0)
    weights = weights / weights.sum()
    for alpha_bar in (ctx.uniform(0.05, 0.3), ctx.uniform(0.5, 0.95)):
        x_t = ctx.randn(ctx.integer(3, 8), scale=2.0)
        expected = _oracle_by_quadrature(x_t, alpha_bar, means, stds, weights).float()
        one = (x_t - alpha_bar ** 0.5 * (weights * means).sum()) * (1 - alpha_bar) ** 0.5
        with ctx.case(f"{k} components, ᾱ = {alpha_bar:.3f}"):
            # the quadrature is accurate to ~1e-9; float32 student arithmetic to ~1e-6 relative
            ctx.expect_close(ctx.call(x_t, alpha_bar, means, stds, weights), expected, what="E[ε | x_t]",
                             atol=1e-4, rtol=1e-3, mistakes={
                                 "your result ignores the responsibilities: each component's E[ε | x_t, k] "
                                 "must be weighted by p(k | x_t), not by the prior weights":
                                 lambda: _prior_weighted(x_t, alpha_bar, means, stds, weights),
                                 "your result treats the data as one Gaussian at the mixture's mean": one})


def _prior_weighted(x_t, a, means, stds, weights):
    var = a * stds ** 2 + 1 - a
    per = (1 - a) ** 0.5 * (x_t[:, None] - a ** 0.5 * means[None]) / var[None]
    return (per * weights[None]).sum(-1)


TASKS = [
    Task("q_sample", "(x0, t, noise, alphas_cumprod)",
         "Noise clean samples x0 [B, ...] straight to timesteps t (a LongTensor [B], one per item, or an int) "
         "with the given noise: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise, where ᾱ_t = alphas_cumprod[t].",
         check_q_sample,
         "random schedules (scaled-linear, linear, cosine), shapes and timesteps, including a batch as large as the "
         "image width (where a wrongly broadcast ᾱ goes unnoticed by the shapes).",
         level="warm-up", minutes=10,
             forbidden=("minisd.schedule.NoiseSchedule.q_sample",),
             allowed="indexing, reshape, sqrt and arithmetic; not minisd's NoiseSchedule.q_sample."),
    Task("ddpm_posterior", "(x0, x_t, t, alphas_cumprod)",
         "Mean and variance of q(x_{t−1} | x_t, x₀) for an integer timestep t (the previous timestep is t − 1; "
         "at t = 0, ᾱ_prev = 1): "
         "return the pair (mean, variance), the mean shaped like x_t, the variance a number or a tensor that "
         "broadcasts against x_t.",
         check_ddpm_posterior,
         "random schedules, timesteps (and t = 0) and shapes, against minisd's DDPMSampler.posterior.",
         level="core", minutes=30,
             forbidden=("minisd.ddpm.DDPMSampler.posterior",),
             allowed="indexing, sqrt and arithmetic; not minisd's DDPMSampler.posterior."),
    Task("mixture_oracle_eps", "(x_t, alpha_bar, means, stds, weights)",
         "The best possible noise prediction E[ε | x_t] when the data x₀ are 1-D draws from a Gaussian mixture "
         "(component k: weight weights[k], mean means[k], standard deviation stds[k]) and x_t = √ᾱ·x₀ + √(1−ᾱ)·ε. "
         "x_t is a tensor [N] of points, alpha_bar a float; return [N]. Derive it: the distribution of x_t given "
         "the component, then Bayes' rule for the component given x_t.",
         check_oracle_eps,
         "random mixtures of 1–3 components at low and high noise, against numerical integration over x₀.",
         level="stretch", minutes=40, allowed="torch tensor arithmetic."),

]
