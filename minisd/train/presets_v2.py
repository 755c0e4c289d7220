"""Model presets for the v2 scenes world (64×64 images): the bundled model v2 and its CPU recipe.

The same three networks as Stable Diffusion, shrunk to the world:
    VAE          f = 4: 64×64×3 images <-> 16×16×4 latents (two downsamplings), so the UNet's
                 cross-attention maps are 16×16 at its first level
    UNet         three levels over 16×16, 8×8, 4×4 latents, attention at the first two
    text encoder a CLIP-architecture transformer over CLIP's real 49,408-token vocabulary
    v-prediction, SD's scaled-linear schedule; latent_scale is measured after training the VAE.

Budget (issue #16): the file ≤ 25 MB, a 50-step guided 64×64 image ≤ 2 s on 2 CPU cores. The token
embedding dominates the file (49,408 × width numbers), so the text encoder stays narrow and the
file is written in float16 (`python -m minisd train --save-dtype float16`). Measured figures are
in `tests/test_scenes.py::test_v2_preset_budget` and the report of the commit that chose them.

These live in the training wing, not in `minisd/config.py`: `training.resolve_config` merges them
into the presets that `--preset` accepts.
"""

from __future__ import annotations

from ..clip import TextEncoderConfig
from ..config import SDConfig
from ..unet import UNetConfig
from ..vae import VAEConfig

IMAGE_SIZE = 64


def bundled_v2(**overrides) -> SDConfig:
    """The bundled model v2: 64×64 scenes, 16×16×4 latents, attention at 16×16 and 8×8."""
    values = dict(
        unet=UNetConfig(
            channels=64,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_levels=(True, True, False),
            num_heads=4,
            context_dim=96,
        ),
        vae=VAEConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
        text=TextEncoderConfig(width=96, layers=4, heads=4),
        prediction_type="v_prediction",
        image_size=IMAGE_SIZE,
        name="bundled-v2",
    )
    values.update(overrides)
    return SDConfig(**values)


def bundled_v2_cpu(**overrides) -> SDConfig:
    """The reduced recipe a student trains on a laptop CPU: v2 with a UNet of half the width."""
    values = dict(
        unet=UNetConfig(
            channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_levels=(True, True, False),
            num_heads=4,
            context_dim=96,
        ),
        name="bundled-v2-cpu",
    )
    values.update(overrides)
    return bundled_v2(**values)


PRESETS_V2 = {"bundled-v2": bundled_v2, "bundled-v2-cpu": bundled_v2_cpu}
