"""The open-ended project: train the best tiny model you can in a fixed CPU budget, scored on
held-out prompts.

Rules (chapter 11 gives the tools):
- Train from scratch with minisd's trainers (`python -m minisd.train ...`, or your own loop) for at
  most BUDGET_MINUTES minutes of wall time on a CPU with 2 cores; any architecture size, schedule,
  prediction type, data augmentation or sampler you like. Report your training command and time with
  the submission.
- Submit one minisd `.safetensors` file. The teacher scores it with

      python -m minisd.course project model.safetensors --student ID > result.json

which generates one image for each of HELDOUT_COUNT captions of the shapes dataset's *held-out*
split (colour and shape pairs never seen in training, drawn with the fixed PROMPT_SEED) and scores
them with the prompt-fidelity detector (minisd.train.fidelity): `colour_shape` is the fraction of
images whose objects have the right colour and shape, `full` the fraction that also match size and
position. The leaderboard `score` is their mean. The JSON records the file's SHA-256, so a result
can be matched to the file it came from.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

BUDGET_MINUTES = 10
HELDOUT_COUNT = 64
PROMPT_SEED = 2024
GUIDANCE_SCALE = 4.0


def score_images(images, prompts: list[str], student: str) -> dict:
    """The leaderboard entry for images [N, 3, H, W] in [0, 1] generated for `prompts`."""
    from minisd.train.fidelity import evaluate

    rates = evaluate(images, prompts, value_range=(0, 1))
    return {
        "student": student,
        "split": "heldout",
        "count": rates["count"],
        "colour_shape": rates["colour_shape"],
        "full": rates["full"],
        "score": (rates["colour_shape"] + rates["full"]) / 2,
    }


def score_checkpoint(
    path, student: str, count: int = HELDOUT_COUNT, steps: int = 20, seed: int = 0
) -> dict:
    import minisd
    from minisd.train.evaluate import generate_images, prompts_of

    data = Path(path).read_bytes()
    sd = minisd.load(str(path))
    prompts = prompts_of("heldout", count, PROMPT_SEED)
    images = generate_images(sd, prompts, GUIDANCE_SCALE, image_seed=seed, steps=steps)
    entry = score_images(images, prompts, student)
    entry.update(
        checkpoint=Path(path).name,
        sha256=hashlib.sha256(data).hexdigest(),
        steps=steps,
        seed=seed,
        guidance_scale=GUIDANCE_SCALE,
        budget_minutes=BUDGET_MINUTES,
    )
    return entry


def main(args) -> int:
    path = Path(args.checkpoint)
    if not path.is_file():
        print(f"error: {args.checkpoint}: no such file", file=sys.stderr)
        return 2
    if not args.student.strip():
        print("error: --student must not be empty", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    try:
        entry = score_checkpoint(path, args.student, steps=args.steps, seed=args.seed)
    # noqa: BLE001 - a submission that cannot be loaded is reported, not a traceback
    except Exception as error:
        print(
            f"error: cannot score {args.checkpoint}: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(entry, indent=1))
    return 0
