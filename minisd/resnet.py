"""ResNet blocks, timestep embeddings, and the resampling layers shared by the UNet and the VAE.

ResNet block with time injection (Ho et al. 2020, after Wide ResNets):

    h = Conv(SiLU(GroupNorm(x)))
    h = h + Linear(SiLU(t_emb))            # the timestep shifts every channel of the feature map
    h = Conv(Dropout(SiLU(GroupNorm(h))))
    out = shortcut(x) + h                  # shortcut = identity, or a 1×1 conv when channels change

Sinusoidal timestep embedding (Vaswani et al. 2017, as used by DDPM), for i = 0 … d/2−1:

    ω_i = exp(−ln(10000) · i / (d/2)),    emb(t) = [cos(t·ω_0), …, cos(t·ω_{d/2−1}), sin(t·ω_0), …]

cos first, as the original Stable Diffusion code orders it (diffusers: flip_sin_to_cos=True,
freq_shift=0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """[B] timesteps (integers or floats) -> [B, dim] sinusoidal features, cos half first."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    angles = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """Linear(d → 4d), SiLU, Linear(4d → 4d): lets the network learn its own features of the
    sinusoidal embedding."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """The ResNet block above. `time_dim=None` gives the VAE's variant, which has no timestep
    input."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: Optional[int] = None,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels) if time_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, t_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3×3 conv.

    The UNet pads 1 on every side. The VAE encoder pads only right and bottom, (0, 1, 0, 1): padding
    both sides there would shift every decoded image by half a latent pixel (8 image pixels after
    three levels).
    """

    def __init__(self, channels: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(
            channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour copy, then a 3×3 conv to smooth the blocks."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
