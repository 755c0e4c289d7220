"""The Stable Diffusion model: tokenizer, text encoder, UNet, VAE and config in one object.

    sd.tokenizer(prompts) -> ids [B, 77];  sd.text_encoder(ids) -> context [B, 77, D]
    sd.unet(x_t, t, context) -> ε̂ or v̂;   sd.vae.encode(images) / sd.vae.decode(latents)
    sd.generate(prompt, ...) -> images (pipeline.py)

Its file format (save, load, conversion from official checkpoints) lives in `minisd/weights/`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import pipeline
from .clip import CLIPTextEncoder
from .config import SDConfig
from .tokenizer import CLIPTokenizer, family_of
from .unet import UNet
from .vae import AutoencoderKL


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig):
        super().__init__()
        self.config = config
        self.text_encoder = CLIPTextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.extras: dict[str, torch.Tensor] = {}
        self._tokenizer = None

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:  # built on first use: reading the vocabulary takes ~0.1 s
            self._tokenizer = CLIPTokenizer(
                pad_token_id=self.config.text.pad_token_id, family=family_of(self.config.text)
            )
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def generate(self, *args, **kwargs):
        """Text to image (and img2img, inpainting): see `minisd.pipeline.generate`."""
        return pipeline.generate(self, *args, **kwargs)

    def generate_steps(self, *args, **kwargs):
        """The denoising loop one step at a time: see `minisd.pipeline.denoise_steps`."""
        return pipeline.denoise_steps(self, *args, **kwargs)
