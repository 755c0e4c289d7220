"""`python -m minisd generate "PROMPT" ...`: text to image (img2img with --init-image, inpainting
with --mask).

Every image is written as a PNG whose text metadata holds the prompt and every setting, including
its own seed (image i of a batch uses seed + i), so `--from-png IMAGE.png` regenerates it; flags
given next to --from-png override the stored ones. Nothing is written unless generation succeeds,
and files are written atomically.

Settings left out come from the model's card (card.py): SD's usual 50 DDIM steps at guidance 7.5
for official checkpoints, the bundled model's own 1.5. A model trained on a closed vocabulary names
the prompt's words it never saw, in one line on stderr, and makes the image anyway.

What the user sees: images of small models (the bundled one is 32×32) are saved enlarged by a whole
factor to at least VIEW_SIDE pixels, nearest neighbour so every model pixel stays a sharp square;
the PNG records the native size (height, width) and the factor (`view_scale`). `--native-size`
keeps the model's pixels one to one.

Speed: the command line runs the fastest path proven equal to the readable one (fused attention,
channels_last on a GPU: tools/fastpath.py, tests/test_fastpath.py); `--readable` keeps the readable
modules the notebooks use.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
from pathlib import Path

from ..config import BUNDLED_MODEL

DTYPES = ("float32", "float16", "bfloat16")
# images smaller than this on a side are saved enlarged (nearest neighbour) to at least this size
VIEW_SIDE = 256
# height and width at most this many times the model's native size, unless --no-size-limit: far
# from their training size models draw poorly, and the memory of attention grows with (H·W)²
MAX_SIZE_FACTOR = 4
# the sampler registry's names (minisd/samplers/__init__.py), listed here so `--help` needs no torch
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde")
# Defaults live here rather than in argparse, so that --from-png can tell a flag given from a flag
# left out.
DEFAULTS = dict(
    prompt=None,
    negative_prompt="",
    steps=None,  # None: the model card's
    guidance_scale=None,
    guidance_rescale=0.0,
    sampler=None,
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
    "guidance_rescale",
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
    a("--steps", type=int, help="sampling steps (default: the model card's; SD: 50)")
    a(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance scale s >= 0, 1 = no guidance "
        "(default: the model card's; SD: 7.5, the bundled model: 1.5)",
    )
    a(
        "--guidance-rescale",
        type=float,
        help="guidance rescale phi in [0, 1] (Lin et al. 2024 eq. 15-16; 0.7 for zero-terminal-SNR "
        "models; default 0: plain guidance)",
    )
    a("--sampler", choices=SAMPLER_NAMES, help="default: the model card's (ddim)")
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
    a(
        "--no-size-limit",
        action="store_true",
        help=f"allow height/width above {MAX_SIZE_FACTOR}x the model's native size",
    )
    a(
        "--native-size",
        action="store_true",
        help=f"save the model's pixels one to one (default: small images are enlarged to at least "
        f"{VIEW_SIDE} px, nearest neighbour)",
    )
    a(
        "--readable",
        action="store_true",
        help="run the readable modules (math attention) instead of the fastest proven-equal path",
    )
    a("--init-image", help="start from this image (img2img)")
    a(
        "--strength",
        type=float,
        help="how much of the init image to repaint, in [0, 1] (default 0.8; 1.0 with --mask)",
    )
    a("--mask", help="inpainting mask, same size as --init-image: white = repaint, black = keep")
    a(
        "--model",
        help="a minisd file, an official .ckpt/.safetensors or a diffusers folder "
        "(default: the bundled model)",
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
        help="take the settings stored in a PNG written by this command "
        "(other flags override them)",
    )
    a("--quiet", action="store_true", help="no progress bar")


# The type each stored setting must have (a PNG's settings are data from outside: checked)
_STR, _INT, _NUMBER, _BOOL = (str,), (int,), (int, float), (bool,)
STORED_TYPES = dict(
    prompt=_STR,
    negative_prompt=_STR,
    steps=_INT,
    guidance_scale=_NUMBER,
    guidance_rescale=_NUMBER,
    sampler=_STR,
    eta=_NUMBER,
    karras=_BOOL,
    seed=_INT,
    height=_INT,
    width=_INT,
    init_image=_STR,
    strength=_NUMBER,
    mask=_STR,
    model=_STR,
    template=_STR,
    prompt_weighting=_BOOL,
    dtype=_STR,
    lora=_STR,
)
_TYPE_WORDS = {_STR: "a string", _INT: "an integer", _NUMBER: "a number", _BOOL: "true or false"}


def stored_settings(path) -> dict:
    """The settings of a PNG written by this command, each checked for its type (null: left
    out)."""
    from ..images import read_png_settings

    stored = read_png_settings(path)
    if not isinstance(stored, dict):
        raise ValueError(
            f"--from-png {path}: the stored settings must be a JSON object, "
            f"got a JSON {type(stored).__name__}"
        )
    checked = {}
    for name in STORED:
        value = stored.get(name)
        if value is None:
            continue
        kinds = STORED_TYPES[name]
        # bool is an int in Python: 'true' is no step count, and 1 is no prompt_weighting
        if isinstance(value, bool) != (kinds is _BOOL) or not isinstance(value, kinds):
            raise ValueError(
                f"--from-png {path}: the stored {name} must be {_TYPE_WORDS[kinds]}, "
                f"got {value!r:.80}"
            )
        checked[name] = value
    return checked


def resolve_settings(args: argparse.Namespace) -> dict:
    stored = stored_settings(args.from_png) if args.from_png else {}
    settings = {}
    for name, default in DEFAULTS.items():
        given = getattr(args, name, None)
        settings[name] = given if given is not None else stored.get(name, default)
    if settings["prompt"] is None:
        raise ValueError("give a prompt (or --from-png IMAGE)")
    return settings


def check_size(settings: dict, native: int, no_limit: bool) -> None:
    """Height and width at most MAX_SIZE_FACTOR × the native size, unless --no-size-limit."""
    limit = MAX_SIZE_FACTOR * native
    for name in ("height", "width"):
        value = settings[name]
        if value is not None and value > limit and not no_limit:
            raise ValueError(
                f"--{name} {value} is more than {MAX_SIZE_FACTOR}x this model's native size "
                f"({native} px; the limit is {limit}): far from its training size a model draws "
                "poorly and attention's memory grows with the square of the pixel count; "
                "to go bigger anyway, add --no-size-limit"
            )


def view_scale(height: int, width: int, native_size: bool) -> int:
    """The whole factor that brings the image's shorter side to at least VIEW_SIDE pixels (1 with
    --native-size, or when it is already that big)."""
    if native_size:
        return 1
    return max(1, math.ceil(VIEW_SIDE / min(height, width)))


@contextlib.contextmanager
def fastest_proven_path(sd, readable: bool):
    """Fused attention and fused q/k/v projections (proven equal to the readable math:
    tests/test_fastpath.py) everywhere, and channels_last on a GPU, while the block runs; nothing
    with --readable. The switches belong to this model alone (fastpath.speed_up); they are undone
    afterwards so that a model handed in by a caller (a notebook, a test) comes back as it was."""
    if readable:
        yield
        return
    from .fastpath import slow_down, speed_up

    speed_up(sd, attention="fused", channels_last=sd.device.type == "cuda")
    try:
        yield
    finally:
        slow_down(sd)


def warn_unknown_words(sd, prompt: str, template) -> None:
    """One line on stderr naming the prompt's words outside the model's vocabulary (if it has
    one)."""
    from ..prompts import apply_template

    line = sd.config.card.describe_unknown(apply_template(prompt, template), sd.config.name)
    if line is not None:
        print(f"note: {line}", file=sys.stderr)


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
            f"--device {device_name}: CUDA is not available on this machine "
            f"(torch {torch.__version__})"
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
    check_size(s, sd.config.image_size, args.no_size_limit)
    if s["lora"] is not None:
        from ..train.lora import load_adapter

        # a mismatched or foreign file is a ValueError: one line, exit 2
        load_adapter(sd, s["lora"])
    from ..card import sampling_defaults

    s["steps"], s["guidance_scale"], s["sampler"] = sampling_defaults(
        sd.config.card, s["steps"], s["guidance_scale"], s["sampler"]
    )
    warn_unknown_words(sd, s["prompt"], s["template"])
    with fastest_proven_path(sd, args.readable):
        images = sd.generate(
            [s["prompt"]] * s["batch"],
            negative_prompt=s["negative_prompt"],
            steps=s["steps"],
            guidance_scale=s["guidance_scale"],
            guidance_rescale=s["guidance_rescale"],
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

    from PIL import Image

    from .. import __version__
    from ..images import save_png

    for image, seed, path in zip(images, seeds, paths):
        stored = {name: s[name] for name in STORED}
        # the native size, so --from-png makes the same image; view_scale: how it was enlarged
        scale = view_scale(image.height, image.width, args.native_size)
        stored.update(
            seed=seed,
            height=image.height,
            width=image.width,
            view_scale=scale,
            minisd_version=__version__,
        )
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        save_png(image, path, stored)
        print(path)
    return 0
