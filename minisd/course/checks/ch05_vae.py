"""Chapter 05 (the VAE): the reparameterisation trick and the KL term."""

from __future__ import annotations

import torch

from minisd.vae import DiagonalGaussian

from . import Task

TITLE = "The VAE"
GOALS = [
    "Explain why Stable Diffusion works in an 8× smaller latent space and what the VAE's encoder "
    "and decoder do.",
    "Sample from the encoder's Gaussian with the reparameterisation trick, and compute its KL to "
    "N(0, I).",
    "Match the VAE against diffusers' outputs stored in tests/fixtures.",
]
PREREQUISITES = {
    "Math": "Gaussian densities, KL divergence, expectation of a squared error.",
    "PyTorch": "nn.Module, `torch.exp`, `sum(dim=...)`, a training loop with an optimizer.",
}
READING_MINUTES = 70


def _moments(ctx, shape):
    mean = ctx.randn(*shape)
    # inside the VAE's clamp [-30, 20], so the clamp does not matter
    logvar = ctx.rand(*shape, low=-6.0, high=3.0)
    return mean, logvar


def check_reparameterize(ctx):
    for label, shape in (
        ("latents [B, 4, h, w]", (ctx.integer(1, 3), 4, ctx.integer(2, 8), ctx.integer(2, 8))),
        ("a vector [n]", (ctx.integer(2, 20),)),
    ):
        mean, logvar = _moments(ctx, shape)
        seed = ctx.integer(0, 2**31)
        # minisd's own sampler fed the same noise: DiagonalGaussian.sample draws randn(mean.shape,
        # generator), and a vector is viewed as [1, n, 1, 1] (same numbers, same order)
        as_4d = (lambda t: t) if len(shape) == 4 else (lambda t: t.reshape(1, -1, 1, 1))
        sample = DiagonalGaussian(torch.cat([as_4d(mean), as_4d(logvar)], dim=1)).sample(
            torch.Generator().manual_seed(seed)
        )
        expected = sample.reshape(shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        mistakes = {
            "your sample uses exp(logvar) (the variance) where the standard deviation exp(logvar / "
            "2) belongs": lambda: (
                mean + torch.exp(logvar) * noise
            ),
            "your sample uses logvar itself as the standard deviation": lambda: (
                mean + logvar * noise
            ),
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
        "your KL is summed over the whole batch; return one value per item, shape [B]": lambda: (
            per_dim.sum()
        ),
        "your KL uses exp(logvar / 2) (σ) where σ² = exp(logvar) belongs": lambda: (
            0.5 * (mean**2 + (0.5 * logvar).exp() - 1 - logvar).sum(dim=[1, 2, 3])
        ),
        "your KL has the sign of the log σ² term flipped": lambda: (
            0.5 * (mean**2 + logvar.exp() - 1 + logvar).sum(dim=[1, 2, 3])
        ),
    }
    with ctx.case(f"mean and logvar of shape {shape}"):
        ctx.expect_close(ctx.call(mean, logvar), expected, what="KL", atol=1e-4, mistakes=mistakes)



# ------------------------------------------------------------------ core: the posterior module

def check_posterior_module(ctx):
    c = ctx.integer(1, 4)
    conv = ctx.seed_module(torch.nn.Conv2d(2 * c, 2 * c, 1))
    h = ctx.randn(ctx.integer(1, 3), 2 * c, ctx.integer(2, 5), ctx.integer(2, 5))
    h[0, c, 0, 0] = 200.0 / max(float(conv.weight[c, c]), 1e-3) if float(conv.weight[c, c]) > 0.05 else 0.0
    noise = ctx.randn(h.shape[0], c, *h.shape[2:])
    state = {"quant_conv." + k: v for k, v in conv.state_dict().items()}
    with torch.no_grad():
        moments = conv(h)
        posterior = DiagonalGaussian(moments)   # minisd's posterior: the reference
        z, kl = posterior.mean + posterior.std * noise, posterior.kl()
        mean, raw_logvar = moments.chunk(2, dim=1)
        unclamped = 0.5 * torch.sum(mean ** 2 + raw_logvar.exp() - 1 - raw_logvar, dim=[1, 2, 3])
    with ctx.case(f"latent_channels {c}, h {tuple(h.shape)}"):
        got = ctx.call_module(dict(latent_channels=c), state, h, noise)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            ctx.fail(f"expected the pair (z, kl), got {type(got).__name__}")
        ctx.expect_close(got[0], z, what="z", mistakes={
            "your z scales the noise by exp(logvar), the variance; use the standard deviation exp(logvar / 2)":
                mean + posterior.var * noise,
            "your z takes the log-variance from the first half of the channels; the mean comes first":
                raw_logvar + torch.exp(0.5 * mean.clamp(-30, 20)) * noise})
        # the KL sums up to a few hundred numbers of size up to e^20: compare relative to its size
        ctx.expect_close(got[1], kl, what="kl", atol=1e-4, rtol=1e-4, mistakes={
            "your KL uses the log-variance before clamping it to [−30, 20]": unclamped,
            "your KL is missing the factor ½": 2 * kl})


# ------------------------------------------------------------------ stretch: the KL's gradient

def check_kl_gradients(ctx):
    shape = (ctx.integer(1, 3), ctx.integer(1, 4), ctx.integer(2, 5), ctx.integer(2, 5))
    mean = ctx.randn(*shape).requires_grad_(True)
    logvar = ctx.randn(*shape, scale=2.0).requires_grad_(True)
    kl = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl().sum()
    d_mean, d_logvar = torch.autograd.grad(kl, (mean, logvar))    # autograd is the reference
    m, lv = mean.detach(), logvar.detach()
    with ctx.case(f"mean, logvar {shape} (|logvar| < 20, inside the clamp)"):
        got = ctx.call(m, lv)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            ctx.fail(f"expected the pair (d_mean, d_logvar), got {type(got).__name__}")
        ctx.expect_close(got[0], d_mean, what="∂KL/∂mean", mistakes={"yours is 2·mean: mind the ½": 2 * m})
        ctx.expect_close(got[1], d_logvar, what="∂KL/∂logvar", mistakes={
            "yours is exp(logvar) − 1: mind the ½": lv.exp() - 1,
            "yours is ½·exp(logvar): the −log σ² term contributes −½": 0.5 * lv.exp()})


TASKS = [
    Task("reparameterize", "(mean, logvar, noise)",
         "A sample of N(mean, diag exp(logvar)) written as a differentiable function of mean and logvar, given "
         "standard normal `noise` of the same shape: z = mean + exp(logvar / 2) · noise.",
         check_reparameterize,
         "random means, log-variances in [−6, 3] and noise, of random shapes, against minisd's DiagonalGaussian.",
         level="warm-up", minutes=5,
             forbidden=("minisd.vae.DiagonalGaussian.sample",),
             allowed="torch.exp and arithmetic; not minisd.vae.DiagonalGaussian."),
    Task("gaussian_kl", "(mean, logvar)",
         "KL(N(mean, diag exp(logvar)) ‖ N(0, I)) for each item of a batch of [B, C, H, W] moments: the "
         "per-dimension KL ½(μ² + σ² − 1 − log σ²) summed over C, H and W, shape [B].",
         check_gaussian_kl,
         "random moments of random shapes, against minisd's DiagonalGaussian.kl().",
         level="warm-up", minutes=10,
             forbidden=("minisd.vae.DiagonalGaussian.kl",),
             allowed="torch.exp, torch.sum and arithmetic; not minisd.vae.DiagonalGaussian.kl."),
    Task("Posterior", "(latent_channels)",
         "The top of the VAE encoder as an nn.Module: a 1×1 convolution `quant_conv` (2·latent_channels → "
         "2·latent_channels, with bias). forward(h, noise) -> (z, kl): the convolution's output holds the mean "
         "(first half of the channels) and the log-variance (second half, clamped to [−30, 20] as the original "
         "code does); z is the reparameterised sample with the given noise; kl [B] is KL(q ‖ N(0, I)) summed over "
         "C, H, W.",
         check_posterior_module,
         "random sizes and minisd weights loaded by name; one log-variance pushed past the clamp.",
         level="core", minutes=25,
         allowed="nn.Conv2d, your reparameterize and gaussian_kl. Not minisd.vae.DiagonalGaussian."),
    Task("kl_gradients", "(mean, logvar)",
         "The gradients of the summed KL term Σ ½(μ² + e^{logvar} − 1 − logvar) with respect to mean and to "
         "logvar (inside the clamp), as a pair of tensors shaped like the inputs. Derive them by hand.",
         check_kl_gradients,
         "random means and log-variances, against torch.autograd through minisd's DiagonalGaussian.kl().",
         level="stretch", minutes=15, allowed="torch tensor arithmetic; no autograd."),

]
