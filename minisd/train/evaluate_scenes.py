"""Prompt fidelity of a v2 model on the scenes world, against the guidance scale.

    python -m minisd.train.evaluate_scenes model.safetensors --scales 1 3 5 --count 100

Three prompt sets, each a pure function of --seed (none of them is used to choose settings):
    short     what users type: "a green circle", "two red stars" (trained colour-shape pairs and
              counts), scored on colour+shape
    seen      full descriptions of validation scenes (canonical captions: every object's colour,
              shape, size, position or relation, count, and the background), scored on full
    heldout   full descriptions of held-out scenes (a held-out pair, count or relation each)
Each prompt gets its own seed (image i of a set always starts from the same noise), 50 DDIM steps
by default, and is scored by `scene_detector.score`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .scene_detector import score
from .scene_language import ObjectSpec, SceneSpec, caption
from .scenes import HELDOUT_COUNTS, TRAIN_PAIRS, ScenesConfig, ScenesDataset


def prompt_sets(count: int, seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng([seed, 16])
    short = []
    for _ in range(count):
        colour, shape = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        number = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
        if (number, shape) in HELDOUT_COUNTS:
            number = 1
        short.append(caption(SceneSpec((ObjectSpec(shape, colour, count=number),))))
    sets = {"short": short}
    for split, name in (("val", "seen"), ("heldout", "heldout")):
        dataset = ScenesDataset(ScenesConfig(seed=seed + 1000, length=count), split)
        sets[name] = [caption(dataset.spec_at(i)) for i in range(count)]
    return sets


@torch.no_grad()
def generate(sd, prompts, guidance_scale, steps=50, batch=100, negative_prompt=""):
    """uint8 (N, H, W, 3) images; prompt i always uses seed i."""
    images = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        out = sd.generate(list(part), negative_prompt=[negative_prompt] * len(part), steps=steps,
                          guidance_scale=guidance_scale, seed=list(range(start, start + len(part))),
                          output_type="tensor")  # fmt: skip
        images.append((out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(images).numpy()


def _score(pair):
    return score(*pair)


def rates(images, prompts, workers: int = 0) -> dict:
    pairs = list(zip(images, prompts))
    if workers > 1:  # the detector runs on the CPU, ~20 ms an image
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_score, pairs, chunksize=8)
    else:
        results = [_score(pair) for pair in pairs]
    return {"colour_shape": float(np.mean([r.colour_shape for r in results])),
            "full": float(np.mean([r.full for r in results])), "count": len(results)}  # fmt: skip


@torch.no_grad()
def vae_round_trip(vae, count: int = 200, seed: int = 77, workers: int = 0) -> dict:
    """Fidelity of decode(encode(x)) on validation scenes, full descriptions: the ceiling the
    autoencoder sets for any model that draws through it."""
    dataset = ScenesDataset(ScenesConfig(seed=seed, length=count), "val")
    items = [dataset.item(i) for i in range(count)]
    device = next(vae.parameters()).device
    x = torch.stack([torch.from_numpy(item.image).permute(2, 0, 1) for item in items])
    x = x.float().to(device) / 127.5 - 1
    out = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    images = ((out + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return rates(images, [item.spec for item in items], workers)


def fidelity_vs_guidance(sd, scales, count=100, seed=0, steps=50, log=print, workers=0,
                         grid=None) -> dict:  # fmt: skip
    """{scale: {set: rates}}; grid: a PNG path for the first 16 seen prompts at every scale."""
    sets = prompt_sets(count, seed)
    report, pictures = {}, []
    for scale in scales:
        began = time.time()
        images = {name: generate(sd, prompts, scale, steps) for name, prompts in sets.items()}
        pictures.append(torch.from_numpy(images["seen"][:16]).permute(0, 3, 1, 2))
        report[str(scale)] = {name: rates(images[name], prompts, workers)
                              for name, prompts in sets.items()}  # fmt: skip
        r = report[str(scale)]
        log(f"guidance {scale}: short colour+shape {r['short']['colour_shape']:.1%}, "
            f"seen full {r['seen']['full']:.1%} (colour+shape {r['seen']['colour_shape']:.1%}), "
            f"held-out full {r['heldout']['full']:.1%} ({time.time() - began:.0f} s)")
    if grid:
        from .training import save_image_grid

        save_image_grid(torch.cat(pictures).float() / 127.5 - 1, grid, columns=16)
    return report


def main(argv=None) -> int:
    import minisd

    p = argparse.ArgumentParser(prog="python -m minisd.train.evaluate_scenes")
    p.add_argument("model", help="a model file, or a vae.safetensors with --vae-only")
    p.add_argument("--vae-only", action="store_true", help="score the VAE's round trip only")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    p.add_argument("--count", type=int, default=100, help="prompts per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default=None, help="PNG: 16 seen prompts (columns) × scales (rows)")
    p.add_argument("--workers", type=int, default=0, help="processes that run the detector")
    args = p.parse_args(argv)
    if args.vae_only:
        from ..vae import AutoencoderKL
        from .train_vae import load_vae

        config, tensors = load_vae(args.model)
        vae = AutoencoderKL(config.vae)
        vae.load_state_dict(tensors)
        result = vae_round_trip(vae.to(args.device).eval(), args.count, workers=args.workers)
        print(f"VAE round trip on {args.count} validation scenes: full {result['full']:.1%}, "
              f"colour+shape {result['colour_shape']:.1%}")  # fmt: skip
        return 0
    sd = minisd.load(args.model, device=args.device)
    report = fidelity_vs_guidance(sd, args.scales, args.count, args.seed, args.steps,
                                  workers=args.workers, grid=args.grid)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
