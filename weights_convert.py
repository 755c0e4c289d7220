#!/usr/bin/env python
"""Convert Stable Diffusion weights: official checkpoints or diffusers folders -> minisd, and minisd
-> official.

    python weights_convert.py v1-5-pruned-emaonly.safetensors -o sd15.safetensors python
    weights_convert.py v2-1_768-ema-pruned.ckpt -o sd21.safetensors --config v2-inference-v.yaml
    python weights_convert.py sd15.safetensors -o back.safetensors --to official

The work is done by `minisd.weights.convert.convert_file`; this file only reads the command line.
Any failure prints one paragraph on stderr and exits with status 2, leaving no output file behind.
"""
from __future__ import annotations

import argparse
import signal
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src", help="official .ckpt/.safetensors, a diffusers pipeline folder, or a minisd file"
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="the file to write (.safetensors; .ckpt too with --to official)",
    )
    parser.add_argument(
        "--config",
        help="the official inference YAML (v1-inference.yaml, v2-inference-v.yaml, ...): "
        "settles what shapes cannot tell (v-prediction, heads, schedule); "
        "needs pyyaml",
    )
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="what the UNet predicts; overrides the YAML and the SD 2.x default (v_prediction)",
    )
    parser.add_argument(
        "--to",
        choices=("minisd", "official"),
        default="minisd",
        help="output layout (default minisd)",
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="take the UNet from the checkpoint's EMA copies (model_ema.*); "
        "default: the plain weights",
    )
    parser.add_argument(
        "--half", action="store_true", help="store every floating tensor as float16"
    )
    return parser.parse_args(argv)


def _exit_on_signal(number, frame):
    raise SystemExit(128 + number)


def main(argv=None) -> int:
    args = parse_args(argv)
    # after argument parsing, so --help answers without importing torch
    from minisd.weights.convert import convert_file

    # SIGTERM (kill, a job scheduler, a closed terminal's SIGHUP) ends the run as Ctrl-C does: an
    # exception, so atomic_write deletes its .tmp file (by default these signals end the process at
    # once, leaving up to a checkpoint's size of .tmp behind)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_on_signal)
    try:
        convert_file(
            args.src,
            args.output,
            to=args.to,
            config=args.config,
            prediction_type=args.prediction_type,
            ema=args.ema,
            half=args.half,
        )
    except (ValueError, OSError) as error:  # ConversionError is a ValueError
        print(f"weights_convert.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
