"""A procedural, captioned "coloured shapes" dataset for training a tiny Stable Diffusion offline.

Every image is a plain light-grey canvas with one or two flat-coloured shapes, and every caption
says exactly what was drawn, e.g. "a small red circle on the left" or "a large green square at the
top and a small blue triangle at the bottom".

Rendering is supersampled: each output pixel blends the shape colour with the background by its
coverage, the fraction of an S x S grid of sub-pixel samples that falls inside the shape,

    coverage_k(i, j) = 1/S^2 * #{sub-samples u of pixel (i, j) inside shape k}
    pixel(i, j)      = (1 - coverage_k) * background + coverage_k * colour_k  (shapes never overlap)

so edges are anti-aliased yet the picture is a pure function of (spec, image size, jitter RNG).

Vocabulary (six colours 60 degrees apart in hue, so a hue detector separates them easily):
    colours   red, yellow, green, cyan, blue, magenta   ("purple" is read as magenta)
    shapes    circle, square, triangle                (triangle: isosceles, apex up, base = height)
    sizes     small (side 0.25 of the image), large (side 0.40)
    positions left, right, top, bottom, center        (box centre at 0.25 / 0.5 / 0.75 of the image)
Two-object scenes use the position pairs (left, right) or (top, bottom), with a gap between the
halves, so the objects never touch.

Splits: "train" and "val" never contain the held-out colour-shape pairs (val is a different random
stream of the same distribution); "heldout" scenes contain at least one held-out pair. Each held-out
colour and shape still appears in training with other partners, which is what makes the split a test
of compositional generalisation.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

COLOUR_HUES = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
COLOURS = tuple(COLOUR_HUES)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

BACKGROUND_RGB = (235, 235, 235)
# Side of the shape's bounding box, as a fraction of the image side.
SIZE_FRACTION = {"small": 0.25, "large": 0.40}
# Centre of the shape's bounding box, as (x, y) fractions of the image; y grows downwards.
POSITION_ANCHOR = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Area of the shape divided by the area of its bounding box.
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
TWO_OBJECT_LAYOUTS = (("left", "right"), ("top", "bottom"))
DEFAULT_HELDOUT_PAIRS = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("magenta", "triangle"),
)
SPLITS = ("train", "val", "heldout")

BORDER_MARGIN = 0.03  # shapes stay this far (fraction of the image) from the image border
# empty band between the two halves of a two-object scene: blur must not join them
PAIR_GAP = 0.10
# max shift of the box centre, fraction of the image (about 1 px at 32, 2.5 px at 64)
POSITION_JITTER = 0.04
SIZE_JITTER = 0.05  # relative
HUE_JITTER_DEG = 8.0  # far below the 30 degree half-distance between palette hues
SUPERSAMPLE = 4

_SYNONYMS = {
    "purple": "magenta",
    "big": "large",
    "tiny": "small",
    "centre": "center",
    "middle": "center",
}
_FILLER_WORDS = {"a", "an", "one", "the", "on", "at", "in", "to", "of", "image", "picture"}


@dataclass(frozen=True)
class SceneObject:
    """One shape. `size` / `position` may be None in a parsed prompt, meaning "any"."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        for name, value, allowed, optional in (
            ("colour", self.colour, COLOURS, False),
            ("shape", self.shape, SHAPES, False),
            ("size", self.size, SIZES, True),
            ("position", self.position, POSITIONS, True),
        ):
            if value is None and optional:
                continue
            if value not in allowed:
                or_none = " or None" if optional else ""
                raise ValueError(
                    f"SceneObject.{name} must be one of {allowed}{or_none}, got {value!r}"
                )

    @property
    def is_complete(self) -> bool:
        return self.size is not None and self.position is not None


@dataclass(frozen=True)
class SceneSpec:
    """What a scene contains: one or two SceneObjects (a list is accepted and stored as a tuple)."""

    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def __post_init__(self):
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"SceneSpec needs 1 or 2 objects, got {len(objects)}")
        for obj in objects:
            if not isinstance(obj, SceneObject):
                raise TypeError(
                    f"SceneSpec.objects must hold SceneObject, got {type(obj).__name__}"
                )
        object.__setattr__(self, "objects", objects)


@dataclass
class ShapesConfig:
    image_size: int = 32
    seed: int = 0
    length: int = 50_000  # samples per epoch; index i always gives the same sample
    two_object_prob: float = 0.3
    jitter: bool = True  # small random shift / size / shade, for training robustness
    heldout_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT_PAIRS

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 24:
            raise ValueError(
                f"image_size must be an int >= 24 (32 and 64 are tested), got {self.image_size!r}"
            )
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob must be in [0, 1], got {self.two_object_prob!r}")
        self.heldout_pairs = tuple(tuple(pair) for pair in self.heldout_pairs)
        _validate_heldout(self.heldout_pairs)


def _validate_heldout(heldout_pairs) -> None:
    if not heldout_pairs:
        raise ValueError("heldout_pairs must name at least one (colour, shape) pair")
    for pair in heldout_pairs:
        if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
            raise ValueError(
                f"held-out pair must be (colour in {COLOURS}, shape in {SHAPES}), got {pair!r}"
            )
    train_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout_pairs]
    # Compositional generalisation needs each held-out word to be seen in training with some other
    # partner.
    for colour, shape in heldout_pairs:
        if not any(c == colour for c, _ in train_pairs) or not any(
            s == shape for _, s in train_pairs
        ):
            raise ValueError(
                f"held-out pair {(colour, shape)} leaves {colour!r} or {shape!r} unseen in training"
            )


# ---------------------------------------------------------------- captions and prompts


def caption_vocabulary() -> dict[str, tuple[str, ...]]:
    """Every word a caption uses, by kind: what a model trained on these captions knows (its card,
    minisd/card.py). The "other words" are those of "a", "and" and the position phrases."""
    phrase_words = {w for phrase in POSITION_PHRASE.values() for w in phrase.split()}
    other = sorted({"a", "and"} | (phrase_words - set(POSITIONS)))
    return {
        "colours": COLOURS,
        "shapes": SHAPES,
        "sizes": SIZES,
        "positions": POSITIONS,
        "other words": tuple(other),
    }



def caption(spec: SceneSpec) -> str:
    """The canonical caption, e.g. "a small red circle on the left and a large blue square on the
    right"."""
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"caption expects a SceneSpec, got {type(spec).__name__}")
    phrases = []
    for obj in spec.objects:
        words = ["a"] + ([obj.size] if obj.size else []) + [obj.colour, obj.shape]
        if obj.position:
            words.append(POSITION_PHRASE[obj.position])
        phrases.append(" ".join(words))
    return " and ".join(phrases)


def parse_prompt(prompt: str) -> SceneSpec:
    """Inverse of `caption`: parse_prompt(caption(spec)) == spec. Size and position may be omitted
    (-> None)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = [_SYNONYMS.get(w, w) for w in re.sub(r"[^a-z ]", " ", prompt.lower()).split()]
    if not words:
        raise ValueError(f"cannot parse empty prompt {prompt!r}")
    chunks, current = [], []
    for word in words:
        if word == "and":
            chunks.append(current)
            current = []
        else:
            current.append(word)
    chunks.append(current)
    if len(chunks) > 2:
        raise ValueError(
            f"cannot parse prompt {prompt!r}: at most 2 objects are supported, got {len(chunks)}"
        )
    return SceneSpec([_parse_object(chunk, prompt) for chunk in chunks])


def _parse_object(words: list[str], prompt: str) -> SceneObject:
    found = {}
    vocab = (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS))
    for word in words:
        if word in _FILLER_WORDS:
            continue
        kind = next((k for k, allowed in vocab if word in allowed), None)
        if kind is None:
            raise ValueError(
                f"cannot parse prompt {prompt!r}: unknown word {word!r}; expected colours "
                f"{COLOURS}, "
                f"shapes {SHAPES}, sizes {SIZES}, positions {POSITIONS} joined by 'and'"
            )
        if kind in found:
            raise ValueError(
                f"cannot parse prompt {prompt!r}: two {kind}s ({found[kind]!r}, {word!r}) for one "
                "object"
            )
        found[kind] = word
    for required in ("colour", "shape"):
        if required not in found:
            raise ValueError(
                f"cannot parse prompt {prompt!r}: the object {' '.join(words)!r} has no {required}"
            )
    return SceneObject(found["colour"], found["shape"], found.get("size"), found.get("position"))


# ---------------------------------------------------------------- sampling


def sample_spec(
    rng: np.random.Generator,
    split: str = "train",
    *,
    two_object_prob: float = 0.3,
    heldout_pairs=DEFAULT_HELDOUT_PAIRS,
) -> SceneSpec:
    """Draw a scene. train/val: no held-out pair anywhere; heldout: at least one object is a
    held-out pair."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    heldout_pairs = tuple(tuple(p) for p in heldout_pairs)
    _validate_heldout(heldout_pairs)
    train_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout_pairs]

    def pick(pairs, position):
        colour, shape = pairs[rng.integers(len(pairs))]
        return SceneObject(colour, shape, SIZES[rng.integers(len(SIZES))], position)

    first_pairs = list(heldout_pairs) if split == "heldout" else train_pairs
    if rng.random() >= two_object_prob:
        return SceneSpec([pick(first_pairs, POSITIONS[rng.integers(len(POSITIONS))])])
    layout = TWO_OBJECT_LAYOUTS[rng.integers(len(TWO_OBJECT_LAYOUTS))]
    if rng.random() < 0.5:
        layout = layout[::-1]
    objects = [pick(first_pairs, layout[0]), pick(train_pairs, layout[1])]
    if rng.random() < 0.5:  # so the held-out object is not always mentioned first
        objects = objects[::-1]
    return SceneSpec(objects)


# ---------------------------------------------------------------- rendering


def shape_mask(
    shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, width: float, height: float
) -> np.ndarray:
    """Boolean mask of `shape` filling the box of size width x height centred at (cx, cy), sampled
    at (xs, ys)."""
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(dx) <= width / 2) & (np.abs(dy) <= height / 2)
    if shape == "circle":
        return (dx / (width / 2)) ** 2 + (dy / (height / 2)) ** 2 <= 1.0
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge: half-width grows linearly from 0 to
        # width / 2.
        depth = (dy + height / 2) / height
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * width / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_coverage(
    shape: str, height: int, width: int, cx: float, cy: float, side: float, supersample: int = 4
) -> np.ndarray:
    """Fraction of each pixel of a (height, width) grid inside the shape (box side `side`, centre
    (cx, cy) in pixels): the mean of the shape's indicator over supersample x supersample sub-pixel
    samples."""
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    inside = shape_mask(shape, xs[None, :], ys[:, None], cx, cy, side, side)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def _hsv_to_rgb(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value))


def _allowed_region(spec: SceneSpec, obj: SceneObject) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) fractions the object's box must stay in: inside the border, and in its own
    half for pairs."""
    lo, hi, mid = BORDER_MARGIN, 1.0 - BORDER_MARGIN, 0.5
    region = {
        "left": (lo, mid - PAIR_GAP / 2, lo, hi),
        "right": (mid + PAIR_GAP / 2, hi, lo, hi),
        "top": (lo, hi, lo, mid - PAIR_GAP / 2),
        "bottom": (lo, hi, mid + PAIR_GAP / 2, hi),
    }
    return region[obj.position] if len(spec.objects) == 2 else (lo, hi, lo, hi)


def render(
    spec: SceneSpec, image_size: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw `spec` as an (image_size, image_size, 3) uint8 image. rng=None: no jitter (canonical
    picture)."""
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"render expects a SceneSpec, got {type(spec).__name__}")
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    if not all(obj.is_complete for obj in spec.objects):
        raise ValueError(f"render needs size and position for every object, got {spec}")
    if len(spec.objects) == 2:
        pair = tuple(sorted(obj.position for obj in spec.objects))
        if pair not in {tuple(sorted(layout)) for layout in TWO_OBJECT_LAYOUTS}:
            raise ValueError(
                f"two objects must be placed {TWO_OBJECT_LAYOUTS} (either order), got {pair}"
            )

    pixels = np.empty((image_size, image_size, 3))
    pixels[:] = np.array(BACKGROUND_RGB) / 255.0
    for obj in spec.objects:
        side = SIZE_FRACTION[obj.size]
        (ax, ay), hue, sat, val = POSITION_ANCHOR[obj.position], COLOUR_HUES[obj.colour], 1.0, 1.0
        if rng is not None:
            side *= 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
            ax += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            ay += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            hue += rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG)
            sat, val = rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)
        x0, x1, y0, y1 = _allowed_region(spec, obj)
        ax = min(max(ax, x0 + side / 2), x1 - side / 2)
        ay = min(max(ay, y0 + side / 2), y1 - side / 2)
        cx, cy, side = ax * image_size, ay * image_size, side * image_size
        # Only the pixels under the shape's box need sub-sampling; objects never overlap, so
        # blending is exact.
        left, top = int(cx - side / 2), int(cy - side / 2)
        right, bottom = int(np.ceil(cx + side / 2)), int(np.ceil(cy + side / 2))
        coverage = shape_coverage(
            obj.shape, bottom - top, right - left, cx - left, cy - top, side, SUPERSAMPLE
        )
        coverage = coverage[..., None]
        window = pixels[top:bottom, left:right]
        window[:] = (1.0 - coverage) * window + coverage * _hsv_to_rgb(hue, sat, val)
    return np.round(pixels * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- torch dataset


class ShapesDataset(Dataset):
    """Item i of a split is (image in [-1, 1], float32, CHW; caption), a pure function of (seed,
    split, i)."""

    def __init__(self, config: ShapesConfig | None = None, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.config = config if config is not None else ShapesConfig()
        self.split = split

    def __len__(self) -> int:
        return self.config.length

    def _rng(self, index: int) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise IndexError(f"index must be an int in [0, {len(self)}), got {index!r}")
        # One independent stream per (seed, split, index): items need no shared state, so workers
        # agree.
        return np.random.default_rng([self.config.seed, SPLITS.index(self.split), int(index)])

    def _spec(self, rng: np.random.Generator) -> SceneSpec:
        return sample_spec(
            rng,
            self.split,
            two_object_prob=self.config.two_object_prob,
            heldout_pairs=self.config.heldout_pairs,
        )

    def spec_at(self, index: int) -> SceneSpec:
        """The scene of item `index` without rendering it (cheap)."""
        return self._spec(self._rng(index))

    def image_at(self, index: int) -> tuple[np.ndarray, SceneSpec]:
        rng = self._rng(index)
        spec = self._spec(rng)
        return render(spec, self.config.image_size, rng if self.config.jitter else None), spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, spec = self.image_at(index)
        tensor = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
        return tensor, caption(spec)
