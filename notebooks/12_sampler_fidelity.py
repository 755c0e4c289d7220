"""Prompt fidelity of the bundled model per sampler and step count (the table of chapter 12 and the
README). Run from the repository root:

    python notebooks/12_sampler_fidelity.py [OUT.json] [--device cuda] [--count 200]

Protocol: as `python -m minisd evaluate` (minisd/train/evaluate.py) with its chosen guidance scale
1.5: `count` seen prompts (val split, seed 0) and `count` held-out prompts (heldout split, seed 0),
image i with seed i; colour+shape and full rates from minisd.train.fidelity. Every number is a pure
function of the seeds; on a GPU the UNet's float rounding differs from the CPU's, which can flip a
borderline image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minisd  # noqa: E402
from minisd.train.evaluate import BUNDLED_MODEL, prompts_of  # noqa: E402
from minisd.train.fidelity import evaluate  # noqa: E402

CONFIGS = [  # (sampler, karras)
    ("ddim", False), ("ddpm", False), ("euler", False), ("euler", True), ("euler_a", False),
    ("heun", False), ("heun", True), ("dpmpp_2m", False), ("dpmpp_2m", True),
    ("dpmpp_2m_sde", False), ("dpmpp_2m_sde", True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="sampler_fidelity.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="a subset, e.g. ddim euler heun:karras (default: all of CONFIGS)")
    args = parser.parse_args()
    configs = CONFIGS
    if args.samplers:
        configs = [(name.split(":")[0], name.endswith(":karras")) for name in args.samplers]
    sd = minisd.load(BUNDLED_MODEL, device=args.device)
    sets = {
        "seen": prompts_of("val", args.count, 0),
        "heldout": prompts_of("heldout", args.count, 0),
    }
    results = []
    for sampler, karras in configs:
        for steps in args.steps:
            start = time.time()
            row = {"sampler": sampler, "karras": karras, "steps": steps}
            for name, prompts in sets.items():
                images = sd.generate(
                    prompts, steps=steps, guidance_scale=1.5, sampler=sampler, karras=karras,
                    seed=list(range(len(prompts))), output_type="tensor",
                )
                rates = evaluate(images.float().cpu(), prompts, value_range=(0, 1))
                row[name] = {"colour_shape": rates["colour_shape"], "full": rates["full"]}
            row["seconds"] = round(time.time() - start, 1)
            print(json.dumps(row), flush=True)
            results.append(row)
    meta = {"count": args.count, "guidance_scale": 1.5, "device": args.device,
            "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"protocol": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
