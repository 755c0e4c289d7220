"""The CLIP text encoder: token ids [B, 77] -> one context vector per token [B, 77, width] for
cross-attention.

    h⁰ = TokenEmbedding(ids) + PositionEmbedding(0 … 76)
    hˡ = hˡ⁻¹ + CausalSelfAttention(LayerNorm(hˡ⁻¹))          # token i sees tokens 0 … i only
    hˡ = hˡ  + MLP(LayerNorm(hˡ)),   MLP(x) = W₂ act(W₁ x)
    context = LayerNorm_final(h^L)

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower: 12 layers, width 768, act = quick-GELU x·σ(1.702x),
output of the last layer. SD 2.x uses OpenCLIP ViT-H/14: 24 layers, width 1024, exact GELU, and
takes the output of layer 23 (the penultimate) before the final LayerNorm — `use_layers=23`. The
weights of layer 24 are kept so that official files round-trip, but it is never run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .attention import Attention, causal_mask
from .checks import check_tensor


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    activation: str = "quick_gelu"
    # run only the first `use_layers` layers; None = all. SD 2.x: 23 of 24
    use_layers: Optional[int] = None
    pad_token_id: int = 49407           # SD 1.x pads prompts with end-of-text, SD 2.x with 0


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702x): the sigmoid approximation of GELU that OpenAI trained CLIP with."""
    return x * torch.sigmoid(1.702 * x)


class TextEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.activation not in ("quick_gelu", "gelu"):
            raise ValueError(
                f"unknown activation {cfg.activation!r}; choose 'quick_gelu' or 'gelu'"
            )
        self.activation = quick_gelu if cfg.activation == "quick_gelu" else F.gelu
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.attn = Attention(cfg.width, cfg.heads, cfg.width // cfg.heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), mask=mask)
        return h + self.fc2(self.activation(self.fc1(self.norm2(h))))


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        self.layers = nn.ModuleList(TextEncoderLayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, n ≤ 77] (LongTensor) -> context [B, n, width]."""
        check_tensor("text encoder ids", ids, 2, "[B, tokens]")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"text encoder ids must be an integer tensor (token ids), got {ids.dtype}"
            )
        n = ids.shape[1]
        if n > self.cfg.max_length:
            raise ValueError(f"text encoder takes at most {self.cfg.max_length} tokens, got {n}")
        # Reading the range back is a host sync (and a graph break under torch.compile): one read,
        # never when compiling.
        if ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(ids)).tolist()
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.cfg.vocab_size}), got min {low}, max {high}"
                )
        positions = torch.arange(n, device=ids.device)
        h = self.token_embedding(ids) + self.position_embedding(positions)
        mask = causal_mask(n, device=ids.device)
        for layer in self.layers[: self.cfg.use_layers]:
            h = layer(h, mask)
        return self.final_norm(h)
