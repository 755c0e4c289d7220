"""minisd: Stable Diffusion 1.x and 2.x written out by hand, to read and to run.

    import minisd
    sd = minisd.load("model.safetensors")          # or an official checkpoint / diffusers folder
    image = sd.generate("a red circle on the left")

This file is the package's face: it gathers what a notebook needs from the book (the top of
minisd/) and from the wings (`weights/` for load and save, `tools/` for the fast path). The book
never imports a wing; the face may.
"""
from .attention import set_attention_backend
from .attention_maps import record_cross_attention
from .config import (
    BUNDLED_MODEL,
    PRESETS,
    SDConfig,
    bundled,
    bundled_cpu,
    sd1,
    sd1_inpaint,
    sd2,
    sd2_base,
    tiny,
)
from .ensemble import ModelEnsemble
from .model import StableDiffusion
from .pipeline import SamplingSettings, denoise_steps, generate
from .tools.fastpath import slow_down, speed_up
from .weights.convert import load
from .weights.minisd_file import from_state_dict, save

__all__ = [
    "BUNDLED_MODEL",
    "PRESETS",
    "ModelEnsemble",
    "SDConfig",
    "SamplingSettings",
    "StableDiffusion",
    "bundled",
    "bundled_cpu",
    "denoise_steps",
    "from_state_dict",
    "generate",
    "load",
    "record_cross_attention",
    "save",
    "sd1",
    "sd1_inpaint",
    "sd2",
    "sd2_base",
    "set_attention_backend",
    "slow_down",
    "speed_up",
    "tiny",
]
__version__ = "0.1.0"
