"""Chapter 03 (ResNet blocks and time): the sinusoidal timestep embedding and a ResNet block by
hand."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from minisd.resnet import ResnetBlock, timestep_embedding

from . import Task

TITLE = "ResNet blocks and time"
GOALS = [
    "Build the sinusoidal timestep embedding (cos half first) and see why a network can read t "
    "from it.",
    "Trace a ResNet block: GroupNorm, SiLU, convolution, the timestep added to every channel, the "
    "shortcut.",
    "Explain GroupNorm and why the shortcut needs a 1×1 convolution when the channel count "
    "changes.",
]
PREREQUISITES = {
    "Math": "sines and cosines, mean/variance normalisation, convolution; the chain rule (stretch task).",
    "PyTorch": "nn.Conv2d, nn.GroupNorm, F.silu, broadcasting `[:, :, None, None]`, autograd (`.backward()`, `.grad`).",
}
READING_MINUTES = 60


def _embedding(t, dim, shift=0.0, sin_first=False, interleave=False):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - shift))
    angles = t.float()[:, None] * freqs[None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if interleave:
        return torch.stack([cos, sin], dim=-1).flatten(1)
    return torch.cat([sin, cos] if sin_first else [cos, sin], dim=-1)


def check_timestep_embedding(ctx):
    cases = [
        ("integer timesteps", ctx.randint(0, 1000, (ctx.integer(1, 6),))),
        ("float timesteps", ctx.rand(ctx.integer(1, 6), high=1000.0)),
    ]
    for label, t in cases:
        dim = 2 * ctx.integer(4, 160)
        mistakes = {
            "your embedding is [sin, cos]: SD puts the cosines first": lambda: _embedding(
                t, dim, sin_first=True
            ),
            "your embedding interleaves cos and sin; SD concatenates all cosines, then all sines":
                lambda: (
                _embedding(t, dim, interleave=True)
            ),
            "your frequencies use exp(−ln(10000)·i/(d/2 − 1)); SD divides by d/2": lambda: (
                _embedding(t, dim, shift=1.0)
            ),
        }
        shown = t.tolist() if not t.is_floating_point() else [round(float(x), 2) for x in t]
        with ctx.case(f"{label} {shown}, dim = {dim}"):
            # float32 angles t·ω reach 1000 rad, so a correct implementation that orders the
            # arithmetic differently differs by ~1e-4 there: the tolerance allows that, and no real
            # mistake comes close to it.
            ctx.expect_close(
                ctx.call(t, dim),
                timestep_embedding(t, dim),
                what="embedding",
                atol=5e-4,
                rtol=0,
                mistakes=mistakes,
            )


def check_resnet_forward(ctx):
    groups = ctx.choice([2, 4])
    cases = (
        ("in_channels == out_channels", True, True),
        ("in_channels != out_channels", False, True),
        (
            "a VAE block (no time input: time_emb_proj is None, t_emb is None)",
            ctx.choice([True, False]),
            False,
        ),
    )
    for label, same, timed in cases:
        cin = groups * ctx.integer(1, 4)
        cout = cin if same else groups * ctx.integer(1, 4)
        while not same and cout == cin:
            cout = groups * ctx.integer(1, 5)
        time_dim = ctx.integer(4, 24) if timed else None
        block = ctx.seed_module(
            ctx.module(
                ResnetBlock, cin, cout, time_dim, groups=groups, eps=ctx.choice([1e-5, 1e-6])
            )
        )
        x = ctx.randn(ctx.integer(1, 3), cin, ctx.integer(3, 8), ctx.integer(3, 8))
        t_emb = ctx.randn(x.shape[0], time_dim) if timed else None
        with torch.no_grad():
            expected = block(x, t_emb)
            h = block.conv1(F.silu(block.norm1(x)))
            shortcut = x if block.conv_shortcut is None else block.conv_shortcut(x)
            tail = lambda h: block.conv2(F.silu(block.norm2(h)))
            time = block.time_emb_proj(F.silu(t_emb))[:, :, None, None] if timed else 0
            mistakes = {
                "your output is missing the shortcut (the residual connection)": lambda: tail(
                    h + time
                )
            }
            if timed:
                mistakes.update(
                    {
                        "your time embedding skips the SiLU before time_emb_proj": lambda: (
                            shortcut + tail(h + block.time_emb_proj(t_emb)[:, :, None, None])
                        ),
                        "your output leaves out the timestep": lambda: shortcut + tail(h),
                        "your output adds the timestep after conv2 instead of after conv1":
                            lambda: (
                            shortcut + tail(h) + time
                        ),
                    }
                )
        title = f"{label} ({cin} → {cout} channels, GroupNorm groups = {groups})"
        with (
            ctx.case(title),
            torch.no_grad(),
            ctx.forbid_call(
                block,
                "your function calls the block itself (block(x, t_emb)); compute the output "
                "from its parts: block.norm1, block.conv1, block.time_emb_proj, ...",
            ),
        ):
            got = ctx.call(block, x, t_emb)
        with ctx.case(title):
            ctx.expect_close(got, expected, what="output", mistakes=mistakes)



# ------------------------------------------------------------------ core: the ResNet block as a module

def check_resnet_module(ctx):
    groups = ctx.choice([2, 4])
    for label, same in (("in_channels != out_channels", False), ("in_channels == out_channels", True)):
        cin = groups * ctx.integer(1, 3)
        cout = cin if same else cin + groups * ctx.integer(1, 2)
        time_dim = ctx.integer(4, 16)
        ref = ctx.seed_module(ResnetBlock(cin, cout, time_dim, groups=groups))
        x = ctx.randn(ctx.integer(1, 2), cin, ctx.integer(3, 6), ctx.integer(3, 6))
        t_emb = ctx.randn(x.shape[0], time_dim)
        with torch.no_grad():
            expected = ref(x, t_emb)
            h = ref.conv1(F.silu(ref.norm1(x)))
            shortcut = x if ref.conv_shortcut is None else ref.conv_shortcut(x)
            tail = lambda h: ref.conv2(F.silu(ref.norm2(h)))  # noqa: E731
            mistakes = {
                "your block leaves out the time embedding": shortcut + tail(h),
                "your block projects t_emb without the SiLU before time_emb_proj":
                    shortcut + tail(h + ref.time_emb_proj(t_emb)[:, :, None, None]),
                "your block is missing the shortcut": tail(h + ref.time_emb_proj(F.silu(t_emb))[:, :, None, None]),
            }
        with ctx.case(f"{label} ({cin} → {cout}, {groups} groups, time_dim {time_dim})"):
            got = ctx.call_module(dict(in_channels=cin, out_channels=cout, time_dim=time_dim, groups=groups),
                                  ref.state_dict(), x, t_emb)
            ctx.expect_close(got, expected, what="output", atol=1e-5, rtol=1e-4, mistakes=mistakes)


# ------------------------------------------------------------------ stretch: GroupNorm's backward pass

def check_group_norm_backward(ctx):
    groups = ctx.choice([1, 2, 4])
    shape = (ctx.integer(1, 3), groups * ctx.integer(1, 3), ctx.integer(2, 5), ctx.integer(2, 5))
    eps = ctx.choice([1e-5, 1e-6])
    x = (ctx.randn(*shape, scale=2.0) + 1.0).double().requires_grad_(True)
    grad_out = ctx.randn(*shape).double()
    (expected,) = torch.autograd.grad((F.group_norm(x, groups, eps=eps) * grad_out).sum(), x)  # the reference
    xg = x.detach().reshape(shape[0], groups, -1)
    std = (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    mistakes = {
        "your gradient is grad_out/σ: the mean and the variance depend on x too (two more terms)":
            (grad_out.reshape(shape[0], groups, -1) / std).reshape(shape),
    }
    with ctx.case(f"x {shape} (float64), {groups} groups, eps {eps:g}"):
        got = ctx.call(x.detach(), groups, grad_out, eps)
        # float64 in, float64 reference: any correct formula agrees to ~1e-12
        ctx.expect_close(got, expected, what="dx", atol=1e-9, rtol=1e-7, mistakes=mistakes)


TASKS = [
    Task("timestep_embedding", "(timesteps, dim)",
         "The sinusoidal timestep embedding: for timesteps [B] (integers or floats) return [B, dim] features "
         "[cos(t·ω₀), …, cos(t·ω_{dim/2−1}), sin(t·ω₀), …] with ω_i = exp(−ln(10000)·i/(dim/2)): all cosines "
         "first, then all sines.",
         check_timestep_embedding,
         "random batches of integer and float timesteps in [0, 1000), random even dims.",
         level="warm-up", minutes=15,
             forbidden=("minisd.resnet.timestep_embedding",),
             allowed="torch's elementwise functions (torch.exp, torch.cos, torch.sin, torch.cat, "
                "torch.arange); not "
        "minisd.resnet.timestep_embedding."),
    Task("resnet_forward", "(block, x, t_emb)",
         "The output of the minisd.resnet.ResnetBlock `block` on x [B, C_in, H, W] and the timestep embedding "
         "t_emb [B, time_dim], computed from the block's parts (norm1, conv1, time_emb_proj, norm2, dropout, conv2, "
         "conv_shortcut) without calling the block itself. The VAE's blocks have no time input: when "
         "block.time_emb_proj is None (and t_emb is None) there is no timestep shift.",
         check_resnet_forward,
         "random blocks with and without a shortcut convolution, with and without a time input (the VAE's kind), "
         "random weights and norm scales, random sizes.",
         level="core", minutes=20,
         allowed="the block's submodules (block.norm1, block.conv1, ...) and F.silu; not block(x, t_emb).",
             forbidden=("minisd.resnet.ResnetBlock.forward",)),
    Task("MyResnetBlock", "(in_channels, out_channels, time_dim, groups)",
         "The UNet's ResNet block as your own nn.Module, submodules named like minisd's: norm1, conv1, "
         "time_emb_proj, norm2, conv2 and, only when in_channels != out_channels, conv_shortcut (a 1×1 conv). "
         "GroupNorms with eps 1e-5, 3×3 convolutions with padding 1. forward(x, t_emb) -> [B, out_channels, H, W], "
         "the timestep injected as in the chapter.",
         check_resnet_module,
         "blocks with and without a shortcut convolution, loaded with minisd's ResnetBlock weights by name.",
         level="core", minutes=30, allowed="nn.GroupNorm, nn.Conv2d, nn.Linear, F.silu. Not minisd.resnet."),
    Task("group_norm_backward", "(x, groups, grad_out, eps=1e-05)",
         "The backward pass of GroupNorm without affine parameters: x [B, C, H, W] is normalised over each group "
         "of C/groups channels (and all pixels); given grad_out = ∂L/∂y, return ∂L/∂x, same shape and dtype. "
         "Derive it: the group's mean and variance depend on x.",
         check_group_norm_backward,
         "random float64 inputs, groups and eps, against torch.autograd through F.group_norm.",
         level="stretch", minutes=35, allowed="torch tensor arithmetic; no autograd."),

]
