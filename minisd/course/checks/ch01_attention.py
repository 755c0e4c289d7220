"""Chapter 01 (attention): scaled dot-product attention with an optional boolean mask."""
from __future__ import annotations

import math

import torch

from minisd.attention import attention_math, causal_mask

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
        f"your output equals softmax(q·kᵀ)·v without the scale: did you forget to divide the scores by √d "
        f"(here √{d} ≈ {math.sqrt(d):.3g})?": lambda: attend(_scores(q, k)),
        "your output equals softmax(q·kᵀ/d)·v: the scale is 1/√d, not 1/d": lambda: attend(_scores(q, k) / d),
        "your output equals softmax(q·kᵀ·√d)·v: divide by √d instead of multiplying":
            lambda: attend(_scores(q, k) * math.sqrt(d)),
    }
    if q.shape[-2] == k.shape[-2]:
        options["your softmax runs over the queries (dim −2); it should run over the keys (the last dim)"] = \
            lambda: attend(_scores(q, k) / math.sqrt(d), dim=-2)
    if mask is not None:
        options["your output ignores the mask"] = lambda: attend(_scores(q, k) / math.sqrt(d), use_mask=None)
        options["your mask works the wrong way round: scores are removed where the mask is False, kept where True"] = \
            lambda: attend(_scores(q, k) / math.sqrt(d), invert=True)
    return options


def check_attention(ctx):
    def inputs(n, m):
        batch, heads, d = ctx.integer(1, 3), ctx.integer(1, 4), ctx.choice([4, 8, 16, 32])
        return (ctx.randn(batch, heads, n, d), ctx.randn(batch, heads, m, d), ctx.randn(batch, heads, m, d))

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
    run(f"cross-attention, {n} queries and {m} keys (q {tuple(q.shape)}, k {tuple(k.shape)})", q, k, v)
    n = ctx.integer(3, 9)
    run(f"a causal mask of shape [{n}, {n}]", *inputs(n, n), mask=causal_mask(n))
    q, k, v = inputs(ctx.integer(2, 7), ctx.integer(3, 9))
    batch, m = q.shape[0], k.shape[-2]
    keep = ctx.rand(batch, 1, 1, m) < 0.6
    keep[..., 0] = True  # every query keeps at least one key
    run(f"a padding mask of shape {tuple(keep.shape)}", q, k, v, mask=keep)


TASKS = [
    Task("scaled_dot_product_attention", "(q, k, v, mask=None)",
         "Attention for batches of heads: q is [B, h, n, d], k and v are [B, h, m, d]; return softmax(q·kᵀ/√d)·v "
         "of shape [B, h, n, d], the softmax taken over the m keys. `mask` is None or a boolean tensor that "
         "broadcasts to [B, h, n, m], True where a query may look at a key; masked scores are replaced by the most "
         "negative float (torch.finfo(dtype).min) before the softmax.",
         check_attention,
         "random batch, head, token and head sizes; self-attention (n = m) and cross-attention (n ≠ m); a causal "
         "[n, n] mask and a [B, 1, 1, m] padding mask."),
]
