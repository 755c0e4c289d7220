"""`python -m minisd generate "PROMPT" ...`: text to image (img2img with --init-image, inpainting
with --mask).

Every image is written as a PNG whose text metadata holds the prompt and every setting, including
its own seed (image i of a batch uses seed + i), so `--from-png IMAGE.png` regenerates it; flags
given next to --from-png override the stored ones. Nothing is written unless generation succeeds,
and files are written atomically.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent.parent / "assets" / "bundled.safetensors"
DTYPES = ("float32", "float16", "bfloat16")
# the sampler registry's names (minisd/samplers/__init__.py), listed here so `--help` needs no torch
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde")
# Defaults live here rather than in argparse, so that --from-png can tell a flag given from a flag
# left out.
DEFAULTS = dict(
    prompt=None,
    negative_prompt="",
    steps=50,
    guidance_scale=7.5,
    sampler="ddim",
    eta=0.0,
    karras=False,
    seed=None,
    height=None,
    width=None,
    init_image=None,
    strength=None,
    mask=None,
    model=None,
    template=None,
    prompt_weighting=True,
    batch=1,
    out="minisd.png",
    device="cpu",
    dtype="float32",
    lora=None,
)
STORED = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "sampler",
    "eta",
    "karras",
    "seed",
    "height",
    "width",
    "init_image",
    "strength",
    "mask",
    "model",
    "template",
    "prompt_weighting",
    "dtype",
    "lora",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "prompt",
        nargs="?",
        default=None,
        help='the prompt ("a cat AND a hat :0.5" composes, "(red:1.3)" emphasises)',
    )
    a("--negative-prompt", help="what to steer away from (default: empty)")
    a("--steps", type=int, help="sampling steps (default 50)")
    a(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance scale s >= 0 (default 7.5; 1 = no guidance)",
    )
    a("--sampler", choices=SAMPLER_NAMES, help="default ddim")
    a(
        "--karras",
        action="store_const",
        const=True,
        help="Karras et al. 2022 sigma spacing (euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde)",
    )
    a("--eta", type=float, help="DDIM noise in [0, 1] (default 0: deterministic)")
    a(
        "--seed",
        type=int,
        help="random seed (default: a random one, stored in the PNG); image i uses seed + i",
    )
    a(
        "--height",
        type=int,
        help="image height (default: the model's native size, or the init image's)",
    )
    a("--width", type=int, help="image width (same default)")
    a("--init-image", help="start from this image (img2img)")
    a(
        "--strength",
        type=float,
        help="how much of the init image to repaint, in [0, 1] (default 0.8; 1.0 with --mask)",
    )
    a("--mask", help="inpainting mask, same size as --init-image: white = repaint, black = keep")
    a(
        "--model",
        help="a minisd file, an official .ckpt/.safetensors or a diffusers folder (default: the bundled model)",
    )
    a(
        "--lora",
        help="a LoRA adapter (from `python -m minisd finetune`) to load on top of the model",
    )
    a("--template", help='wrap the prompt, e.g. "a photo of {}, detailed"')
    a(
        "--no-prompt-weighting",
        dest="prompt_weighting",
        action="store_const",
        const=False,
        help="read ( ) [ ] in the prompt literally",
    )
    a("--batch", type=int, help="number of images (default 1)")
    a(
        "--out",
        help="output PNG, or an existing folder (default minisd.png; a batch adds -0, -1, …)",
    )
    a("--device", help="cpu (default), cuda, cuda:1, …")
    a("--dtype", choices=DTYPES, help="default float32; float16 needs a GPU")
    a(
        "--from-png",
        help="take the settings stored in a PNG written by this command (other flags override them)",
    )
    a("--quiet", action="store_true", help="no progress bar")


def resolve_settings(args: argparse.Namespace) -> dict:
    stored = {}
    if args.from_png:
        from ..images import read_png_settings

        stored = {k: v for k, v in read_png_settings(args.from_png).items() if k in STORED}
    settings = {}
    for name, default in DEFAULTS.items():
        given = getattr(args, name, None)
        settings[name] = given if given is not None else stored.get(name, default)
    if settings["prompt"] is None:
        raise ValueError("give a prompt (or --from-png IMAGE)")
    return settings


def check_device(device_name: str, dtype_name: str):
    import torch

    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(
            f"--device {device_name!r} is not a device name (try cpu, cuda, cuda:0)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device_name}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device_name}: MPS is not available on this machine")
    if device.type == "cpu" and dtype_name == "float16":
        raise ValueError(
            "--dtype float16 needs a GPU (--device cuda); on the CPU use float32 or bfloat16"
        )
    return device, getattr(torch, dtype_name)


def output_paths(out: str, seeds: list[int]) -> list[Path]:
    out_path = Path(out)
    if out_path.is_dir():
        return [out_path / f"minisd-{seed}.png" for seed in seeds]
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file or an existing folder, got {out!r}")
    if not (out_path.parent if str(out_path.parent) else Path(".")).is_dir():
        raise FileNotFoundError(f"--out: the folder {str(out_path.parent)!r} does not exist")
    if len(seeds) == 1:
        return [out_path]
    return [out_path.with_name(f"{out_path.stem}-{i}{out_path.suffix}") for i in range(len(seeds))]


def load_model(path, device, dtype):
    import minisd

    if path is None:
        if not BUNDLED_MODEL.is_file():
            raise FileNotFoundError(
                f"the bundled model {BUNDLED_MODEL} is missing; pass --model PATH "
                "(a minisd file, an official checkpoint or a diffusers folder)"
            )
        path = BUNDLED_MODEL
    elif not Path(path).exists():
        raise FileNotFoundError(f"--model {path!r} does not exist")
    return minisd.load(path, device=device, dtype=dtype)


def main(args: argparse.Namespace) -> int:
    s = resolve_settings(args)
    if s["batch"] < 1:
        raise ValueError(f"--batch must be >= 1, got {s['batch']}")
    for name in ("init_image", "mask", "lora"):
        if s[name] is not None and not Path(s[name]).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {s[name]!r} does not exist")
    device, dtype = check_device(s["device"], s["dtype"])
    if s["seed"] is None:
        s["seed"] = random.SystemRandom().randrange(2**32)
    seeds = [s["seed"] + i for i in range(s["batch"])]
    paths = output_paths(s["out"], seeds)  # before the slow part: a bad --out fails at once

    sd = load_model(s["model"], device, dtype)
    if s["lora"] is not None:
        from ..train.lora import load_adapter

        # a mismatched or foreign file is a ValueError: one line, exit 2
        load_adapter(sd, s["lora"])
    images = sd.generate(
        [s["prompt"]] * s["batch"],
        negative_prompt=s["negative_prompt"],
        steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        sampler=s["sampler"],
        eta=s["eta"],
        karras=s["karras"],
        seed=seeds,
        height=s["height"],
        width=s["width"],
        init_image=s["init_image"],
        strength=s["strength"],
        mask=s["mask"],
        template=s["template"],
        prompt_weighting=s["prompt_weighting"],
        progress=not args.quiet,
    )

    from .. import __version__
    from ..images import save_png

    for image, seed, path in zip(images, seeds, paths):
        stored = {name: s[name] for name in STORED}
        stored.update(seed=seed, height=image.height, width=image.width, minisd_version=__version__)
        save_png(image, path, stored)
        print(path)
    return 0
