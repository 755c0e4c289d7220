"""Chapter 05 (the VAE): the reparameterisation trick and the KL term."""
from __future__ import annotations

import torch

from minisd.vae import DiagonalGaussian

from . import Task

TITLE = "The VAE"
GOALS = [
    "Explain why Stable Diffusion works in an 8× smaller latent space and what the VAE's encoder and decoder do.",
    "Sample from the encoder's Gaussian with the reparameterisation trick, and compute its KL to N(0, I).",
    "Match the VAE against diffusers' outputs stored in tests/fixtures.",
]
PREREQUISITES = {
    "Math": "Gaussian densities, KL divergence, expectation of a squared error.",
    "PyTorch": "nn.Module, `torch.exp`, `sum(dim=...)`, a training loop with an optimizer.",
}
READING_MINUTES = 70


def _moments(ctx, shape):
    mean = ctx.randn(*shape)
    logvar = ctx.rand(*shape, low=-6.0, high=3.0)  # inside the VAE's clamp [-30, 20], so the clamp does not matter
    return mean, logvar


def check_reparameterize(ctx):
    for label, shape in (("latents [B, 4, h, w]", (ctx.integer(1, 3), 4, ctx.integer(2, 8), ctx.integer(2, 8))),
                         ("a vector [n]", (ctx.integer(2, 20),))):
        mean, logvar = _moments(ctx, shape)
        seed = ctx.integer(0, 2**31)
        # minisd's own sampler fed the same noise: DiagonalGaussian.sample draws randn(mean.shape, generator), and
        # a vector is viewed as [1, n, 1, 1] (same numbers, same order)
        as_4d = (lambda t: t) if len(shape) == 4 else (lambda t: t.reshape(1, -1, 1, 1))
        sample = DiagonalGaussian(torch.cat([as_4d(mean), as_4d(logvar)], dim=1)).sample(
            torch.Generator().manual_seed(seed))
        expected = sample.reshape(shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        mistakes = {
            "your sample uses exp(logvar) (the variance) where the standard deviation exp(logvar / 2) belongs":
                lambda: mean + torch.exp(logvar) * noise,
            "your sample uses logvar itself as the standard deviation": lambda: mean + logvar * noise,
            "your sample forgets the mean": lambda: torch.exp(0.5 * logvar) * noise,
        }
        with ctx.case(f"{label} {shape}"):
            ctx.expect_close(ctx.call(mean, logvar, noise), expected, what="z", mistakes=mistakes)


def check_gaussian_kl(ctx):
    shape = (ctx.integer(2, 4), ctx.integer(1, 4), ctx.integer(2, 6), ctx.integer(2, 6))
    mean, logvar = _moments(ctx, shape)
    expected = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()
    per_dim = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    mistakes = {
        "your KL averages over C, H, W; sum instead": lambda: per_dim.mean(dim=[1, 2, 3]),
        "your KL is summed over the whole batch; return one value per item, shape [B]": lambda: per_dim.sum(),
        "your KL uses exp(logvar / 2) (σ) where σ² = exp(logvar) belongs":
            lambda: 0.5 * (mean**2 + (0.5 * logvar).exp() - 1 - logvar).sum(dim=[1, 2, 3]),
        "your KL has the sign of the log σ² term flipped":
            lambda: 0.5 * (mean**2 + logvar.exp() - 1 + logvar).sum(dim=[1, 2, 3]),
    }
    with ctx.case(f"mean and logvar of shape {shape}"):
        ctx.expect_close(ctx.call(mean, logvar), expected, what="KL", atol=1e-4, mistakes=mistakes)


TASKS = [
    Task("reparameterize", "(mean, logvar, noise)",
         "A sample of N(mean, diag exp(logvar)) written as a differentiable function of mean and logvar, given "
         "standard normal `noise` of the same shape: z = mean + exp(logvar / 2) · noise.",
         check_reparameterize,
         "random means, log-variances in [−6, 3] and noise, of random shapes, against minisd's DiagonalGaussian."),
    Task("gaussian_kl", "(mean, logvar)",
         "KL(N(mean, diag exp(logvar)) ‖ N(0, I)) for each item of a batch of [B, C, H, W] moments: the "
         "per-dimension KL ½(μ² + σ² − 1 − log σ²) summed over C, H and W, shape [B].",
         check_gaussian_kl,
         "random moments of random shapes, against minisd's DiagonalGaussian.kl()."),
]
