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
    cfg = UNetConfig(
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_heads=2,
        context_dim=8,
        groups=8,
    )
    unet = ctx.seed_module(ctx.module(UNet, cfg))
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
            without_grad(
            lambda: F.mse_loss(eps_hat, x0)
        ),
        "your loss sums the squared errors; take the mean": without_grad(
            lambda: F.mse_loss(eps_hat, noise, reduction="sum")
        ),
        "your loss feeds x₀ to the UNet instead of the noised x_t": without_grad(
            lambda: F.mse_loss(unet(x0, timesteps, context), noise)
        ),
        "your x_t uses ᾱ and 1 − ᾱ without square roots": without_grad(
            lambda: F.mse_loss(unet(a * x0 + (1 - a) * noise, timesteps, context), noise)
        ),
    }
    label = f"x0 {tuple(x0.shape)}, timesteps {timesteps.tolist()}"
    with ctx.case(label):
        # the loss and, when it is connected to the UNet, backward() from it in the sandbox: its
        # gradients
        got, grads = ctx.call_with_grads(unet, x0, context, timesteps, noise, alphas_cumprod)
        got = ctx.expect_tensor(got, "the loss")
        if got.numel() != 1:
            ctx.fail(
                f"the loss should be a single number (a 0-dim tensor), got shape {tuple(got.shape)}"
            )
        ctx.expect_close(
            got.reshape(()), expected.detach(), what="loss", atol=1e-6, rtol=1e-4, mistakes=mistakes
        )
        if grads is None:
            ctx.fail(
                "the loss is right but not connected to the UNet's parameters: no .item(), "
                ".detach() or "
                "torch.no_grad() in a loss you will train with"
            )
        for name, _ in unet.named_parameters():
            if name not in grads[unet]:
                ctx.fail(f"the loss has no gradient for unet.{name}")
            ctx.expect_close(
                grads[unet][name],
                expected_grads[name],
                what=f"gradient of unet.{name}",
                atol=1e-5,
                rtol=1e-3,
            )



# ------------------------------------------------------------------ warm-up: EMA of the weights

def check_ema_update(ctx):
    shapes = [(ctx.integer(1, 5), ctx.integer(1, 5)), (ctx.integer(1, 7),)]
    ema = [ctx.randn(*s) for s in shapes]
    params = [ctx.randn(*s) for s in shapes]
    decay = ctx.choice([0.9, 0.999, ctx.uniform(0.5, 0.99)])
    expected = [torch.lerp(e, p, 1 - decay) for e, p in zip(ema, params)]   # e + (1 − decay)(p − e)
    with ctx.case(f"two tensors {shapes}, decay {decay:.4f}"):
        got = ctx.call([e.clone() for e in ema], [p.clone() for p in params], decay)
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            ctx.fail(f"expected a list of {len(expected)} tensors, got {type(got).__name__}")
        for i, (g, e, p, x) in enumerate(zip(got, ema, params, expected)):
            ctx.expect_close(g, x, what=f"EMA tensor {i}", mistakes={
                "your update keeps (1 − decay) of the old average: decay weighs the old EMA":
                    torch.lerp(e, p, decay)})


# ------------------------------------------------------------------ stretch: a training loop to a known floor

def check_train_scalar_denoiser(ctx):
    k = 3
    alpha_bars = torch.tensor(sorted(ctx.uniform(0.05, 0.95) for _ in range(k)))
    x0 = ctx.randn(2048) * ctx.uniform(0.5, 2.0)
    m2 = float((x0.double() ** 2).mean())
    a = alpha_bars.double()
    best = (1 - a).sqrt() / (a * m2 + 1 - a)          # argmin of E(ε − c·x_t)² for each ᾱ
    floor = 1 - (1 - a) / (a * m2 + 1 - a)              # the loss there: no model of this form does better
    x0_target = a.sqrt() * m2 / (a * m2 + 1 - a)        # the argmin when the target is x₀ instead of ε
    with ctx.case(f"ᾱ = {[round(float(x), 3) for x in alpha_bars]}, E[x₀²] = {m2:.3f}, 400 steps, lr 0.1"):
        got = ctx.expect_tensor(ctx.call(x0, alpha_bars, 400, 0.1, ctx.integer(0, 10 ** 6)), "the coefficients")
        if tuple(got.shape) != (k,):
            ctx.fail(f"expected one coefficient per ᾱ, shape ({k},), got {tuple(got.shape)}")
        c = got.detach().double()
        loss = (1 - c * (1 - a).sqrt()) ** 2 + c ** 2 * a * m2    # exact expected loss of these coefficients
        if torch.allclose(c, torch.zeros_like(c)):
            ctx.fail("your coefficients are all 0: did the optimizer step update them?")
        if torch.allclose(c, x0_target, rtol=0.05, atol=0.01):
            ctx.fail("your model learned to predict x₀; the target of this loss is the noise ε")
        # SGD on 2048 samples settles within about 1% of the optimum; 5% + 0.01 leaves room for the noise of
        # the last steps while any wrong objective or a loop that barely trains lands far outside
        if not torch.allclose(c, best, rtol=0.05, atol=0.01):
            ctx.fail(f"coefficients {[round(float(x), 4) for x in c]}, optimum {[round(float(x), 4) for x in best]}: "
                     f"expected loss {[round(float(x), 4) for x in loss]} vs the floor "
                     f"{[round(float(x), 4) for x in floor]}")


TASKS = [
    Task("diffusion_loss", "(unet, x0, context, timesteps, noise, alphas_cumprod)",
         "The ε-prediction training loss for one batch: noise x0 to the timesteps [B] with the given noise, let the "
         "UNet predict the noise from x_t, timesteps and context, and return the mean squared error between the "
         "prediction and the noise (a 0-dim tensor that can be back-propagated).",
         check_diffusion_loss,
         "a small random UNet, random latents, timesteps, noise and context; the loss value and its gradients with "
         "respect to every UNet parameter.",
         level="core", minutes=15,
         allowed="the given q_sample (chapter 7's task) and the unet.",
             forbidden=("minisd.train.train_ldm.diffusion_loss",)),
    Task("ema_update", "(ema, params, decay)",
         "One step of the exponential moving average of the weights: given lists of tensors `ema` and `params`, "
         "return the new list, each ema·decay + param·(1 − decay). Do not modify the inputs.",
         check_ema_update,
         "random tensors and decays.",
         level="warm-up", minutes=5, allowed="torch."),
    Task("train_scalar_denoiser", "(x0, alpha_bars, steps, lr, seed)",
         "A training loop: the model ε̂ = c_k·x_t has one learnable number c_k per noise level alpha_bars[k] "
         "(a tensor [K]); x0 is a tensor [N] of 1-D data. Train c (start at zeros) for `steps` steps of SGD with "
         "learning rate lr on the ε-prediction loss, each step drawing fresh noise for every sample and level "
         "(torch.Generator seeded with `seed`), and return the trained c [K]. The grader checks that it reaches the "
         "known optimum of this loss.",
         check_train_scalar_denoiser,
         "random data scales and noise levels; c must land within 5% of the analytic optimum.",
         level="stretch", minutes=30, allowed="torch (autograd and torch.optim are fine), your diffusion_loss "
                                              "ideas; no closed form."),

]
