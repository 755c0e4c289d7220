"""The denoising UNet: ε_θ(x_t, t, c), the network Stable Diffusion trains.

    x_t [B, 4, h, w] ──conv_in──► down levels ──► middle ──► up levels ──conv_out──► ε̂ (or v̂) [B,
    4, h, w]
                                      │ skips ─────────────────▲  (torch.cat([h, skip]), h first)

Each down level is `num_res_blocks` × (ResnetBlock → SpatialTransformer if the level attends) then a
stride-2 Downsample (not on the last level). Each up level mirrors it with one more ResnetBlock,
each consuming one skip, then a nearest-neighbour Upsample (not on the last). The middle is
ResnetBlock → SpatialTransformer → ResnetBlock. The timestep enters every ResnetBlock; the text
context enters every SpatialTransformer through cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_divisible, check_tensor
from .resnet import Downsample, ResnetBlock, TimestepMLP, Upsample, timestep_embedding
from .transformer import SpatialTransformer


@dataclass
class UNetConfig:
    in_channels: int = 4                 # 9 for inpainting: latents + mask + masked-image latents
    out_channels: int = 4
    channels: int = 320                  # width of the first level
    channel_mult: tuple = (1, 2, 4, 4)   # width of level i = channels · channel_mult[i]
    num_res_blocks: int = 2
    attention_levels: tuple = (True, True, True, False)
    num_heads: Optional[int] = 8         # SD 1.x: 8 heads at every level ...
    # ... SD 2.x: 64-dim heads, so the head count grows with the width
    head_dim: Optional[int] = None
    context_dim: int = 768
    transformer_depth: int = 1
    # SD 2.x projects in/out of the transformer with Linear, SD 1.x with 1×1 conv
    linear_projection: bool = False
    groups: int = 32

    def heads_at(self, width: int) -> tuple[int, int]:
        """(heads, head_dim) for a level of this width."""
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                "UNetConfig needs exactly one of num_heads (SD 1.x) and head_dim (SD 2.x)"
            )
        if self.num_heads is not None:
            return self.num_heads, width // self.num_heads
        return width // self.head_dim, self.head_dim


class UNetLevel(nn.Module):
    """One resolution of the UNet: ResNet blocks, optional transformers, and the resampling layer
    that follows."""

    def __init__(self, resnets: list, attentions: list, resample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty on levels without attention
        self.resample = resample


class MiddleBlock(nn.Module):
    def __init__(self, width: int, time_dim: int, cfg: UNetConfig):
        super().__init__()
        heads, head_dim = cfg.heads_at(width)
        self.resnet1 = ResnetBlock(width, width, time_dim, cfg.groups)
        self.attention = SpatialTransformer(
            width,
            heads,
            head_dim,
            cfg.context_dim,
            cfg.transformer_depth,
            cfg.linear_projection,
            cfg.groups,
        )
        self.resnet2 = ResnetBlock(width, width, time_dim, cfg.groups)

    def forward(self, h, t_emb, context):
        return self.resnet2(self.attention(self.resnet1(h, t_emb), context), t_emb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        base, time_dim, n_levels = cfg.channels, 4 * cfg.channels, len(cfg.channel_mult)
        if len(cfg.attention_levels) != n_levels:
            raise ValueError(
                f"attention_levels has {len(cfg.attention_levels)} entries, "
                f"channel_mult has {n_levels}"
            )

        def transformer(width):
            heads, head_dim = cfg.heads_at(width)
            return SpatialTransformer(
                width,
                heads,
                head_dim,
                cfg.context_dim,
                cfg.transformer_depth,
                cfg.linear_projection,
                cfg.groups,
            )

        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.time_mlp = TimestepMLP(base, time_dim)

        # Going down, remember the width of every tensor pushed on the skip stack: the up path pops
        # them in reverse.
        skip_widths, width, self.down_levels = [base], base, nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            resnets, attentions = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(ResnetBlock(width, base * mult, time_dim, cfg.groups))
                width = base * mult
                if cfg.attention_levels[level]:
                    attentions.append(transformer(width))
                skip_widths.append(width)
            is_last = level == n_levels - 1
            self.down_levels.append(
                UNetLevel(resnets, attentions, None if is_last else Downsample(width))
            )
            if not is_last:
                skip_widths.append(width)

        self.middle = MiddleBlock(width, time_dim, cfg)

        self.up_levels = nn.ModuleList()
        for level in reversed(range(n_levels)):
            resnets, attentions = [], []
            for _ in range(cfg.num_res_blocks + 1):
                out_width = base * cfg.channel_mult[level]
                resnets.append(
                    ResnetBlock(width + skip_widths.pop(), out_width, time_dim, cfg.groups)
                )
                width = out_width
                if cfg.attention_levels[level]:
                    attentions.append(transformer(width))
            self.up_levels.append(
                UNetLevel(resnets, attentions, Upsample(width) if level > 0 else None)
            )

        self.norm_out = nn.GroupNorm(cfg.groups, width, eps=1e-5)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, timesteps: Union[torch.Tensor, int, float], context: torch.Tensor
    ) -> torch.Tensor:
        """x [B, in_channels, h, w], timesteps [B] (or one number), context [B, 77, context_dim] ->
        [B, out_channels, h, w]."""
        cfg = self.cfg
        check_tensor("UNet input x", x, 4, "[B, C, H, W]", cfg.in_channels)
        check_divisible("UNet input x", x, 2 ** (len(cfg.channel_mult) - 1))
        check_tensor(
            "UNet context", context, 3, "[B, tokens, context_dim]", cfg.context_dim, channel_dim=2
        )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"UNet context batch {context.shape[0]} differs from x batch {x.shape[0]}"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim > 1 or (
            timesteps.ndim == 1 and timesteps.shape[0] not in (1, x.shape[0])
        ):
            raise ValueError(
                f"timesteps must be a number or have shape [{x.shape[0]}], "
                f"got {tuple(timesteps.shape)}"
            )
        timesteps = timesteps.reshape(-1).expand(x.shape[0])

        t_emb = self.time_mlp(timestep_embedding(timesteps, cfg.channels).to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_levels:
            for i, resnet in enumerate(level.resnets):
                h = resnet(h, t_emb)
                if level.attentions:
                    h = level.attentions[i](h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.middle(h, t_emb, context)

        for level in self.up_levels:
            for i, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), t_emb)
                if level.attentions:
                    h = level.attentions[i](h, context)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
