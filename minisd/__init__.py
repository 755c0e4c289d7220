"""minisd: Stable Diffusion 1.x and 2.x written out by hand, to read and to run.

    import minisd
    sd = minisd.load("model.safetensors")          # or an official checkpoint / diffusers folder
    image = sd.generate("a red circle on the left")
"""
from .config import SDConfig, sd1, sd1_inpaint, sd2, tiny, PRESETS
from .model import StableDiffusion, load, save

__all__ = [
    "SDConfig",
    "StableDiffusion",
    "load",
    "save",
    "sd1",
    "sd1_inpaint",
    "sd2",
    "tiny",
    "PRESETS",
]
__version__ = "0.1.0"
