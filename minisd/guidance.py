"""Classifier-free guidance, prompt composition and model ensembles: how one denoising prediction is
assembled.

Classifier-free guidance (Ho & Salimans 2022): run the UNet with the prompt (ε_c) and with the
negative / empty prompt (ε_u) and extrapolate away from the unconditional prediction,

    ε = ε_u + s · (ε_c − ε_u)          s = guidance_scale; s = 1 gives ε_c, s = 0 gives ε_u

Composition ("a cat AND a hat :0.5", prompts.py) guides every part i of a prompt separately and adds
the pushes:

    ε = ε_u + s · Σᵢ wᵢ (εᵢ − ε_u)

As diffusers does, the formula is applied to whatever the UNet predicts: ε, or v for v-prediction
models (it is linear, so guiding v and guiding ε are the same step). The UNet runs once per step on
one batch ordered [uncond rows of every image, then every part of every image]. When s = 1 and each
image's weights sum to 1, the formula reduces to Σᵢ wᵢ εᵢ and the unconditional rows are skipped
entirely (half the work for plain prompts).

Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
sec. 3.4, eq. 15-16): a large s inflates the guided prediction's spread; rescale it back to the
spread of the conditional prediction and mix, per image,

    x_rescaled = x_cfg · std(x_c) / std(x_cfg)                      (eq. 15)
    x_final    = φ · x_rescaled + (1 − φ) · x_cfg                   (eq. 16)   φ = guidance_rescale

with std over every dimension but the batch, Bessel-corrected (torch's default), exactly as
diffusers' `rescale_noise_cfg`. As there, x is the raw UNet output: v for v-prediction models (the
setting the paper proposes it for), ε otherwise. Why it is needed: with a zero-terminal-SNR
schedule the first step sees pure noise, and for v-prediction x̂₀ = −v there, so whatever CFG's
extrapolation adds to v lands in x̂₀ unscaled. The guided prediction's norm grows with s and the
image comes out over-exposed (too bright, over-saturated); eq. 15 pins its std to the
conditional one's, and eq. 16 keeps a share (1 − φ) of the unrescaled result because rescaling
alone looks plain (the paper uses φ = 0.7). φ = 0 is plain CFG. For composition, x_c is the
prediction at s = 1, ε_u + Σᵢ wᵢ (εᵢ − ε_u) (= ε_c for one part of weight 1). At s = 1 it is a
no-op (x_cfg = x_c); for s < 1 diffusers runs no guidance at all, minisd applies the equation.

Ensembles (ensemble.py) mix such predictions of several models per step: ε = Σₖ λₖ ε⁽ᵏ⁾.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .prompts import encode_prompts


@dataclass
class Conditioning:
    """Everything one model needs per step: the contexts of the UNet batch rows and how to combine
    the outputs."""

    # [R, 77, width]: B unconditional rows (when has_uncond) then one row per part
    context: torch.Tensor
    row_image: torch.Tensor  # [R] long: the image each row belongs to
    part_weights: torch.Tensor  # [P] float32: wᵢ of each part row
    ids: torch.Tensor  # [R, 77] token ids of each row (for attention maps)
    num_images: int
    has_uncond: bool

    @property
    def part_rows(self) -> torch.Tensor:
        """Indices (into the UNet batch) of the part rows."""
        start = self.num_images if self.has_uncond else 0
        return torch.arange(start, len(self.row_image), device=self.row_image.device)


def needs_uncond(parts: Sequence[Sequence[tuple[str, float]]], guidance_scale: float) -> bool:
    return not (guidance_scale == 1 and all(math.isclose(sum(w for _, w in p), 1.0) for p in parts))


def build_conditioning(
    sd,
    parts: Sequence[Sequence[tuple[str, float]]],
    negatives: Sequence[str],
    guidance_scale: float,
    weighting: bool = True,
) -> Conditioning:
    """parts[b] = [(text, weight), …] of image b; negatives[b] = its negative prompt."""
    has_uncond = needs_uncond(parts, guidance_scale)
    texts = list(negatives) if has_uncond else []
    row_image = list(range(len(parts))) if has_uncond else []
    weights = []
    for b, image_parts in enumerate(parts):
        for text, weight in image_parts:
            texts.append(text)
            row_image.append(b)
            weights.append(weight)
    context, ids = encode_prompts(sd, texts, weighting)
    return Conditioning(
        context,
        # on the model's device once, so that no step copies them from the host again
        torch.tensor(row_image, device=context.device),
        torch.tensor(weights, dtype=torch.float32, device=context.device),
        ids,
        len(parts),
        has_uncond,
    )


def rescale_guidance(
    guided: torch.Tensor, conditional: torch.Tensor, guidance_rescale: float
) -> torch.Tensor:
    """Lin et al. 2024 eq. 15-16: φ · x_cfg · std(x_c) / std(x_cfg) + (1 − φ) · x_cfg, with
    φ = guidance_rescale and the (Bessel-corrected) std of each batch item over all its other
    dimensions, as diffusers' rescale_noise_cfg. guided = x_cfg, conditional = x_c: [B, …]."""
    dims = list(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    rescaled = guided * ratio  # eq. 15: the guided prediction with the conditional one's spread
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided  # eq. 16


def combine(
    output: torch.Tensor, cond: Conditioning, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """UNet outputs of all rows [R, C, h, w] -> one guided prediction per image [B, C, h, w]
    (rescaled by eq. 15-16 when guidance_rescale > 0)."""
    owner = cond.row_image[cond.part_rows].to(output.device)
    w = cond.part_weights.to(output.device, output.dtype).reshape(-1, 1, 1, 1)
    parts = output[cond.part_rows.to(output.device)]
    shape = (cond.num_images, *output.shape[1:])
    if not cond.has_uncond:
        return torch.zeros(shape, dtype=output.dtype, device=output.device).index_add_(
            0, owner, w * parts
        )
    uncond = output[: cond.num_images]
    pushes = torch.zeros(shape, dtype=output.dtype, device=output.device).index_add_(
        0, owner, w * (parts - uncond[owner])
    )
    guided = uncond + guidance_scale * pushes
    if guidance_rescale == 0:
        return guided
    # x_c: the prediction without guidance (s = 1), ε_c itself for one part of weight 1
    return rescale_guidance(guided, uncond + pushes, guidance_rescale)


def guided_prediction(
    sd,
    latents: torch.Tensor,
    t: int,
    cond: Conditioning,
    guidance_scale: float,
    extra_channels: Optional[torch.Tensor] = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """One guided UNet prediction per image, in float32. latents [B, 4, h, w] float32;
    extra_channels [B, 5, h, w] (inpainting models: mask and masked-image latents) are appended to
    every row of the image they belong to; guidance_rescale φ as in the module docstring."""
    rows = cond.row_image.to(latents.device)
    unet_input = latents[rows]
    if extra_channels is not None:
        unet_input = torch.cat([unet_input, extra_channels[rows]], dim=1)
    # made on the device (a fill, not a copy from host memory, which would wait for the GPU);
    # σ-based samplers visit fractional timesteps (e.g. Karras sigmas): those stay fractional
    dtype = torch.long if isinstance(t, int) else torch.float32
    timestep = torch.full((1,), t, dtype=dtype, device=latents.device)
    output = sd.unet(unet_input.to(sd.dtype), timestep, cond.context).float()
    return combine(output, cond, guidance_scale, guidance_rescale)
