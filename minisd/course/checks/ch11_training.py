"""Chapter 11 (training): the ε-prediction loss."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from minisd.schedule import NoiseSchedule
from minisd.unet import UNet, UNetConfig

from . import Task

TITLE = "Training"
GOALS = [
    "Derive the simplified diffusion loss ‖ε − ε_θ(x_t, t, c)‖² and write one training step.",
    "Train a small model on the shapes dataset and watch the loss, samples and EMA weights.",
    "Know what changes for v-prediction and for conditioning dropout (needed for guidance).",
]
PREREQUISITES = {
    "Math": "chapters 7–8; mean squared error; what a gradient step does.",
    "PyTorch": "optimizers, `loss.backward()`, `torch.no_grad()`, `state_dict`.",
}
READING_MINUTES = 90


def check_diffusion_loss(ctx):
    cfg = UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(False, True), num_heads=2,
                     context_dim=8, groups=8)
    unet = ctx.seed_module(UNet(cfg))
    alphas_cumprod = NoiseSchedule().alphas_cumprod
    batch = ctx.integer(2, 3)
    x0 = ctx.randn(batch, 4, 2 * ctx.integer(2, 4), 2 * ctx.integer(2, 4))
    noise = ctx.randn(*x0.shape)
    context = ctx.randn(batch, ctx.integer(2, 6), cfg.context_dim)
    timesteps = ctx.randint(0, 1000, (batch,))
    a = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

    unet.zero_grad()
    eps_hat = unet(x_t, timesteps, context)
    expected = F.mse_loss(eps_hat, noise)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
    unet.zero_grad()
    def without_grad(fn):
        def compute():
            with torch.no_grad():
                return fn().reshape(())
        return compute

    mistakes = {
        "your loss compares the prediction with x₀; the ε objective compares it with the noise":
            without_grad(lambda: F.mse_loss(eps_hat, x0)),
        "your loss sums the squared errors; take the mean":
            without_grad(lambda: F.mse_loss(eps_hat, noise, reduction="sum")),
        "your loss feeds x₀ to the UNet instead of the noised x_t":
            without_grad(lambda: F.mse_loss(unet(x0, timesteps, context), noise)),
        "your x_t uses ᾱ and 1 − ᾱ without square roots":
            without_grad(lambda: F.mse_loss(unet(a * x0 + (1 - a) * noise, timesteps, context), noise)),
    }
    label = f"x0 {tuple(x0.shape)}, timesteps {timesteps.tolist()}"
    with ctx.case(label):
        got = ctx.expect_tensor(ctx.call(unet, x0, context, timesteps, noise, alphas_cumprod), "the loss")
        if got.numel() != 1:
            ctx.fail(f"the loss should be a single number (a 0-dim tensor), got shape {tuple(got.shape)}")
        ctx.expect_close(got.reshape(()), expected.detach(), what="loss", atol=1e-6, rtol=1e-4,
                         mistakes=mistakes)
        if not got.requires_grad:
            ctx.fail("the loss is right but not connected to the UNet's parameters: no .item(), .detach() or "
                     "torch.no_grad() in a loss you will train with")
        got.reshape(()).backward()
        for name, p in unet.named_parameters():
            if p.grad is None:
                ctx.fail(f"the loss has no gradient for unet.{name}")
            ctx.expect_close(p.grad, expected_grads[name], what=f"gradient of unet.{name}", atol=1e-5, rtol=1e-3)


TASKS = [
    Task("diffusion_loss", "(unet, x0, context, timesteps, noise, alphas_cumprod)",
         "The ε-prediction training loss for one batch: noise x0 to the timesteps [B] with the given noise, let the "
         "UNet predict the noise from x_t, timesteps and context, and return the mean squared error between the "
         "prediction and the noise (a 0-dim tensor that can be back-propagated).",
         check_diffusion_loss,
         "a small random UNet, random latents, timesteps, noise and context; the loss value and its gradients with "
         "respect to every UNet parameter."),
]
