"""The v2 procedural world: 64×64 scenes of 1–3 objects on a background, with exact captions.

The words and what captions mean are in `scene_language`; this file holds the geometry, the
sampling rules, the held-out splits, the renderer and the torch Dataset.

Geometry (every length a fraction of the image side; y grows downwards):
    cells        the image is a 3 × 3 grid; each object sits in its own cell (row, column), the
                 cell its caption position names ("top left" = (0, 0), "center" = (1, 1), ...)
    box          each object fills a square box of side s = 0.16 (small) or 0.26 (large), times
                 1 ± 4% jitter; the box keeps a margin of 1/64 inside its cell, so objects
                 never touch (≥ 2 px apart at 64 px) and never touch the image border
    shapes, in box coordinates (u, v) ∈ [-1, 1]² (v down), with their area / box area ("fill"):
        circle     u² + v² ≤ 1                                        fill π/4
        square     |u| ≤ 1, |v| ≤ 1                                   fill 1
        triangle   apex up: |u| ≤ (v + 1)/2                           fill 1/2  (centroid s/6 below
                                                                                 the box centre)
        ring       ρ² ≤ u² + v² ≤ 1, ρ = 0.5 (concave: a hole)        fill π/4 · (1 − ρ²)
        cross      |u| ≤ w or |v| ≤ w (inside the box), w = 0.36      fill 2w − w²
        star       5 points: outer radius 1 (a point straight up), inner radius ρ* = 0.45,
                   vertices every 36° (concave)                       fill 5/4 · ρ* · sin 36°
    colours      HSV hue (degrees) red 0, orange 30, yellow 60, green 120, cyan 180, blue 240,
                 purple 280, pink 320; saturation and value in [0.85, 1]; hue ± 5° jitter (half the
                 closest pair's distance is 15°)
    backgrounds  achromatic (R = G = B), so an object's colour is never confused with it:
                 white (level 0.88–0.96), grey (0.50–0.60), black (0.08–0.16); gradient: from
                 0.85–0.95 to 0.15–0.25 along x or y, either way; stripes: bands of 0.80–0.90
                 and 0.40–0.50, each 1/16 of the image wide, along x or y, any phase

Rendering is supersampled as v1 (`shapes_dataset`): a pixel blends background b and colour c by
the object's coverage a, the fraction of S × S sub-pixel samples inside the shape:
    pixel = (1 − a) · b + a · c,   so  chroma(pixel) = max − min channel = a · chroma(c)
(b is grey), which is what the detector measures. An image is a pure function of the Scene.

Sampling (train and val: the same distribution, different random streams): 1, 2 or 3 objects
(p = 0.4, 0.35, 0.25); groups of identical objects (same colour, shape and size) make counts:
2 objects = 1 + 1 or a pair (p = 0.3); 3 = 1 + 1 + 1 (0.5), 2 + 1 (0.3) or three of a kind
(0.2); distinct groups differ in colour or shape; cells are distinct and uniform. A scene of
two single objects is described by a relation that holds (p = 0.5, in a random order) or by their
positions. Training captions loosen the full description (`loosen`): a caption leaves out sizes,
colours, positions, the relation or the background the way people do.

Held out (never in a train or val scene or caption; every heldout-split scene has one):
    colour–shape pairs   red ring, blue star, green triangle, yellow cross, purple circle,
                         orange square (each colour and shape is still trained with others)
    count–shape          three stars, two rings (of any colour)
    relation–shapes      "circle above square", "triangle left of cross" (and their converses,
                         "square below circle", "cross right of triangle"), as captions
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from .scene_language import (
    BACKGROUNDS,
    COLOURS,
    CONVERSE,
    POSITION_CELLS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    caption,
    cell_relation_holds,
)

COLOUR_HUES = {"red": 0.0, "orange": 30.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0,
               "blue": 240.0, "purple": 280.0, "pink": 320.0}  # fmt: skip
SIZE_FRACTION = {"small": 0.16, "large": 0.26}
RING_INNER, CROSS_ARM, STAR_INNER = 0.5, 0.36, 0.45
FILL_RATIO = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "ring": np.pi / 4 * (1 - RING_INNER**2),
    "cross": 2 * CROSS_ARM - CROSS_ARM**2,
    "star": 5 / 4 * STAR_INNER * np.sin(np.pi / 5),
}
CENTROID_BELOW_CENTRE = {"triangle": 1 / 6}  # × side; every other shape's centroid is its centre
CELLS = 3
CELL_MARGIN = 1 / 64
SIZE_JITTER, HUE_JITTER_DEG = 0.04, 5.0
STRIPE_WIDTH = 1 / 16
SUPERSAMPLE = 4
BACKGROUND_LEVELS = {"white": (0.88, 0.96), "grey": (0.50, 0.60), "black": (0.08, 0.16)}

HELDOUT_PAIRS = (("red", "ring"), ("blue", "star"), ("green", "triangle"), ("yellow", "cross"),
                 ("purple", "circle"), ("orange", "square"))  # fmt: skip
HELDOUT_COUNTS = ((3, "star"), (2, "ring"))
HELDOUT_RELATIONS = (("circle", "above", "square"), ("triangle", "left of", "cross"))
SPLITS = ("train", "val", "heldout")
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is (words) and exactly where (fractions of the image side)."""

    colour: str
    shape: str
    size: str
    cell: tuple  # (row, column)
    cx: float  # box centre
    cy: float
    side: float
    hue: float  # degrees
    saturation: float = 1.0
    value: float = 1.0


@dataclass(frozen=True)
class Background:
    """kind in BACKGROUNDS; levels: grey level(s) in [0, 1]; axis 0 = along y (rows), 1 = along x;
    phase: stripes' offset, a fraction of the image side."""

    kind: str
    levels: tuple
    axis: int = 0
    phase: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple


# ---------------------------------------------------------------- held-out rules


def _relation_heldout(shape_a: str, relation: str, shape_b: str) -> bool:
    return (shape_a, relation, shape_b) in HELDOUT_RELATIONS or (
        shape_b, CONVERSE[relation], shape_a) in HELDOUT_RELATIONS  # fmt: skip


def is_heldout(spec: SceneSpec) -> bool:
    """Does a description state a held-out pair, count-shape or relation (module docstring)?"""
    objects = spec.objects
    if any((o.colour, o.shape) in HELDOUT_PAIRS or (o.count, o.shape) in HELDOUT_COUNTS
           for o in objects):  # fmt: skip
        return True
    return spec.relation is not None and _relation_heldout(
        objects[0].shape, spec.relation, objects[1].shape
    )


# ---------------------------------------------------------------- sampling


def _groups_layout(rng, kind):
    """Counts of the groups, e.g. [2, 1]; the forced held-out element (kind) shapes it."""
    if kind == "count":
        count, _ = HELDOUT_COUNTS[rng.integers(len(HELDOUT_COUNTS))]
        return [count] if count == 3 or rng.random() < 0.5 else [count, 1]
    if kind == "relation":
        return [1, 1]
    n = 1 + int(rng.choice(3, p=(0.4, 0.35, 0.25)))
    if n == 1:
        return [1]
    if n == 2:
        return [2] if rng.random() < 0.3 else [1, 1]
    return [[1, 1, 1], [2, 1], [3]][rng.choice(3, p=(0.5, 0.3, 0.2))]


def _pick_pairs(rng, counts, split, kind):
    """A (colour, shape) per group, distinct; None when the draw breaks a rule (draw again)."""
    pairs = []
    for i, count in enumerate(counts):
        allowed = HELDOUT_PAIRS if (kind == "pair" and i == 0) else TRAIN_PAIRS
        if kind == "count" and i == 0:
            shape = next(s for c, s in HELDOUT_COUNTS if c == count)
            allowed = [p for p in TRAIN_PAIRS if p[1] == shape]
        pairs.append(tuple(allowed[rng.integers(len(allowed))]))
        if split != "heldout" and (count, pairs[-1][1]) in HELDOUT_COUNTS:
            return None
        if kind == "count" and i > 0 and (count, pairs[-1][1]) in HELDOUT_COUNTS:
            return None
    return pairs if len(set(pairs)) == len(pairs) else None


def sample_scene(rng: np.random.Generator, split: str = "train", jitter: bool = True):
    """(Scene, its full description SceneSpec): every object's colour, shape, size and position
    (or the relation), every count and the background. jitter=False: nominal sizes, hues and cell
    centres (the scene's words are drawn the same way)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind = ("pair", "count", "relation")[rng.integers(3)] if split == "heldout" else None
    while True:
        counts = _groups_layout(rng, kind)
        if kind == "relation":
            shape_a, forced, shape_b = HELDOUT_RELATIONS[rng.integers(len(HELDOUT_RELATIONS))]
            pairs = [next(p for p in _shuffled(rng, TRAIN_PAIRS) if p[1] == s)
                     for s in (shape_a, shape_b)]  # fmt: skip
        else:
            pairs = _pick_pairs(rng, counts, split, kind)
        if pairs is not None:
            break
    sizes = [SIZES[rng.integers(len(SIZES))] for _ in counts]
    cells = [divmod(int(c), CELLS) for c in rng.permutation(CELLS * CELLS)[: sum(counts)]]
    if kind == "relation":
        while not cell_relation_holds(forced, cells[0], cells[1]):
            cells = [divmod(int(c), CELLS) for c in rng.permutation(CELLS * CELLS)[:2]]
    groups = [(pair, size, count) for pair, size, count in zip(pairs, sizes, counts)]
    instances = [(pair, size) for pair, size, count in groups for _ in range(count)]
    objects = tuple(_place(rng, pair, size, cell, jitter) for (pair, size), cell in
                    zip(instances, cells))  # fmt: skip
    background = _sample_background(rng)

    # The full description: groups in a random order; two singles by a relation or by positions.
    position_of = {cell: name for name, cell in POSITION_CELLS.items()}
    specs = []
    start = 0
    for (colour, shape), size, count in groups:
        position = position_of[cells[start]] if count == 1 else None
        specs.append(ObjectSpec(shape, colour, size, position, count))
        start += count
    relation = None
    if kind == "relation":
        relation = forced  # the held-out relation, A first
    elif counts == [1, 1] and rng.random() < 0.5:
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        true = [r for r in RELATIONS if cell_relation_holds(r, cells[order[0]], cells[order[1]])]
        candidate = true[rng.integers(len(true))]
        shapes = [specs[i].shape for i in order]
        if not _relation_heldout(shapes[0], candidate, shapes[1]):
            specs, relation = [specs[i] for i in order], candidate
    if relation is not None:
        specs = [replace(s, position=None) for s in specs]
        if kind == "relation" and rng.random() < 0.5:  # say it either way round
            specs, relation = specs[::-1], CONVERSE[relation]
    else:
        specs = _shuffled(rng, specs)
    return Scene(background, objects), SceneSpec(tuple(specs), relation, background.kind)


def _shuffled(rng, items):
    return [items[i] for i in rng.permutation(len(items))]


def _place(rng, pair, size, cell, jitter: bool) -> SceneObject:
    colour, shape = pair
    side, hue, saturation, value = SIZE_FRACTION[size], COLOUR_HUES[colour], 1.0, 1.0
    row, col = cell
    cx, cy = (col + 0.5) / CELLS, (row + 0.5) / CELLS
    if jitter:
        side *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        free = (1 / CELLS - side) / 2 - CELL_MARGIN  # how far the box may move from the centre
        cx, cy = cx + rng.uniform(-free, free), cy + rng.uniform(-free, free)
        hue += rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG)
        saturation, value = rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)
    return SceneObject(colour, shape, size, tuple(cell), cx, cy, side, hue % 360, saturation,
                       value)  # fmt: skip


def _sample_background(rng) -> Background:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    axis = int(rng.integers(2))
    if kind in BACKGROUND_LEVELS:
        return Background(kind, (rng.uniform(*BACKGROUND_LEVELS[kind]),))
    if kind == "gradient":
        ends = (rng.uniform(0.85, 0.95), rng.uniform(0.15, 0.25))
        return Background(kind, ends if rng.random() < 0.5 else ends[::-1], axis)
    phase = float(rng.integers(16)) / 64  # whole pixels at 64 px
    return Background(kind, (rng.uniform(0.8, 0.9), rng.uniform(0.4, 0.5)), axis, phase)


def loosen(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """A caption as people write it: the full description with details left out, at random.

    30% stay full; otherwise each size is left out with p = 0.4, each colour with p = 0.1, the
    positions with p = 0.4 (all of them) or 0.2 (each), the relation with p = 0.3, and the
    background is kept with p = 0.35.
    """
    if rng.random() < 0.3:
        return spec
    drop_positions = rng.random() < 0.4
    objects = tuple(
        replace(o, size=None if rng.random() < 0.4 else o.size,
                colour=None if rng.random() < 0.1 else o.colour,
                position=None if drop_positions or rng.random() < 0.2 else o.position)
        for o in spec.objects
    )  # fmt: skip
    relation = None if rng.random() < 0.3 else spec.relation
    background = spec.background if rng.random() < 0.35 else None
    return SceneSpec(objects, relation, background)


# ---------------------------------------------------------------- rendering


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Is (u, v), in box coordinates [-1, 1]² with v down, inside `shape`? (module docstring)"""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
    if shape == "ring":
        radius2 = u * u + v * v
        return (radius2 <= 1.0) & (radius2 >= RING_INNER**2)
    if shape == "cross":
        inside_box = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
        return inside_box & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    if shape == "star":
        # Vertex k at angle 36°·k clockwise from straight up, radius 1 (k even) or ρ* (k odd). A
        # point at angle φ lies in the wedge between vertices k = ⌊φ / 36°⌋ and k + 1; it is inside
        # when it is on the centre's side of the edge joining them.
        k_all = np.arange(10)
        radii = np.where(k_all % 2 == 0, 1.0, STAR_INNER)
        vx, vy = radii * np.sin(k_all * np.pi / 5), -radii * np.cos(k_all * np.pi / 5)
        phi = np.arctan2(u, -v) % (2 * np.pi)
        k = np.minimum((phi // (np.pi / 5)).astype(int), 9)
        ax, ay, bx, by = vx[k], vy[k], vx[(k + 1) % 10], vy[(k + 1) % 10]
        side_of_point = (bx - ax) * (v - ay) - (by - ay) * (u - ax)
        side_of_centre = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
        return side_of_point * side_of_centre >= 0
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_coverage(shape, height, width, cx, cy, side, supersample=SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of a (height, width) grid inside the shape whose box (side `side`,
    centre (cx, cy), in pixels) is given: the mean over supersample² sub-pixel samples."""
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    inside = shape_mask(shape, (xs[None, :] - cx) / (side / 2), (ys[:, None] - cy) / (side / 2))
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def render_background(background: Background, image_size: int) -> np.ndarray:
    """(image_size, image_size) grey levels in [0, 1]."""
    t = (np.arange(image_size * SUPERSAMPLE) + 0.5) / (image_size * SUPERSAMPLE)  # sub-samples
    if background.kind in BACKGROUND_LEVELS:
        profile = np.full(t.shape, background.levels[0])
    elif background.kind == "gradient":
        start, end = background.levels
        profile = start + (end - start) * t
    elif background.kind == "stripes":
        light, dark = background.levels
        band = np.floor((t + background.phase) / STRIPE_WIDTH) % 2
        profile = np.where(band == 0, light, dark)
    else:
        raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {background.kind!r}")
    profile = profile.reshape(image_size, SUPERSAMPLE).mean(axis=1)
    if background.axis == 0:  # varies along y: one value per row
        return np.repeat(profile[:, None], image_size, axis=1)
    return np.repeat(profile[None, :], image_size, axis=0)


def object_rgb(obj: SceneObject) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(obj.hue / 360.0, obj.saturation, obj.value))


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Draw a Scene as an (image_size, image_size, 3) uint8 image."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32 (64 is the world's size), "
                         f"got {image_size!r}")  # fmt: skip
    pixels = np.repeat(render_background(scene.background, image_size)[..., None], 3, axis=2)
    for obj in scene.objects:
        cx, cy, side = obj.cx * image_size, obj.cy * image_size, obj.side * image_size
        left, top = int(cx - side / 2), int(cy - side / 2)
        right, bottom = int(np.ceil(cx + side / 2)), int(np.ceil(cy + side / 2))
        coverage = shape_coverage(obj.shape, bottom - top, right - left, cx - left, cy - top,
                                  side)[..., None]  # fmt: skip
        window = pixels[top:bottom, left:right]
        window[:] = (1.0 - coverage) * window + coverage * object_rgb(obj)
    return np.round(pixels * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- torch dataset


@dataclass
class ScenesConfig:
    image_size: int = 64
    seed: int = 0
    length: int = 50_000  # items per epoch; item i is always the same
    jitter: bool = True
    synonym_prob: float = 0.25  # how often a caption word is replaced by a synonym

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {self.image_size!r}")
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")


@dataclass(frozen=True)
class SceneItem:
    image: np.ndarray  # uint8 (H, W, 3)
    scene: Scene
    spec: SceneSpec  # the full description
    caption_spec: SceneSpec  # what the training caption says (loosened)
    caption: str


class ScenesDataset(Dataset):
    """Item i of a split: (image in [-1, 1], float32, CHW; caption), a pure function of (seed,
    split, i). `item(i)` gives everything (scene, full description, caption)."""

    def __init__(self, config: ScenesConfig | None = None, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.config = config if config is not None else ScenesConfig()
        self.split = split

    def __len__(self) -> int:
        return self.config.length

    def _rng(self, index: int) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise IndexError(f"index must be an int in [0, {len(self)}), got {index!r}")
        # one independent stream per (seed, split, index); the trailing 2 sets v2 apart from v1
        return np.random.default_rng([self.config.seed, SPLITS.index(self.split), int(index), 2])

    def spec_at(self, index: int) -> SceneSpec:
        """The full description of item `index`, without rendering it."""
        return sample_scene(self._rng(index), self.split, self.config.jitter)[1]

    def item(self, index: int) -> SceneItem:
        rng = self._rng(index)
        scene, spec = sample_scene(rng, self.split, self.config.jitter)
        caption_spec = loosen(spec, rng)
        text = caption(caption_spec, rng, self.config.synonym_prob)
        return SceneItem(render(scene, self.config.image_size), scene, spec, caption_spec, text)

    def image_and_caption(self, index: int) -> tuple[np.ndarray, str]:
        item = self.item(index)
        return item.image, item.caption

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, text = self.image_and_caption(index)
        tensor = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
        return tensor, text
