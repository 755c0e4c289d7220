"""Chapter 04 (the UNet): the forward pass written from the UNet's parts, with the skip connections."""
from __future__ import annotations

import torch

from minisd.unet import UNet, UNetConfig

from . import Task

TITLE = "The UNet"
GOALS = [
    "Follow a latent through the UNet: down levels, middle, up levels, and the skip connections between them.",
    "Count the skips and channels at each level, and see where time and text enter.",
    "Write the forward pass from the UNet's parts and match minisd's UNet exactly.",
]
PREREQUISITES = {
    "Math": "chapters 1–3; convolution output sizes.",
    "PyTorch": "nn.ModuleList, lists as stacks (`append`/`pop`), `torch.cat`.",
}
READING_MINUTES = 60


def check_unet_forward(ctx):
    levels = ctx.choice([2, 3])
    channel_mult = (1, 2, 2)[:levels]
    attention = tuple(ctx.choice([True, False]) for _ in range(levels))
    if not any(attention):
        attention = (True,) + attention[1:]
    cfg = UNetConfig(channels=16, channel_mult=channel_mult, num_res_blocks=ctx.integer(1, 2),
                     attention_levels=attention, num_heads=2, context_dim=ctx.choice([8, 12]), groups=8,
                     transformer_depth=1, linear_projection=ctx.choice([True, False]))
    unet = ctx.seed_module(UNet(cfg))
    factor = 2 ** (levels - 1)
    batch = ctx.integer(1, 2)
    x = ctx.randn(batch, 4, factor * ctx.integer(1, 3), factor * ctx.integer(1, 3))
    timesteps = ctx.randint(0, 1000, (batch,))
    context = ctx.randn(batch, ctx.integer(2, 7), cfg.context_dim)
    label = (f"a UNet with {levels} levels, {cfg.num_res_blocks} ResNet block(s) per level, attention at levels "
             f"{[i for i, a in enumerate(attention) if a]}, x {tuple(x.shape)}")
    for label, steps in ((label, timesteps), (label + ", one timestep (an int) for the whole batch",
                                               ctx.integer(0, 999))):
        with torch.no_grad():
            expected = unet(x, steps, context)
        with ctx.case(label), torch.no_grad(), ctx.forbid_call(
                unet, "your function calls the UNet itself (unet(x, ...)); write the forward pass from its parts "
                      "(conv_in, time_mlp, down_levels, middle, up_levels, norm_out, conv_out)"):
            got = ctx.call(unet, x, steps, context)
        with ctx.case(label):
            ctx.expect_close(got, expected, what="output", atol=1e-4, rtol=1e-4)


TASKS = [
    Task("unet_forward", "(unet, x, timesteps, context)",
         "The output of the minisd UNet `unet` on latents x [B, C, h, w], timesteps [B] (or one number for the whole "
         "batch) and the text context "
         "[B, tokens, context_dim], computed from its parts (conv_in, time_mlp, the down levels, the middle block, "
         "the up levels with their skip connections, norm_out, conv_out) without calling `unet` itself.",
         check_unet_forward,
         "a small random UNet each run (2 or 3 levels, 1 or 2 ResNet blocks per level, attention at random levels), "
         "random latents, timesteps (a tensor [B] and a single int) and context."),
]
