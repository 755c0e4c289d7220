"""Chapter 02 (cross-attention and the transformer block): the GEGLU feed-forward activation."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from minisd.transformer import GEGLU

from . import Task

TITLE = "Cross-attention and the transformer block"
GOALS = [
    "Explain how cross-attention lets the prompt's tokens steer every pixel, and read its attention maps.",
    "Assemble the UNet's transformer block: self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm.",
    "Compute a gated linear unit by hand and match minisd's GEGLU.",
]
PREREQUISITES = {
    "Math": "chapter 1; the GELU function.",
    "PyTorch": "nn.Module, nn.LayerNorm, nn.Linear, `chunk`.",
}
READING_MINUTES = 60


def check_geglu(ctx):
    for label, lead in (("tokens [B, n, C]", (ctx.integer(1, 3), ctx.integer(1, 9))),
                        ("a single vector [C]", ()),
                        ("a 4-D input [B, h, w, C]", (ctx.integer(1, 2), ctx.integer(1, 4), ctx.integer(1, 4)))):
        channels, hidden = ctx.integer(2, 24), ctx.integer(2, 24)
        while hidden == channels:
            hidden = ctx.integer(2, 24)
        x = ctx.randn(*lead, channels)
        weight, bias = ctx.randn(2 * hidden, channels, scale=0.5), ctx.randn(2 * hidden, scale=0.5)
        module = GEGLU(channels, hidden)
        with torch.no_grad():
            module.proj.weight.copy_(weight)
            module.proj.bias.copy_(bias)
            expected = module(x)
        projected = F.linear(x, weight, bias)
        value, gate = projected.chunk(2, dim=-1)
        mistakes = {
            "your result is gelu(value)·gate: the first half is the value, the second half goes through GELU":
                lambda: F.gelu(value) * gate,
            "your result uses the tanh approximation of GELU; SD uses the exact (erf) GELU":
                lambda: value * F.gelu(gate, approximate="tanh"),
            "your result uses SiLU instead of GELU": lambda: value * F.silu(gate),
            "your result leaves out the bias": lambda: (lambda v, g: v * F.gelu(g))(*(x @ weight.T).chunk(2, dim=-1)),
            "your result splits even and odd channels; split into the first and second half instead":
                lambda: projected[..., 0::2] * F.gelu(projected[..., 1::2]),
        }
        with ctx.case(f"{label}, C = {channels}, H = {hidden}"):
            ctx.expect_close(ctx.call(x, weight, bias), expected.detach(), what="output", mistakes=mistakes)


TASKS = [
    Task("geglu", "(x, weight, bias)",
         "The GEGLU activation of the transformer's feed-forward layer: project x [..., C] with weight [2H, C] and "
         "bias [2H], split the result along the last axis into two halves [value, gate] (value first), and return "
         "value · GELU(gate) with the exact GELU, shape [..., H].",
         check_geglu,
         "random sizes C ≠ H, inputs with zero to three leading axes."),
]
