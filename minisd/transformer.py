"""The transformer block that lets text steer the image, and the spatial transformer that wraps it.

Per block (pre-LayerNorm, three residual sub-layers; x is the feature map flattened to H·W tokens):

    x = x + SelfAttention(LayerNorm(x))              # every pixel looks at every other pixel
    x = x + CrossAttention(LayerNorm(x), context)    # each pixel looks at the prompt's 77 tokens
    x = x + FeedForward(LayerNorm(x))

GEGLU feed-forward (Shazeer 2020): [a, g] = x W₁ (split in two halves, value first), out = (a ⊙
GELU(g)) W₂, with W₁: d → 8d and W₂: 4d → d and exact (erf) GELU.

Spatial transformer: out = x + proj_out(blocks(proj_in(GroupNorm(x)))), with the projections either
1×1 convs (SD 1.x) or linear layers on the tokens (SD 2.x). The two are the same function; only the
weight shapes differ.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .attention import Attention


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.geglu = GEGLU(dim, mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.geglu(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        linear_projection: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = (
                nn.Conv2d(channels, inner, 1),
                nn.Conv2d(inner, channels, 1),
            )
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context)
        if self.linear_projection:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height, w=width))
        return x + h
