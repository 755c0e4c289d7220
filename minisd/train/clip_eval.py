"""Evaluate a tiny CLIP the way the CLIP paper does: zero-shot classification and retrieval.

Zero-shot classification (Radford et al. 2021, section 3.1): no classifier is trained. Each class
is described in words, the text tower turns the descriptions into class embeddings, and an image
goes to the class whose embedding is nearest,

    ŷ(x) = argmax_c  u(x)ᵀ w_c,      w_c = normalize( Σ_{p ∈ prompts(c)} v(p) )

With prompt ensembling (section 3.1.4) a class has many prompts; here, every single-object caption
with that attribute value: class "red" averages "a small red circle on the left", "a large red
square at the top", … over every size, shape and position. Accuracy is reported per attribute
(colour, shape, size, position on single-object images; count = one or two objects on mixed ones),
separately on colour–shape pairs seen in training and on the held-out pairs that never were.

Retrieval (section 3.1.5): N images with N different captions. Image→text recall@K is the fraction
of images whose own caption is among the K captions nearest to it; text→image the other way round.

    python -m minisd.train.clip_eval                      # the bundled tiny CLIP
    python -m minisd.train.clip_eval --model runs/clip/tiny_clip.safetensors --json report.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..contrastive import TinyCLIP, load_tiny_clip
from ..files import atomic_write
from .shapes_dataset import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TWO_OBJECT_LAYOUTS,
    SceneObject,
    SceneSpec,
    ShapesConfig,
    ShapesDataset,
    caption,
)
from .training import to_model_range

ATTRIBUTES = ("colour", "shape", "size", "position")


# ---------------------------------------------------------------- the two measurements


@torch.no_grad()
def encode_images(clip: TinyCLIP, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> u [N, D]."""
    device = clip.log_logit_scale.device
    parts = [
        clip.encode_image(to_model_range(images_uint8[i : i + batch]).to(device)).float()
        for i in range(0, len(images_uint8), batch)
    ]
    return torch.cat(parts).cpu()


@torch.no_grad()
def encode_texts(clip: TinyCLIP, texts: list[str], batch: int = 512) -> torch.Tensor:
    """Strings -> v [N, D]."""
    parts = [clip.encode_prompts(texts[i : i + batch]).float() for i in range(0, len(texts), batch)]
    return torch.cat(parts).cpu()


@torch.no_grad()
def class_embeddings(clip: TinyCLIP, class_prompts: dict[str, list[str]]) -> torch.Tensor:
    """w_c = normalize(Σ_p v(p)) for each class c, in the order of class_prompts: [C, D]."""
    rows = [encode_texts(clip, prompts).sum(dim=0) for prompts in class_prompts.values()]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def zero_shot_predict(image_embeddings: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """ŷ = argmax_c uᵀ w_c: [N] class indices."""
    return (image_embeddings @ class_weights.T).argmax(dim=1)


def recall_at_k(similarity: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """similarity [N, N], row i's match in column i: fraction of rows whose match ranks in the top
    K. Ties count against the match (it must beat every other column strictly)."""
    own = similarity.diagonal().unsqueeze(1)
    rank = (similarity >= own).sum(dim=1) - 1  # columns that beat or tie the match (itself aside)
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks=(1, 5)) -> dict:
    """Image→text and text→image recall@K of N pairs (row i of each is a pair)."""
    similarity = image_embeddings @ text_embeddings.T
    i2t, t2i = recall_at_k(similarity, ks), recall_at_k(similarity.T, ks)
    return {
        **{f"image_to_text_R@{k}": v for k, v in i2t.items()},
        **{f"text_to_image_R@{k}": v for k, v in t2i.items()},
    }


# ---------------------------------------------------------------- the shapes world


def single_object_captions(**fixed) -> list[str]:
    """Every single-object caption, or those with the attribute values given (colour="red", …)."""
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    for name, value in fixed.items():
        values[name] = (value,)
    return [
        caption(SceneSpec([SceneObject(colour, shape, size, position)]))
        for colour, shape, size, position in itertools.product(
            values["colour"], values["shape"], values["size"], values["position"]
        )
    ]


def two_object_captions() -> list[str]:
    """Every two-object caption (both orders of mention, every layout): 5,184 of them."""
    objects = list(itertools.product(COLOURS, SHAPES, SIZES))
    texts = []
    for first_position, second_position in TWO_OBJECT_LAYOUTS:
        for layout in ((first_position, second_position), (second_position, first_position)):
            for a, b in itertools.product(objects, objects):
                pair = [SceneObject(*a, layout[0]), SceneObject(*b, layout[1])]
                texts.append(caption(SceneSpec(pair)))
    return texts


def attribute_prompts(attribute: str) -> dict[str, list[str]]:
    """Class name -> its prompt ensemble, for one attribute of the shapes world."""
    if attribute == "count":
        return {"one": single_object_captions(), "two": two_object_captions()}
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    return {value: single_object_captions(**{attribute: value}) for value in values}


def render_split(
    split: str, count: int, image_size: int, seed: int, two_object_prob: float
) -> tuple[torch.Tensor, list[SceneSpec]]:
    """`count` items of a shapes split: uint8 [count, 3, H, W] and their scene specs."""
    config = ShapesConfig(
        image_size=image_size, seed=seed, length=count, two_object_prob=two_object_prob
    )
    dataset = ShapesDataset(config, split)
    images, specs = zip(*(dataset.image_at(i) for i in range(count)))
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return tensor, list(specs)


def label_of(spec: SceneSpec, attribute: str) -> str:
    if attribute == "count":
        return ("one", "two")[len(spec.objects) - 1]
    return getattr(spec.objects[0], attribute)


def zero_shot_report(
    clip: TinyCLIP, images: torch.Tensor, specs: list[SceneSpec], attributes=ATTRIBUTES
) -> dict[str, float]:
    """Accuracy of each attribute's zero-shot classifier on these images."""
    u = encode_images(clip, images)
    report = {}
    for attribute in attributes:
        prompts = attribute_prompts(attribute)
        names = list(prompts)
        predicted = zero_shot_predict(u, class_embeddings(clip, prompts))
        truth = torch.tensor([names.index(label_of(spec, attribute)) for spec in specs])
        report[attribute] = (predicted == truth).float().mean().item()
    return report


def distinct_pairs(images: torch.Tensor, specs: list[SceneSpec]):
    """The first image of each caption: N images with N different captions, for retrieval."""
    seen, keep = set(), []
    for i, spec in enumerate(specs):
        text = caption(spec)
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return images[keep], [caption(specs[i]) for i in keep]


def evaluate_shapes(
    clip: TinyCLIP,
    count: int = 500,
    seed: int = 1234,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Zero-shot accuracy per attribute on `count` single-object images of seen pairs (val split)
    and of held-out pairs; count accuracy and retrieval on `count` mixed images of each."""
    image_size = clip.config.image.image_size
    report = {"images_per_set": count, "seed": seed}
    for name, split in (("seen", "val"), ("heldout", "heldout")):
        images, specs = render_split(split, count, image_size, seed, two_object_prob=0.0)
        zero_shot = zero_shot_report(clip, images, specs)
        mixed, mixed_specs = render_split(split, count, image_size, seed + 1, two_object_prob=0.3)
        zero_shot.update(zero_shot_report(clip, mixed, mixed_specs, ("count",)))
        pair_images, pair_texts = distinct_pairs(mixed, mixed_specs)
        found = retrieval(encode_images(clip, pair_images), encode_texts(clip, pair_texts))
        report[name] = {"zero_shot": zero_shot, "retrieval": found, "pairs": len(pair_texts)}
        if log:
            log(
                f"{name}: zero-shot {fmt(zero_shot)}; retrieval over {len(pair_texts)} pairs "
                f"{fmt(found)}"
            )
    return report


def fmt(values: dict) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in values.items())


# ---------------------------------------------------------------- the picture


PLOT_COLOURS = {
    "red": "red",
    "yellow": "gold",
    "green": "green",
    "cyan": "c",
    "blue": "blue",
    "magenta": "m",
}
PLOT_MARKERS = {"circle": "o", "square": "s", "triangle": "^"}


@torch.no_grad()
def text_pca(clip: TinyCLIP) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """Each colour–shape pair's text embedding (the normalized mean over its 10 captions of every
    size and position), projected on the first two principal components of the 18 pairs.

    Returns (pairs, their [18, 2] coordinates, the fraction of variance each component explains).
    """
    pairs = list(itertools.product(COLOURS, SHAPES))
    prompts = {pair: single_object_captions(colour=pair[0], shape=pair[1]) for pair in pairs}
    w = class_embeddings(clip, prompts)
    centred = w - w.mean(dim=0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / (singular**2).sum()
    return pairs, centred @ directions[:2].T, explained[:2]


def plot_text_pca(clip: TinyCLIP, path=None, axes=None):
    """Scatter of `text_pca`: colour = the pair's colour, marker = its shape (held-out pairs
    hollow). A CLIP that learned the world places colours and shapes along directions."""
    import matplotlib

    if axes is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .shapes_dataset import DEFAULT_HELDOUT_PAIRS

    pairs, xy, explained = text_pca(clip)
    figure = None
    if axes is None:
        figure, axes = plt.subplots(figsize=(5, 5))
    for (colour, shape), (x, y) in zip(pairs, xy.tolist()):
        held_out = (colour, shape) in DEFAULT_HELDOUT_PAIRS
        axes.scatter(
            x,
            y,
            marker=PLOT_MARKERS[shape],
            s=90,
            edgecolors=PLOT_COLOURS[colour],
            facecolors="none" if held_out else PLOT_COLOURS[colour],
            linewidths=2,
        )
    axes.set_title("text embeddings of colour–shape pairs (PCA; hollow: held out)", fontsize=9)
    axes.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    axes.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
    if figure is not None and path is not None:
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return axes


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m minisd.train.clip_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="tiny_clip.safetensors (default: the bundled one)")
    p.add_argument("--count", type=int, default=500, help="images per evaluation set")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--pca", default=None, help="write the PCA plot of text embeddings here (PNG)")
    args = p.parse_args(argv)
    if args.count < 1:
        print(f"{p.prog}: error: --count must be >= 1, got {args.count}", file=sys.stderr)
        return 2
    try:
        clip = load_tiny_clip(args.model)
    except (ValueError, FileNotFoundError) as error:
        print(f"{p.prog}: error: {error}", file=sys.stderr)
        return 2
    began = time.time()
    report = evaluate_shapes(clip, args.count, args.seed, log=print)
    print(f"({time.time() - began:.0f} s)")
    if args.json:
        text = json.dumps(report, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    if args.pca:
        plot_text_pca(clip, args.pca)
    return 0


if __name__ == "__main__":
    sys.exit(main())
