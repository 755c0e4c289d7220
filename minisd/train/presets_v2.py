"""Model presets for the v2 scenes world (64×64 images): the bundled model v2 and its CPU recipe.

The same three networks as Stable Diffusion, shrunk to the world:
    VAE          f = 4: 64×64×3 images <-> 16×16×4 latents (two downsamplings), so the UNet's
                 cross-attention maps are 16×16 at its first level
    UNet         three levels over 16×16, 8×8, 4×4 latents, attention at the first two
    text encoder a CLIP-architecture transformer over CLIP's real 49,408-token vocabulary
    v-prediction, SD's scaled-linear schedule; latent_scale is measured after training the VAE.

Budget (issue #16): the file ≤ 25 MB, a 50-step guided 64×64 image ≤ 2 s on 2 CPU cores. The token
embedding dominates the file (49,408 × width numbers), so the text encoder stays narrow and the
file is written in float16 (`python -m minisd train --save-dtype float16`;
`tests/test_scenes.py::test_v2_presets_fit_the_budget` checks the size).

Measured with random weights, torch 2.11, fp32, `torch.set_num_threads(2)` under `taskset -c 0,1`
on an otherwise idle 16-core Intel Xeon (the GPU machine's host CPU), 50 DDIM steps with guidance,
median of 5 (2026-11-27):
    UNet width    file (fp16)   s / image    parameters (UNet + VAE + text)
    64 (1,2,2)    24.1 MB       2.03         5.88 M + 0.95 M + 5.20 M     over the time budget
    48 (1,2,2)    19.0 MB       1.49         3.34 M + 0.95 M + 5.20 M     bundled-v2
    32 (1,2,4)    18.8 MB       1.18         3.19 M + 0.95 M + 5.20 M
    32 (1,2,2)    15.4 MB       1.00         1.51 M + 0.95 M + 5.20 M     bundled-v2-cpu
    v1 bundled    17.0 MB       0.77         (32×32 images, for comparison)
(those rows have a VAE of width 32; bundled-v2's VAE of width 48 adds 1.18 M parameters, 2.4 MB,
and 1.6 GFLOP to the one decode per image, against 50 × 1.0 GFLOP of UNet work: 21.4 MB, and
about 1.55 s by that count, not yet timed on an idle machine.)

The VAE's width was chosen by its round trip: decode(encode(x)) of 300 validation scenes scored
by `scene_detector` against their full descriptions (`python -m minisd.train.evaluate_scenes
vae.safetensors --vae-only --count 300`), each VAE trained from scratch on an H100 with
`train-vae --dataset scenes --batch-size 128 --pool-size 20000`, three runs sharing the GPU:
    width 32    2,500 steps (100 s alone)   41% (150 scenes)
    width 32    5,000 steps (385 s)         74.3%
    width 48    4,000 steps (391 s)         95.7%     bundled-v2
    width 64    3,000 steps (364 s)         91.0%
All 13 scenes the width-48 VAE fails hold a small star (side 10 px) that comes back as a
pentagon-like blob, which the detector reads as a circle: train longer, or make "small" larger.
A first LDM run on the width-32 VAE (2,200 steps of batch 256, 237 s, --snr-gamma 5) drew the
right backgrounds and roughly the right counts, but colour+shape fidelity stayed ≤ 12% at every
guidance scale: the model needs the better VAE and a much longer run (next session).

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
            channels=48,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_levels=(True, True, False),
            num_heads=4,
            context_dim=96,
            groups=16,  # 48 channels: GroupNorm of 16 groups of 3 (32 does not divide 48)
        ),
        # width 48, not v1's 32: at 64 px the 32-wide VAE blurs small stars and crosses (below)
        vae=VAEConfig(channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, groups=16),
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
