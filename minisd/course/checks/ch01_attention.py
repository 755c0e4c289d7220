"""Chapter 01 (attention): scaled dot-product attention with an optional boolean mask."""

from __future__ import annotations

import math

import torch

from minisd.attention import Attention, attention_math, causal_mask

from . import Task

TITLE = "Attention"
GOALS = [
    "Derive scaled dot-product attention softmax(QKᵀ/√d)V and say why the 1/√d is there.",
    "Split channels into heads and put them back together (einops rearrange).",
    "Use a boolean mask to stop queries from seeing some keys (causal and padding masks).",
    "Check a hand-written implementation against a reference.",
]
PREREQUISITES = {
    "Math": "matrix products, softmax, variance of a sum of independent variables.",
    "PyTorch": "tensor shapes, `@`, `transpose`, `masked_fill`, nn.Linear, nn.Module (`__init__`/`forward`), einops `rearrange`.",
}
READING_MINUTES = 60


def _scores(q, k):
    return q @ k.transpose(-2, -1)


def _mistakes(q, k, v, mask):
    d = q.shape[-1]

    def attend(scores, dim=-1, use_mask=mask, invert=False):
        if use_mask is not None:
            keep = ~use_mask if invert else use_mask
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=dim) @ v

    options = {
        "your output equals softmax(q·kᵀ)·v without the scale: did you forget to divide the "
        "scores by √d "
        f"(here √{d} ≈ {math.sqrt(d):.3g})?": lambda: attend(_scores(q, k)),
        "your output equals softmax(q·kᵀ/d)·v: the scale is 1/√d, not 1/d": lambda: attend(
            _scores(q, k) / d
        ),
        "your output equals softmax(q·kᵀ·√d)·v: divide by √d instead of multiplying": lambda: (
            attend(_scores(q, k) * math.sqrt(d))
        ),
    }
    if q.shape[-2] == k.shape[-2]:
        options[
            "your softmax runs over the queries (dim −2); it should run over the keys (the last "
            "dim)"
        ] = lambda: attend(_scores(q, k) / math.sqrt(d), dim=-2)
    if mask is not None:
        options["your output ignores the mask"] = lambda: attend(
            _scores(q, k) / math.sqrt(d), use_mask=None
        )
        options[
            "your mask works the wrong way round: scores are removed where the mask is False, kept "
            "where True"
        ] = lambda: attend(_scores(q, k) / math.sqrt(d), invert=True)
    return options


def check_attention(ctx):
    def inputs(n, m):
        batch, heads, d = ctx.integer(1, 3), ctx.integer(1, 4), ctx.choice([4, 8, 16, 32])
        return (
            ctx.randn(batch, heads, n, d),
            ctx.randn(batch, heads, m, d),
            ctx.randn(batch, heads, m, d),
        )

    def run(label, q, k, v, mask=None):
        with ctx.case(label):
            expected = attention_math(q, k, v, mask)[0]
            got = ctx.call(q, k, v) if mask is None else ctx.call(q, k, v, mask=mask)
            ctx.expect_close(got, expected, what="output", mistakes=_mistakes(q, k, v, mask))

    n = ctx.integer(2, 9)
    run(f"self-attention, {n} tokens, no mask", *inputs(n, n))
    n, m = ctx.integer(2, 9), ctx.integer(2, 9)
    while m == n:
        m = ctx.integer(2, 12)
    q, k, v = inputs(n, m)
    run(
        f"cross-attention, {n} queries and {m} keys (q {tuple(q.shape)}, k {tuple(k.shape)})",
        q,
        k,
        v,
    )
    n = ctx.integer(3, 9)
    run(f"a causal mask of shape [{n}, {n}]", *inputs(n, n), mask=causal_mask(n))
    q, k, v = inputs(ctx.integer(2, 7), ctx.integer(3, 9))
    batch, m = q.shape[0], k.shape[-2]
    keep = ctx.rand(batch, 1, 1, m) < 0.6
    keep[..., 0] = True  # every query keeps at least one key
    run(f"a padding mask of shape {tuple(keep.shape)}", q, k, v, mask=keep)



# ------------------------------------------------------------------ core: a multi-head attention module

def _mha_by_parts(ref, x, c, split="b n (h d) -> b h n d", heads=None, project=True):
    from einops import rearrange
    heads = heads or ref.heads
    c = x if c is None else c
    q, k, v = ref.to_q(x), ref.to_k(c), ref.to_v(c)
    q, k, v = (rearrange(t, split, h=heads) for t in (q, k, v))
    out = attention_math(q, k, v)[0]
    out = rearrange(out, split.split(" -> ")[1] + " -> " + split.split(" -> ")[0], h=heads)
    return ref.to_out(out) if project else out


def check_multi_head_attention(ctx):
    for label, context_dim in (("self-attention", None), ("cross-attention", ctx.integer(3, 12))):
        heads, head_dim = ctx.integer(2, 4), ctx.choice([2, 4, 8])
        dim = ctx.choice([6, 8, 12])
        ref = ctx.seed_module(Attention(dim, heads, head_dim, context_dim=context_dim))
        x = ctx.randn(ctx.integer(1, 3), ctx.integer(2, 7), dim)
        c = None if context_dim is None else ctx.randn(x.shape[0], ctx.integer(2, 9), context_dim)
        with torch.no_grad():
            expected = ref(x, c)
            mistakes = {
                "your heads split the channels as (d h) instead of (h d): head r must hold channels r·d … "
                "(r+1)·d − 1": _mha_by_parts(ref, x, c, split="b n (d h) -> b h n d"),
                "your module attends with one head over all channels; split into `heads` heads first":
                    _mha_by_parts(ref, x, c, heads=1),
                "your output skips the output projection to_out": _mha_by_parts(ref, x, c, project=False),
            }
        kwargs = dict(query_dim=dim, heads=heads, head_dim=head_dim, context_dim=context_dim)
        inputs = (x,) if c is None else (x, c)
        with ctx.case(f"{label}: dim {dim}, {heads} heads of {head_dim}"):
            got = ctx.call_module(kwargs, ref.state_dict(), *inputs)
            # O(1) outputs through three small matmuls and a softmax: float32 rounding stays near 1e-6
            ctx.expect_close(got, expected, what="output", atol=1e-5, rtol=1e-4, mistakes=mistakes)


# ------------------------------------------------------------------ stretch: the softmax's backward pass

def check_softmax_backward(ctx):
    for label, shape in (("a row of scores", (ctx.integer(2, 9),)),
                         ("a batch of heads", (ctx.integer(1, 3), ctx.integer(1, 3), ctx.integer(2, 6),
                                               ctx.integer(2, 9)))):
        scores = ctx.randn(*shape, scale=2.0).requires_grad_(True)
        probs = scores.softmax(dim=-1)
        grad_probs = ctx.randn(*shape)
        (expected,) = torch.autograd.grad((probs * grad_probs).sum(), scores)   # autograd is the reference
        p, g = probs.detach(), grad_probs
        mistakes = {
            "your gradient is probs·grad_probs: the softmax couples the entries of a row, subtract "
            "Σ_j grad_j·probs_j first": p * g,
            "your gradient sums over the wrong axis: the coupling runs along the last (key) axis":
                p * (g - (g * p).sum(dim=0, keepdim=True)) if p.dim() > 1 else None,
        }
        with ctx.case(f"{label} {tuple(shape)}"):
            ctx.expect_close(ctx.call(p, g), expected, what="gradient of the scores",
                             mistakes={k: v for k, v in mistakes.items() if v is not None})


TASKS = [
    Task("scaled_dot_product_attention", "(q, k, v, mask=None)",
         "Attention for batches of heads: q is [B, h, n, d], k and v are [B, h, m, d]; return softmax(q·kᵀ/√d)·v "
         "of shape [B, h, n, d], the softmax taken over the m keys. `mask` is None or a boolean tensor that "
         "broadcasts to [B, h, n, m], True where a query may look at a key; masked scores are replaced by the most "
         "negative float (torch.finfo(dtype).min) before the softmax.",
         check_attention,
         "random batch, head, token and head sizes; self-attention (n = m) and cross-attention (n ≠ m); a causal "
         "[n, n] mask and a [B, 1, 1, m] padding mask.",
         level="warm-up", minutes=15,
             forbidden=(
            "torch.nn.functional.scaled_dot_product_attention",
            "torch._C._nn.scaled_dot_product_attention",
            "minisd.attention.attention_math",
            "minisd.attention._attention",
        ),
             allowed="matrix products, softmax, masked_fill, torch.finfo, math.sqrt; not "
        "F.scaled_dot_product_attention (PyTorch's fused kernel) or minisd.attention's own "
        "functions."),
    Task("MultiHeadAttention", "(query_dim, heads, head_dim, context_dim=None)",
         "A multi-head attention layer, an nn.Module with four nn.Linear submodules named to_q, to_k, to_v (no "
         "bias, query_dim or context_dim → heads·head_dim) and to_out (heads·head_dim → query_dim, with bias). "
         "forward(x, context=None): queries from x [B, n, query_dim], keys and values from context [B, m, "
         "context_dim] (or from x when context is None), split into heads (head r holds channels r·head_dim … "
         "(r+1)·head_dim − 1), attention per head, heads merged back, then to_out.",
         check_multi_head_attention,
         "self- and cross-attention layers of random sizes loaded with minisd's Attention weights by name.",
         level="core", minutes=35,
         allowed="your scaled_dot_product_attention (or minisd.attention.attention_math), nn.Linear, "
                 "einops.rearrange. Not minisd.attention.Attention."),
    Task("softmax_backward", "(probs, grad_probs)",
         "The backward pass of softmax over the last axis: given probs = softmax(scores) and the gradient of a loss "
         "with respect to probs, return the gradient with respect to the scores (same shape). Derive it from "
         "∂probs_i/∂scores_j.",
         check_softmax_backward,
         "random rows and batches of heads, against torch.autograd.",
         level="stretch", minutes=25, allowed="torch tensor arithmetic; no autograd."),

]
