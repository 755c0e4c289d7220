"""Chapter 02 (cross-attention and the transformer block): the GEGLU feed-forward activation."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from minisd.transformer import GEGLU, TransformerBlock

from . import Task

TITLE = "Cross-attention and the transformer block"
GOALS = [
    "Explain how cross-attention lets the prompt's tokens steer every pixel, and read its "
    "attention maps.",
    "Assemble the UNet's transformer block: self-attention, cross-attention, GEGLU feed-forward, "
    "pre-LayerNorm.",
    "Compute a gated linear unit by hand and match minisd's GEGLU.",
]
PREREQUISITES = {
    "Math": "chapter 1; the GELU function.",
    "PyTorch": "nn.Module, nn.LayerNorm, nn.Linear, `chunk`.",
}
READING_MINUTES = 60


def check_geglu(ctx):
    for label, lead in (
        ("tokens [B, n, C]", (ctx.integer(1, 3), ctx.integer(1, 9))),
        ("a single vector [C]", ()),
        ("a 4-D input [B, h, w, C]", (ctx.integer(1, 2), ctx.integer(1, 4), ctx.integer(1, 4))),
    ):
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
            "your result is gelu(value)·gate: the first half is the value, the second half goes "
            "through GELU": lambda: (
                F.gelu(value) * gate
            ),
            "your result uses the tanh approximation of GELU; SD uses the exact (erf) GELU":
                lambda: (
                value * F.gelu(gate, approximate="tanh")
            ),
            "your result uses SiLU instead of GELU": lambda: value * F.silu(gate),
            "your result leaves out the bias": lambda: (lambda v, g: v * F.gelu(g))(
                *(x @ weight.T).chunk(2, dim=-1)
            ),
            "your result splits even and odd channels; split into the first and second half "
            "instead":
                lambda: (
                projected[..., 0::2] * F.gelu(projected[..., 1::2])
            ),
        }
        with ctx.case(f"{label}, C = {channels}, H = {hidden}"):
            ctx.expect_close(
                ctx.call(x, weight, bias), expected.detach(), what="output", mistakes=mistakes
            )



# ------------------------------------------------------------------ warm-up: LayerNorm

def check_layer_norm(ctx):
    for label, shape in (("tokens [B, n, C]", (ctx.integer(1, 3), ctx.integer(1, 6), ctx.integer(3, 40))),
                         ("one vector", (ctx.integer(3, 40),))):
        x = ctx.randn(*shape, scale=3.0) + ctx.uniform(-2, 2)
        weight, bias = 1 + 0.3 * ctx.randn(shape[-1]), 0.3 * ctx.randn(shape[-1])
        eps = ctx.choice([1e-5, 1e-6])
        expected = F.layer_norm(x, (shape[-1],), weight, bias, eps)
        mean = x.mean(-1, keepdim=True)
        mistakes = {
            "your variance is the unbiased one (divides by C − 1); LayerNorm divides by C":
                (x - mean) / (x.var(-1, keepdim=True, unbiased=True) + eps).sqrt() * weight + bias,
            "your result leaves out the weight and bias": F.layer_norm(x, (shape[-1],), None, None, eps),
            "your result normalises over the wrong axis": (x - x.mean(0, keepdim=True)) / (
                x.var(0, keepdim=True, unbiased=False) + eps).sqrt() * weight + bias if x.dim() > 1 else None,
        }
        with ctx.case(f"{label} {tuple(shape)}, eps = {eps:g}"):
            ctx.expect_close(ctx.call(x, weight, bias, eps), expected, what="output", atol=1e-5, rtol=1e-4,
                             mistakes={k: v for k, v in mistakes.items() if v is not None})


# ------------------------------------------------------------------ core: the transformer block

def check_transformer_block(ctx):
    heads, head_dim = ctx.integer(1, 3), ctx.choice([2, 4])
    dim, context_dim = ctx.choice([8, 12]), ctx.integer(3, 10)
    ref = ctx.seed_module(TransformerBlock(dim, heads, head_dim, context_dim))
    x = ctx.randn(ctx.integer(1, 2), ctx.integer(2, 7), dim)
    context = ctx.randn(x.shape[0], ctx.integer(2, 6), context_dim)
    with torch.no_grad():
        expected = ref(x, context)
        h1 = x + ref.attn1(ref.norm1(x))
        h2 = h1 + ref.attn2(ref.norm2(h1), context)
        post = ref.norm1(x + ref.attn1(x))
        post = ref.norm2(post + ref.attn2(post, context))
        mistakes = {
            "your block leaves out the last residual (x + ff(norm3 x))": ref.ff(ref.norm3(h2)),
            "your block normalises after each residual (post-norm); SD normalises the input of each sub-layer "
            "(pre-norm)": ref.norm3(post + ref.ff(post)),
            "your block skips the cross-attention": h1 + ref.ff(ref.norm3(h1)),
            "your block attends to x in attn2 instead of the context": None,
        }
        try:
            wrong = h1 + ref.attn2(ref.norm2(h1), None) if dim == context_dim else None
        except Exception:  # noqa: BLE001 - shapes do not allow this mistake
            wrong = None
        mistakes["your block attends to x in attn2 instead of the context"] = wrong
    with ctx.case(f"dim {dim}, {heads} heads of {head_dim}, context width {context_dim}"):
        got = ctx.call_module(dict(dim=dim, heads=heads, head_dim=head_dim, context_dim=context_dim),
                              ref.state_dict(), x, context)
        ctx.expect_close(got, expected, what="output", atol=1e-5, rtol=1e-4,
                         mistakes={k: v for k, v in mistakes.items() if v is not None})


TASKS = [
    Task("geglu", "(x, weight, bias)",
         "The GEGLU activation of the transformer's feed-forward layer: project x [..., C] with weight [2H, C] and "
         "bias [2H], split the result along the last axis into two halves [value, gate] (value first), and return "
         "value · GELU(gate) with the exact GELU, shape [..., H].",
         check_geglu,
         "random sizes C ≠ H, inputs with zero to three leading axes.",
         level="warm-up", minutes=10,
             forbidden=("minisd.transformer.GEGLU.forward",),
             allowed="F.linear (or @), chunk, F.gelu; not minisd.transformer.GEGLU."),
    Task("layer_norm", "(x, weight, bias, eps=1e-05)",
         "LayerNorm over the last axis of x: subtract the mean, divide by √(variance + eps) with the biased "
         "variance (divide by C), then multiply by weight [C] and add bias [C].",
         check_layer_norm,
         "random shapes, offsets and scales, eps 1e-5 and 1e-6, against torch.nn.functional.layer_norm.",
         level="warm-up", minutes=10, allowed="torch tensor arithmetic (not F.layer_norm or nn.LayerNorm)."),
    Task("MyTransformerBlock", "(dim, heads, head_dim, context_dim)",
         "SD's transformer block as an nn.Module whose submodules are named like minisd's (the grader loads "
         "minisd's weights by name): norm1, attn1 (self-attention), norm2, attn2 (cross-attention to the "
         "context), norm3 (LayerNorms, eps 1e-5) and ff, whose parameters are ff.geglu.proj (dim → 8·dim) and "
         "ff.proj_out (4·dim → dim). forward(x, context) -> [B, n, dim]: three pre-norm residual sub-layers in "
         "the order of the chapter.",
         check_transformer_block,
         "random small blocks loaded with minisd's TransformerBlock weights by name.",
         level="core", minutes=35,
         allowed="minisd.attention.Attention, nn.LayerNorm, nn.Linear, your geglu (or F.gelu). Not "
                 "minisd.transformer's TransformerBlock, FeedForward or GEGLU."),

]
