"""The command line: `python -m minisd COMMAND ...`.

Each command lives in its own module with two functions, `add_arguments(parser)` and `main(args) ->
exit status`, and is listed in COMMANDS below; that is all it takes to add one. Only the chosen
command's module is imported. Bad input (ValueError, TypeError, FileNotFoundError raised by a
command) is printed as one line and exits with status 2, like argparse's own usage errors; set
MINISD_TRACEBACK=1 to see the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

# name -> (module, one-line help)
COMMANDS = {
    "generate": (
        "minisd.tools.cli_generate",
        "make images from a text prompt (also img2img and inpainting)",
    ),
    "bench": (
        "minisd.tools.bench",
        "time minisd against diffusers on the same weights (UNet it/s, s/image, memory)",
    ),
    "train-vae": (
        "minisd.train.train_vae",
        "train the autoencoder from scratch on the coloured-shapes dataset",
    ),
    "train": (
        "minisd.train.train_ldm",
        "train the UNet and text encoder from scratch, or the UNet on the tiny CLIP's frozen text "
        "tower (needs a VAE from train-vae)",
    ),
    "evaluate": (
        "minisd.train.evaluate",
        "measure prompt fidelity of a model on the coloured-shapes prompts",
    ),
    "finetune": ("minisd.train.finetune", "teach a model a new concept with a LoRA adapter"),
    "train-clip": ("minisd.train.train_clip", "pretrain a tiny CLIP contrastively on shapes"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s own arguments are added (so other commands are never
    imported)."""
    parser = argparse.ArgumentParser(
        prog="python -m minisd", description="minisd: Stable Diffusion, written out."
    )
    parser.add_argument("--version", action="version", version=f"minisd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("MINISD_TRACEBACK"):
            raise
        print(f"python -m minisd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
