"""Write a model card (card.py) into a minisd file, leaving every tensor bit for bit as it was.

    python -m minisd.tools.set_card minisd/assets/bundled.safetensors --guidance-scale 1.5 --shapes

`--shapes` records the vocabulary of minisd's shapes captions (train/shapes_dataset.py), for a model
trained on them. The tensors are copied as stored (float16 stays float16); only the JSON config in
the file's metadata changes, and the file is replaced atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..card import ModelCard


def set_card(path, card: ModelCard) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..config import SDConfig
    from ..model import FORMAT_KEY, atomic_write

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if FORMAT_KEY not in metadata:
        raise ValueError(f"{path} is not a minisd file (no {FORMAT_KEY} in its metadata)")
    config = dataclasses.replace(SDConfig.from_json(metadata[FORMAT_KEY]), card=card)
    metadata[FORMAT_KEY] = config.to_json()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisd.tools.set_card", description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--guidance-scale", type=float, default=ModelCard.guidance_scale)
    parser.add_argument("--steps", type=int, default=ModelCard.steps)
    parser.add_argument("--sampler", default=ModelCard.sampler)
    parser.add_argument("--shapes", action="store_true", help="the shapes captions' words")
    args = parser.parse_args(argv)
    vocabulary = None
    if args.shapes:
        from ..train.shapes_dataset import caption_vocabulary

        vocabulary = caption_vocabulary()
    try:
        card = ModelCard(args.guidance_scale, args.steps, args.sampler, vocabulary)
        set_card(args.path, card)
    except (ValueError, OSError) as error:
        print(f"set_card: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
