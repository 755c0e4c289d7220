"""Prompt fidelity of a model on the coloured-shapes prompts: does the image show what the prompt
asks for?

    python -m minisd evaluate                         # the bundled model, the protocol below
    python -m minisd evaluate --model runs/ldm/model.safetensors --seen 100 --heldout 100

Protocol (every number is a pure function of the seeds):
  1. Choose the guidance scale s on a *selection* set: 50 prompts of the validation split drawn with
     seed+1, trying each scale in --scales; the scale with the highest full rate (ties:
     colour+shape) wins.
  2. Seen:     --seen prompts of the validation split (seed): colour-shape pairs that occur in
               training, 1 or 2 objects. Report the colour+shape rate and the full rate (also size,
               position, no extra object).
  3. Held-out: --heldout prompts of the held-out split (seed): each has at least one colour-shape
               pair never seen in training. Report the colour+shape rate.
  4. Both again at s = 1 (no guidance), to show what guidance buys.
  5. Short prompts (--short K, optional): "a {colour} {shape}" for each of the 6 × 3 colour-shape
     pairs, K images each, at s and at 1. Training captions always state size and position, so
     these test robustness to a phrasing never seen; rates for seen and held-out pairs apart.
Image i of a set is sampled with seed (image_seed + i), DDIM, --steps steps. The detector is
minisd.train.fidelity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..config import BUNDLED_MODEL
from ..weights.convert import load
from .fidelity import evaluate
from .shapes_dataset import (
    COLOURS,
    DEFAULT_HELDOUT_PAIRS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    caption,
)

DEFAULT_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 7.5)


def prompts_of(split: str, count: int, seed: int) -> list[str]:
    """The captions of the first `count` scenes of a split of the shapes dataset drawn with
    `seed`."""
    dataset = ShapesDataset(ShapesConfig(seed=seed, length=max(count, 1)), split)
    return [caption(dataset.spec_at(i)) for i in range(count)]


def short_prompts(heldout: bool) -> list[str]:
    """"a {colour} {shape}" for every colour-shape pair that is (heldout=False) or is not
    (heldout=True) seen in training: 14 and 4 prompts."""
    return [
        f"a {colour} {shape}"
        for colour in COLOURS
        for shape in SHAPES
        if ((colour, shape) in DEFAULT_HELDOUT_PAIRS) == heldout
    ]


@torch.no_grad()
def generate_images(
    sd,
    prompts: list[str],
    guidance_scale: float,
    image_seed: int = 0,
    steps: int = 50,
    batch: int = 50,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1]; image i uses seed image_seed + i whatever the batching."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        seeds = [image_seed + start + j for j in range(len(chunk))]
        images.append(
            sd.generate(
                chunk, steps=steps, guidance_scale=guidance_scale, seed=seeds, output_type="tensor"
            )
        )
    return torch.cat(images)


def fidelity(
    sd,
    prompts: list[str],
    guidance_scale: float,
    image_seed: int = 0,
    steps: int = 50,
    batch: int = 50,
) -> dict:
    """{'colour_shape': rate, 'full': rate, counts...} of the model's images for these prompts."""
    images = generate_images(sd, prompts, guidance_scale, image_seed, steps, batch)
    return evaluate(images, prompts, value_range=(0, 1))


def choose_guidance(
    sd, scales, count: int, seed: int, image_seed: int, steps: int, batch: int
) -> tuple[float, dict]:
    """The scale with the best full rate (then colour+shape rate) on the selection set, and every
    scale's result."""
    prompts = prompts_of("val", count, seed + 1)
    results = {s: fidelity(sd, prompts, s, image_seed, steps, batch) for s in scales}
    best = max(scales, key=lambda s: (results[s]["full"], results[s]["colour_shape"], -s))
    return best, results


def run_protocol(
    sd,
    seen: int = 200,
    heldout: int = 200,
    select: int = 50,
    scales=DEFAULT_SCALES,
    guidance_scale=None,
    seed: int = 0,
    image_seed: int = 0,
    steps: int = 50,
    batch: int = 50,
    log=print,
    short: int = 0,
) -> dict:
    report = {"seed": seed, "image_seed": image_seed, "steps": steps, "sampler": "ddim"}
    if guidance_scale is None:
        guidance_scale, selection = choose_guidance(
            sd, scales, select, seed, image_seed, steps, batch
        )
        report["selection"] = {
            "prompts": select,
            "prompt_seed": seed + 1,
            "by_scale": {str(s): _rates(r) for s, r in selection.items()},
        }
        for s, r in selection.items():
            log(
                f"  selection set ({select} prompts), scale {s}: colour+shape "
                f"{r['colour_shape']:.1%}, full {r['full']:.1%}"
            )
    report["guidance_scale"] = guidance_scale
    seen_prompts, heldout_prompts = (
        prompts_of("val", seen, seed),
        prompts_of("heldout", heldout, seed),
    )
    for scale, key in ((guidance_scale, "guided"), (1.0, "unguided")):
        report[key] = {
            "scale": scale,
            "seen": _rates(fidelity(sd, seen_prompts, scale, image_seed, steps, batch)),
            "heldout": _rates(fidelity(sd, heldout_prompts, scale, image_seed, steps, batch)),
        }
        r = report[key]
        log(
            f"scale {scale}: seen ({seen}) colour+shape {r['seen']['colour_shape']:.1%}, full "
            f"{r['seen']['full']:.1%}; "
            f"held-out ({heldout}) colour+shape {r['heldout']['colour_shape']:.1%}, full "
            f"{r['heldout']['full']:.1%}"
        )
        if short > 0:  # each short prompt K times in a row: image i still uses image_seed + i
            r["short"] = {
                name: _rates(
                    fidelity(
                        sd,
                        [p for p in short_prompts(name == "heldout") for _ in range(short)],
                        scale,
                        image_seed,
                        steps,
                        batch,
                    )
                )
                for name in ("seen", "heldout")
            }
            log(
                f"scale {scale}: short prompts ({short} images each), seen pairs colour+shape "
                f"{r['short']['seen']['colour_shape']:.1%}, held-out pairs "
                f"{r['short']['heldout']['colour_shape']:.1%}"
            )
    return report


def _rates(result: dict) -> dict:
    return {
        k: result[k] for k in ("colour_shape", "full", "colour_shape_count", "full_count", "count")
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument(
        "--model",
        default=str(BUNDLED_MODEL),
        help="a minisd model file (default: the bundled model)",
    )
    p.add_argument("--seen", type=int, default=200, help="prompts with seen colour-shape pairs")
    p.add_argument(
        "--heldout", type=int, default=200, help="prompts with a held-out colour-shape pair"
    )
    p.add_argument(
        "--select", type=int, default=50, help="prompts of the set that picks the guidance scale"
    )
    p.add_argument(
        "--scales",
        default=",".join(str(s) for s in DEFAULT_SCALES),
        help="scales to try, comma-separated",
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="use this scale and skip the selection"
    )
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the prompt sets (the selection set uses seed + 1)",
    )
    p.add_argument(
        "--image-seed", type=int, default=0, help="image i is sampled with seed image_seed + i"
    )
    p.add_argument("--batch", type=int, default=50, help="images generated together")
    p.add_argument(
        "--short",
        type=int,
        default=0,
        help="also score the 18 short prompts 'a {colour} {shape}', this many images each",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the report here")


def main(args: argparse.Namespace) -> int:
    for name in ("seen", "heldout", "select", "steps", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.short < 0:
        raise ValueError(f"--short must be >= 0, got {args.short}")
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        raise ValueError(
            f"--scales must be numbers separated by commas, got {args.scales!r}"
        ) from None
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {folder} for --json does not exist")
    sd = load(args.model, device=args.device)
    began = time.time()
    report = run_protocol(
        sd,
        args.seen,
        args.heldout,
        args.select,
        scales,
        args.guidance,
        args.seed,
        args.image_seed,
        args.steps,
        args.batch,
        short=args.short,
    )
    report["model"] = str(args.model)
    report["seconds"] = round(time.time() - began, 1)
    print(f"guidance scale {report['guidance_scale']} ({report['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
