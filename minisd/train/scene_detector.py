"""Prompt fidelity for the v2 scenes world: does an image show what its prompt says?

A deterministic, hand-written detector (no learned model). Backgrounds are grey (R = G = B) and
objects saturated, so chroma = max − min channel separates them, and a pixel that blends a grey
background with colour c by coverage a has chroma exactly a · chroma(c) (see `scenes`):

1. Foreground = pixels with chroma > 0.3 (an object's chroma is ≥ 0.72); 4-connected components
   smaller than 12 px per 64² are dropped as noise.
2. A component's colour c = mean of its core pixels (chroma ≥ 0.8 × its 90th percentile, free of
   edge blending); name = the palette hue nearest hue(c).
3. Coverage over the component grown by one pixel (other components excluded):
       a(p) = clip((chroma(p) − n) / (chroma(c) − n), 0, 1),   n = median chroma of the background
   (n = 0 on a clean image; noise raises it). Blur and noise leave area A = Σa and the
   coverage-weighted centroid unchanged.
4. Shape: for each shape, the ideal one with the same area and centroid (box side
   s = √(A / fill), a triangle's box centre s/6 above its centroid) is compared with a by soft
   IoU = Σ min(a, ideal) / Σ max(a, ideal), best over a few Gaussian blurs of the ideal; the
   highest IoU wins ("unknown" below 0.5). Size: s / image side against √(0.16 · 0.26), the
   geometric mean of the two sizes. Cell: where the fitted box centre falls in the 3 × 3 grid.
5. Background, from the pixels away from any object (chroma ≤ 0.15, grown by 2 px): the mean
   change of grey level from each row to the next (and column to column), over pixels that are
   background in both; mean |change| > 0.04 along either axis: stripes; else a range of the summed
   changes > 0.35: gradient; else plain, named by its median level (> 0.72 white, < 0.33 black,
   grey between).

score(image, prompt): colour_shape = every object the prompt counts is there (distinct detections
of the right colour and shape); full = `scene_language.satisfies` with the detections: every
stated colour, shape, size, position, relation, count and background, and no extra objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .fidelity import label_components, to_rgb_float
from .scene_language import CELL_POSITIONS, SHAPES, SceneSpec, parse, satisfies
from .scenes import (
    CELLS,
    CENTROID_BELOW_CENTRE,
    COLOUR_HUES,
    FILL_RATIO,
    SIZE_FRACTION,
    SUPERSAMPLE,
    shape_coverage,
)

FOREGROUND_CHROMA = 0.3
MIN_AREA_PER_64 = 12  # pixels of a 64×64 image
MIN_SHAPE_IOU = 0.5
GROW = 2
BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.5)  # pixels; the shape templates are compared at each blur
SIZE_THRESHOLD = float(np.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]))
BACKGROUND_CHROMA = 0.15
STRIPE_STEP, GRADIENT_RANGE = 0.04, 0.35
WHITE_ABOVE, BLACK_BELOW = 0.72, 0.33


@dataclass
class DetectedObject:
    colour: str
    shape: str  # a shape name or "unknown"
    size: str
    cell: tuple  # (row, column)
    area: float  # Σ coverage, pixels
    centroid: tuple  # (x, y) pixels
    side: float  # fitted box side, pixels
    hue: float
    chroma: float
    shape_iou: dict = field(default_factory=dict)

    @property
    def position(self) -> str:
        return CELL_POSITIONS[self.cell]


@dataclass
class Detection:
    objects: list
    background: str


@dataclass
class FidelityResult:
    colour_shape: bool
    full: bool
    details: dict


def chroma_and_hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV chroma (max − min) and hue in degrees of RGB values in [0, 1], element-wise."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 1e-9, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2,
                                                            (r - g) / safe + 4))  # fmt: skip
    return chroma, 60.0 * hue


def nearest_colour(hue: float) -> str:
    def distance(name):
        delta = abs(hue - COLOUR_HUES[name]) % 360.0
        return min(delta, 360.0 - delta)

    return min(COLOUR_HUES, key=distance)


def _grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation with a 3×3 square, `steps` times."""
    height, width = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = np.logical_or.reduce(
            [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        )
    return mask


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, zero outside: B_rows · image · B_colsᵀ, B[i, j] ∝ g(i − j)."""
    if sigma == 0:
        return image
    return _blur_matrix(image.shape[0], sigma) @ image @ _blur_matrix(image.shape[1], sigma).T


@functools.lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    total = np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()
    return np.exp(-0.5 * (offsets / sigma) ** 2) / total


def fit_shape(shape: str, alpha: np.ndarray, area: float, centroid) -> tuple[float, float, tuple]:
    """(soft IoU, side, box centre) of the ideal `shape` with the blob's area and centroid."""
    side = float(np.sqrt(area / FILL_RATIO[shape]))
    cx, cy = centroid[0], centroid[1] - CENTROID_BELOW_CENTRE.get(shape, 0.0) * side
    height, width = alpha.shape
    margin = side / 2 + 4
    x0, x1 = max(int(cx - margin), 0), min(int(cx + margin) + 1, width)
    y0, y1 = max(int(cy - margin), 0), min(int(cy + margin) + 1, height)
    sharp = shape_coverage(shape, y1 - y0, x1 - x0, cx - x0, cy - y0, side, SUPERSAMPLE)
    window = alpha[y0:y1, x0:x1]
    outside = area - float(window.sum())  # blob mass outside the window counts against the fit
    best = 0.0
    for sigma in BLUR_SIGMAS:
        ideal = _blur(sharp, sigma)
        best = max(best, float(np.minimum(window, ideal).sum() /
                               (np.maximum(window, ideal).sum() + outside)))  # fmt: skip
    return best, side, (cx, cy)


def detect_background(rgb: np.ndarray, chroma: np.ndarray) -> str:
    """white / grey / black / gradient / stripes, from the pixels away from objects."""
    grey = rgb.mean(axis=-1)
    away = ~_grow(chroma > BACKGROUND_CHROMA, 2)
    if away.sum() < 0.1 * away.size:
        return "unknown"
    steps, ranges = [], []
    for axis in (0, 1):  # axis 0: how the grey level changes from row to row (along y)
        g, a = (grey, away) if axis == 0 else (grey.T, away.T)
        # mean change between neighbouring rows over the columns where both rows are background:
        # comparing the same columns keeps objects and a change along the other axis out of it
        both = a[1:] & a[:-1]
        pairs = both.sum(axis=1)
        step = np.where(both, g[1:] - g[:-1], 0.0).sum(axis=1) / np.maximum(pairs, 1)
        profile = np.cumsum(step)
        steps.append(float(np.abs(step).mean()))
        ranges.append(float(profile.max() - profile.min()))
    if max(steps) > STRIPE_STEP:
        return "stripes"
    if max(ranges) > GRADIENT_RANGE:
        return "gradient"
    level = float(np.median(grey[away]))
    return "white" if level > WHITE_ABOVE else "black" if level < BLACK_BELOW else "grey"


def detect(image, value_range="auto") -> Detection:
    """The objects (largest first) and the background of an image (types: fidelity.to_rgb_float)."""
    rgb = to_rgb_float(image, value_range)
    height, width, _ = rgb.shape
    chroma, hue = chroma_and_hue(rgb)
    labels, count = label_components(chroma > FOREGROUND_CHROMA)
    noise_floor = float(np.median(chroma[~_grow(labels > 0, 2)])) if (labels == 0).any() else 0.0
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    image_side = float(np.sqrt(height * width))
    objects = []
    for label in range(1, count + 1):
        component = labels == label
        if component.sum() < MIN_AREA_PER_64 * height * width / 64**2:
            continue
        core = component & (chroma >= 0.8 * np.percentile(chroma[component], 90))
        colour_rgb = rgb[core].mean(axis=0)
        core_chroma, core_hue = (float(v) for v in chroma_and_hue(colour_rgb))
        region = _grow(component, GROW) & ((labels == 0) | component)
        scale = max(core_chroma - noise_floor, 1e-6)
        alpha = np.clip((chroma - noise_floor) / scale, 0.0, 1.0) * region
        area = float(alpha.sum())
        if area < 1.0:
            continue
        centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
        fits = {shape: fit_shape(shape, alpha, area, centroid) for shape in SHAPES}
        best = max(fits, key=lambda shape: fits[shape][0])
        iou, side, (cx, cy) = fits[best]
        cell = (min(max(int(cy / height * CELLS), 0), CELLS - 1),
                min(max(int(cx / width * CELLS), 0), CELLS - 1))  # fmt: skip
        objects.append(DetectedObject(
            nearest_colour(core_hue), best if iou >= MIN_SHAPE_IOU else "unknown",
            "small" if side / image_side < SIZE_THRESHOLD else "large", cell, area, centroid,
            side, core_hue, core_chroma, {shape: fit[0] for shape, fit in fits.items()},
        ))  # fmt: skip
    objects.sort(key=lambda o: -o.area)
    return Detection(objects, detect_background(rgb, chroma))


def score(image, prompt, value_range="auto") -> FidelityResult:
    """Score one image against a prompt (str, parsed by `scene_language.parse`, or a SceneSpec)."""
    spec = prompt if isinstance(prompt, SceneSpec) else parse(prompt)
    found = detect(image, value_range)
    colour_shape = satisfies(found.objects, spec, exact=False, colour_shape_only=True)
    full = satisfies(found.objects, spec, found.background)
    if full:
        reason = "match"
    elif not colour_shape:
        reason = "an object of the requested colour and shape is missing"
    elif spec.background not in (None, found.background):
        reason = f"background is {found.background}, not {spec.background}"
    elif len(found.objects) != spec.count:
        reason = f"{len(found.objects)} objects detected, {spec.count} requested"
    else:
        reason = "colours and shapes found, but a size, position or relation differs"
    return FidelityResult(colour_shape, full, {"spec": spec, "detection": found,
                                               "reason": reason})  # fmt: skip


def evaluate(images, prompts, value_range="auto") -> dict:
    """Rates over a set of images (a sequence, an (N, 3, H, W) tensor or (N, H, W, 3) array)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str, one per image, not a single str")
    prompts = list(prompts)
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image and at least one: got {len(images)} images, "
                         f"{len(prompts)} prompts")  # fmt: skip
    results = [score(image, prompt, value_range) for image, prompt in zip(images, prompts)]
    count = len(results)
    colour_shape, full = sum(r.colour_shape for r in results), sum(r.full for r in results)
    return {"colour_shape": colour_shape / count, "full": full / count,
            "colour_shape_count": colour_shape, "full_count": full, "count": count}  # fmt: skip
