"""Model configurations as dataclasses, and the presets for the architectures minisd knows.

A `SDConfig` holds everything needed to rebuild a model from its weights: the three networks'
shapes, the noise schedule, what the UNet predicts (ε or v) and the latent scale. It is stored as
JSON inside every minisd file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .card import ModelCard
from .clip import TextEncoderConfig
from .checks import check_choice
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES
from .unet import UNetConfig
from .vae import VAEConfig

# SD's latent scale: 1 / (the standard deviation of its VAE's latents), measured by CompVis
SD_LATENT_SCALE = 0.18215
# OpenCLIP ViT-H/14's layers: the official SD 2 code builds all of them and runs all but the last
OPENCLIP_LAYERS = 24
# the tiny model trained by minisd itself (`bundled()`): the default of `python -m minisd generate`
BUNDLED_MODEL = Path(__file__).parent / "assets" / "bundled.safetensors"


@dataclass
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # what the UNet outputs: "epsilon" (ε) or "v_prediction" (v)
    prediction_type: str = "epsilon"
    latent_scale: float = SD_LATENT_SCALE  # the diffusion model sees latent_scale · z
    beta_schedule: str = "scaled_linear"   # β_t = (linspace(√β_start, √β_end, T))²
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # the resolution the model was trained at: generate's default height/width
    image_size: int = 512
    name: str = "custom"
    # default sampling settings and vocabulary (card.py); files older than the card get SD's usual
    card: ModelCard = field(default_factory=ModelCard)

    def __post_init__(self):
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"the UNet cross-attends to context_dim={self.unet.context_dim} but the text "
                f"encoder produces width={self.text.width}"
            )
        if self.unet.out_channels != self.vae.latent_channels:
            raise ValueError(
                f"the UNet predicts {self.unet.out_channels} channels but the VAE has "
                f"{self.vae.latent_channels} latent channels"
            )

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SDConfig":
        data = json.loads(text)

        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(
                    f"unknown {kind.__name__} fields in stored config: {sorted(unknown)}"
                )
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            unet=build(UNetConfig, data.pop("unet")),
            vae=build(VAEConfig, data.pop("vae")),
            text=build(TextEncoderConfig, data.pop("text")),
            card=build(ModelCard, data.pop("card", {})),
            **data,
        )


# Presets: every one is `name(**overrides) -> SDConfig`; overrides replace SDConfig fields.


def sd1(**overrides) -> SDConfig:
    """Stable Diffusion 1.x (v1-inference.yaml): CLIP ViT-L/14, 8 heads, 1×1-conv projections,
    ε-prediction."""
    return SDConfig(**{"name": "sd1", **overrides})


def sd1_inpaint(**overrides) -> SDConfig:
    """SD 1.5 inpainting: the UNet also reads the mask and the masked image's latents (4 + 1 + 4
    channels)."""
    return sd1(**{"unet": UNetConfig(in_channels=9), "name": "sd1-inpainting", **overrides})


def _sd2_networks() -> dict:
    """SD 2's networks: OpenCLIP ViT-H/14 (23 of its 24 layers run), 64-dim heads, linear
    projections."""
    return dict(
        unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, linear_projection=True),
        text=TextEncoderConfig(
            width=1024,
            layers=OPENCLIP_LAYERS,
            heads=16,
            activation="gelu",
            use_layers=OPENCLIP_LAYERS - 1,
            pad_token_id=0,
        ),
    )


def sd2(**overrides) -> SDConfig:
    """Stable Diffusion 2.x 768-v (v2-inference-v.yaml): v-prediction at 768².
    `sd2(prediction_type="epsilon")` gives `sd2_base()`."""
    if overrides.get("prediction_type") == "epsilon":
        return sd2_base(**overrides)
    values = dict(prediction_type="v_prediction", image_size=768, name="sd2")
    return SDConfig(**{**_sd2_networks(), **values, **overrides})


def sd2_base(**overrides) -> SDConfig:
    """Stable Diffusion 2.x-base (v2-inference.yaml): SD 2's networks, ε-prediction at 512²."""
    values = dict(prediction_type="epsilon", image_size=512, name="sd2-base")
    return SDConfig(**{**_sd2_networks(), **values, **overrides})


def tiny(**overrides) -> SDConfig:
    """A few-megabyte model with every feature of the real ones, for tests and CPU experiments."""
    values = dict(
        unet=UNetConfig(
            channels=32,
            channel_mult=(1, 2, 2),
            attention_levels=(True, True, False),
            num_heads=2,
            context_dim=32,
        ),
        vae=VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1),
        text=TextEncoderConfig(width=32, layers=2, heads=4),
        image_size=32,
        name="tiny",
    )
    return SDConfig(**{**values, **overrides})


def bundled(**overrides) -> SDConfig:
    """The model shipped in minisd/assets/bundled.safetensors: 32×32 coloured shapes, trained from
    scratch.

    Same three networks as SD, shrunk: a VAE with downscale 4 (32×32×3 -> 8×8×4 latents), a
    two-level UNet with attention at both levels, a 3-layer CLIP-architecture text encoder of width
    64 over CLIP's real 49,408-token vocabulary, v-prediction. latent_scale is measured after
    training the VAE (1 / std of its latents).
    """
    values = dict(
        unet=UNetConfig(
            channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(True, True),
            num_heads=4,
            context_dim=64,
        ),
        vae=VAEConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
        text=TextEncoderConfig(width=64, layers=3, heads=4),
        prediction_type="v_prediction",
        image_size=32,
        name="bundled",
    )
    return SDConfig(**{**values, **overrides})


def bundled_cpu(**overrides) -> SDConfig:
    """The reduced configuration that trains on a 2-core CPU in under 10 minutes (README model card,
    chapter 11).

    The bundled model with a UNet of half the width (channels 32 instead of 64): about a third of
    the compute per step, so a short CPU run sees more examples. Same VAE and text encoder as
    `bundled`.
    """
    values = dict(
        unet=UNetConfig(
            channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(True, True),
            num_heads=4,
            context_dim=64,
        ),
        name="bundled-cpu",
    )
    return bundled(**{**values, **overrides})


PRESETS = {
    "sd1": sd1,
    "sd1-inpainting": sd1_inpaint,
    "sd2": sd2,
    "sd2-base": sd2_base,
    "tiny": tiny,
    "bundled": bundled,
    "bundled-cpu": bundled_cpu,
}
