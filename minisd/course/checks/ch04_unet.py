"""Chapter 04 (the UNet): the forward pass written from the UNet's parts, with the skip connections.
"""

from __future__ import annotations

import torch

from minisd.unet import UNet, UNetConfig

from . import Task

TITLE = "The UNet"
GOALS = [
    "Follow a latent through the UNet: down levels, middle, up levels, and the skip connections "
    "between them.",
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
    cfg = UNetConfig(
        channels=16,
        channel_mult=channel_mult,
        num_res_blocks=ctx.integer(1, 2),
        attention_levels=attention,
        num_heads=2,
        context_dim=ctx.choice([8, 12]),
        groups=8,
        transformer_depth=1,
        linear_projection=ctx.choice([True, False]),
    )
    unet = ctx.seed_module(ctx.module(UNet, cfg))
    factor = 2 ** (levels - 1)
    batch = ctx.integer(1, 2)
    x = ctx.randn(batch, 4, factor * ctx.integer(1, 3), factor * ctx.integer(1, 3))
    timesteps = ctx.randint(0, 1000, (batch,))
    context = ctx.randn(batch, ctx.integer(2, 7), cfg.context_dim)
    label = (
        f"a UNet with {levels} levels, {cfg.num_res_blocks} ResNet block(s) per level, attention "
        "at levels "
        f"{[i for i, a in enumerate(attention) if a]}, x {tuple(x.shape)}"
    )
    for label, steps in (
        (label, timesteps),
        (label + ", one timestep (an int) for the whole batch", ctx.integer(0, 999)),
    ):
        with torch.no_grad():
            expected = unet(x, steps, context)
        with (
            ctx.case(label),
            torch.no_grad(),
            ctx.forbid_call(
                unet,
                "your function calls the UNet itself (unet(x, ...)); write the forward pass from "
                "its parts "
                "(conv_in, time_mlp, down_levels, middle, up_levels, norm_out, conv_out)",
            ),
        ):
            got = ctx.call(unet, x, steps, context)
        with ctx.case(label):
            ctx.expect_close(got, expected, what="output", atol=1e-4, rtol=1e-4)



# ------------------------------------------------------------------ warm-ups: sizes and receptive fields

def check_conv_output_size(ctx):
    cases = [(ctx.integer(5, 70), 3, 2, 1), (ctx.integer(5, 70), 3, 1, 1), (ctx.integer(5, 70), 1, 1, 0),
             (ctx.integer(9, 70), ctx.choice([4, 5, 7]), ctx.choice([2, 3]), ctx.integer(0, 2))]
    for size, kernel, stride, padding in cases:
        conv = torch.nn.Conv2d(1, 1, kernel, stride=stride, padding=padding)
        with torch.no_grad():
            expected = conv(torch.zeros(1, 1, size, size)).shape[-1]   # what PyTorch actually produces
        with ctx.case(f"size {size}, kernel {kernel}, stride {stride}, padding {padding}"):
            got = ctx.call(size, kernel, stride, padding)
            if not isinstance(got, int) or isinstance(got, bool):
                ctx.fail(f"expected an int, got {type(got).__name__}")
            if got != expected:
                hint = ""
                if got == (size + 2 * padding - kernel) / stride + 1 or got == -(-(size + 2 * padding - kernel)
                                                                                   // stride) + 1:
                    hint = " (round down, not up: a window that does not fit is dropped)"
                ctx.fail(f"expected {expected}, got {got}{hint}")


def _measured_receptive_field(kernels, strides) -> int:
    """Build the conv stack with all-ones weights and see how many input pixels one output pixel depends on."""
    layers = [torch.nn.Conv1d(1, 1, k, stride=s, bias=False) for k, s in zip(kernels, strides)]
    size = 1
    for k, s in zip(reversed(kernels), reversed(strides)):
        size = (size - 1) * s + k
    x = torch.zeros(1, 1, size + 8, requires_grad=True)
    y = x
    for layer in layers:
        torch.nn.init.ones_(layer.weight)
        y = layer(y)
    y[0, 0, 0].backward()
    # the field is the extent of the input pixels that reach the output (with strided 1×1 layers some
    # pixels inside it are skipped, but the field still spans them)
    touched = (x.grad[0, 0] != 0).nonzero().flatten()
    return int(touched.max() - touched.min() + 1)


def check_receptive_field(ctx):
    for label in ("a stack of 3×3 convolutions", "with strided downsampling", "mixed kernels"):
        n = ctx.integer(1, 5)
        kernels = [3] * n if label != "mixed kernels" else [ctx.choice([1, 3, 5]) for _ in range(n)]
        strides = [1] * n if label == "a stack of 3×3 convolutions" else [ctx.choice([1, 2]) for _ in range(n)]
        expected = _measured_receptive_field(kernels, strides)
        with ctx.case(f"{label}: kernels {kernels}, strides {strides}"):
            got = ctx.call(list(kernels), list(strides))
            if got != expected:
                naive = 1 + sum(k - 1 for k in kernels)
                hint = " (each layer's k − 1 counts in the pixels of its *input*: multiply by the strides " \
                       "before it)" if got == naive and naive != expected else ""
                ctx.fail(f"expected {expected} input pixels, got {got}{hint}")


TASKS = [
    Task("unet_forward", "(unet, x, timesteps, context)",
         "The output of the minisd UNet `unet` on latents x [B, C, h, w], timesteps [B] (or one number for the whole "
         "batch) and the text context "
         "[B, tokens, context_dim], computed from its parts (conv_in, time_mlp, the down levels, the middle block, "
         "the up levels with their skip connections, norm_out, conv_out) without calling `unet` itself.",
         check_unet_forward,
         "a small random UNet each run (2 or 3 levels, 1 or 2 ResNet blocks per level, attention at random levels), "
         "random latents, timesteps (a tensor [B] and a single int) and context.",
         level="core", minutes=45,
         allowed="the UNet's submodules (its levels, blocks and layers); not unet(...) itself.",
             forbidden=("minisd.unet.UNet.forward",)),
    Task("conv_output_size", "(size, kernel, stride, padding)",
         "The output size (an int) of a convolution along one axis of `size` pixels with this kernel size, stride "
         "and padding (on both sides).",
         check_conv_output_size,
         "SD's 3×3 stride-1 and stride-2 convolutions, 1×1 convolutions and random others, against what "
         "nn.Conv2d produces.",
         level="warm-up", minutes=10, allowed="plain Python."),
    Task("receptive_field", "(kernels, strides)",
         "The receptive field (an int, in input pixels along one axis) of one output pixel of a stack of "
         "convolutions applied in order, layer i having kernel size kernels[i] and stride strides[i].",
         check_receptive_field,
         "random stacks with and without strided layers, against the extent of the input pixels an "
         "output's gradient reaches.",
         level="warm-up", minutes=15, allowed="plain Python."),

]
