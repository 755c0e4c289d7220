"""Scaled dot-product attention, written out.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V                       (Vaswani et al., 2017, eq. 1)

with Q = x W_q, K = c W_k, V = c W_v. Self-attention takes c = x; cross-attention takes c = the text
embedding, which is how the prompt steers the image. Heads split the channels into `heads` groups of
`head_dim` and attend independently; the outputs are concatenated and projected by W_o.

Dividing by √d keeps the logits' variance near 1 when q and k have unit-variance entries (a dot
product of d such terms has variance d); without it softmax saturates and its gradients vanish.

The readable path below (`math`) is the default. `fused` calls torch's scaled_dot_product_attention,
which computes the same function in one kernel without storing the [tokens × tokens] matrix; tests
check the two agree.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import nn

_BACKENDS = ("math", "fused")
_backend = "math"
_slice_size: Optional[int] = None


def set_attention_backend(name: str) -> None:
    """Choose how every Attention module computes softmax(QKᵀ/√d)V: 'math' (readable, default) or
    'fused'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {_BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def set_attention_slicing(slice_size: Optional[int]) -> None:
    """Compute attention for `slice_size` (batch·head) rows at a time, to save memory on small GPUs;
    None = all at once."""
    global _slice_size
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"attention slice size must be >= 1 or None, got {slice_size}")
    _slice_size = slice_size


@contextlib.contextmanager
def attention_backend(name: str):
    """`with attention_backend('fused'): ...` switches the backend for a block of code."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def causal_mask(n: int, device=None) -> torch.Tensor:
    """Boolean [n, n] mask, True where query i may look at key j (j ≤ i): the text encoder reads
    left to right."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def attention_math(
    q, k, v, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d)V for q [B, h, n, d], k and v [B, h, m, d]; returns (output, attention
    probabilities)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", probs, v), probs


def _attention(q, k, v, mask=None) -> torch.Tensor:
    if _backend == "fused":
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if _slice_size is None:
        return attention_math(q, k, v, mask)[0]
    # Attention slicing: the [n × m] score matrix is built for a few (batch, head) pairs at a time.
    b, h = q.shape[:2]
    q2, k2, v2 = (rearrange(t, "b h n d -> (b h) 1 n d") for t in (q, k, v))
    out = torch.cat(
        [
            attention_math(
                q2[i : i + _slice_size], k2[i : i + _slice_size], v2[i : i + _slice_size], mask
            )[0]
            for i in range(0, b * h, _slice_size)
        ]
    )
    return rearrange(out, "(b h) 1 n d -> b h n d", b=b, h=h)


class Attention(nn.Module):
    """Multi-head attention over tokens [B, n, query_dim], optionally attending to a context [B, m,
    context_dim].

    Used three ways in Stable Diffusion: self-attention and cross-attention in the UNet (no q/k/v
    bias), the text encoder's causal self-attention (with biases), and the VAE's one-head attention
    over 512 channels.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: Optional[int] = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.is_cross = context_dim is not None
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)
        # Chapters set this to a function(probs [B, heads, n, m]) to look at attention maps (math
        # backend only).
        self.probs_hook: Optional[Callable[[torch.Tensor], None]] = None

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if self.probs_hook is not None:
            out, probs = attention_math(q, k, v, mask)
            self.probs_hook(probs)
        else:
            out = _attention(q, k, v, mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
