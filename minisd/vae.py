"""The variational autoencoder that moves diffusion from pixels to latents (Rombach et al. 2022,
§3).

Encoder E: image x [B, 3, H, W] in [-1, 1] -> (μ, log σ²) [B, 4, H/8, W/8]: a diagonal Gaussian
posterior q(z|x).
    z = μ + σ ⊙ ε, ε ~ N(0, I)        (reparameterisation: gradients flow through μ and σ)
    KL(q(z|x) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)
Decoder D: z -> x̂ [B, 3, H, W]. log σ² is clamped to [−30, 20] as the original code does, to keep
exp finite.

The diffusion model never sees z directly: it sees 0.18215 · z, a constant chosen so the latents of
the training images have roughly unit variance (the `latent_scale` in the model config).
`encode`/`decode` here work in the unscaled space; the pipeline multiplies and divides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .attention import Attention
from .checks import check_divisible, check_tensor
from .resnet import Downsample, ResnetBlock, Upsample

VAE_EPS = 1e-6  # every GroupNorm in the VAE


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    groups: int = 32


class DiagonalGaussian:
    """q(z|x) = N(μ, diag σ²), from the encoder's 2·latent_channels output (μ first, then log
    σ²)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Drawn where the generator lives (a CPU generator gives the same noise on any device), then
        # moved.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=torch.float32
        )
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class VAEAttention(nn.Module):
    """One head of self-attention over all H·W positions, 512 channels wide, with a residual
    connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=VAE_EPS)
        self.attention = Attention(channels, heads=1, head_dim=channels, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        return x + rearrange(self.attention(tokens), "b (h w) c -> b c h w", h=height, w=width)


class VAEMiddle(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.resnet1 = ResnetBlock(width, width, None, groups, VAE_EPS)
        self.attention = VAEAttention(width, groups)
        self.resnet2 = ResnetBlock(width, width, None, groups, VAE_EPS)

    def forward(self, h):
        return self.resnet2(self.attention(self.resnet1(h)))


class VAELevel(nn.Module):
    def __init__(self, resnets: list, resample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resample = resample

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return h if self.resample is None else self.resample(h)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        width = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, width, 3, padding=1)
        self.levels = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            resnets = []
            for _ in range(cfg.num_res_blocks):
                resnets.append(ResnetBlock(width, cfg.channels * mult, None, cfg.groups, VAE_EPS))
                width = cfg.channels * mult
            is_last = level == len(cfg.channel_mult) - 1
            self.levels.append(
                VAELevel(resnets, None if is_last else Downsample(width, asymmetric_padding=True))
            )
        self.middle = VAEMiddle(width, cfg.groups)
        self.norm_out = nn.GroupNorm(cfg.groups, width, eps=VAE_EPS)
        self.conv_out = nn.Conv2d(width, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.middle(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        width = cfg.channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, width, 3, padding=1)
        self.middle = VAEMiddle(width, cfg.groups)
        self.levels = nn.ModuleList()  # deepest level first, in the order the decoder runs them
        for level in reversed(range(len(cfg.channel_mult))):
            resnets = []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(
                    ResnetBlock(
                        width, cfg.channels * cfg.channel_mult[level], None, cfg.groups, VAE_EPS
                    )
                )
                width = cfg.channels * cfg.channel_mult[level]
            self.levels.append(VAELevel(resnets, Upsample(width) if level > 0 else None))
        self.norm_out = nn.GroupNorm(cfg.groups, width, eps=VAE_EPS)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.middle(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        check_tensor("VAE encode images", images, 4, "[B, 3, H, W]", self.cfg.in_channels)
        check_divisible("VAE encode images", images, self.downscale)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1] (not
        clamped)."""
        check_tensor(
            "VAE decode latents", latents, 4, "[B, latent_channels, h, w]", self.cfg.latent_channels
        )
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior
