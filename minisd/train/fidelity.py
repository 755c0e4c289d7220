"""Prompt fidelity: does an image of the shapes dataset show what its prompt asks for?

A deterministic, hand-written detector (no learned model), tolerant of the blur and noise of
generated images:

1. Background b = median colour of the border pixels. A pixel p is foreground when ||p - b|| > 0.25
   (RGB in [0, 1]).
2. Foreground pixels are grouped into 4-connected components (a numpy label propagation, below);
   components smaller than 1% of the image are dropped as noise.
3. Each component's colour c is the mean of its "core" pixels (those farthest from b, free of edge
   blending); every pixel of the component, grown by one pixel, then gets a coverage
       alpha(p) = clip( <p - b, c - b> / ||c - b||^2, 0, 1 ),
   i.e. how far p lies along the line from background to object colour (blurred edges give 0 < alpha
   < 1). Blur and noise leave the blob's area A = sum(alpha) and centroid (coverage-weighted mean
   position) unchanged.
4. colour   = palette colour whose hue is nearest to hue(c), or "unknown" when saturation(c) < 0.3;
   shape    = for each of circle, square, triangle, the ideal shape with the same area and centroid
              (box side s = sqrt(A / fill_ratio), fill ratios pi/4, 1, 1/2; a triangle's box centre
              is s/6 above its centroid) is compared with alpha by soft IoU = sum(min(alpha, ideal))
              / sum(max(alpha, ideal)), taking the best over a few Gaussian blurs of the ideal; the
              highest IoU wins ("unknown" below 0.6);
   size     = s as a fraction of the image side, compared with sqrt(0.25 * 0.40), the geometric mean
              of the small and large sides;
   position = from the fitted box centre's offset (ox, oy) to the image centre: "center" if both are
              < 1/8, else the dominant axis decides left / right / top / bottom.

score(image, prompt): colour_shape is True when every prompt object is matched by a distinct
detection of the same colour and shape; full additionally needs size and position to match (a prompt
that omits them accepts any) and no extra objects in the image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from minisd.train.shapes_dataset import (
    COLOUR_HUES,
    FILL_RATIO,
    SHAPES,
    SIZE_FRACTION,
    SUPERSAMPLE,
    SceneSpec,
    parse_prompt,
    shape_coverage,
)

FOREGROUND_DISTANCE = 0.25
MIN_AREA_FRACTION = 0.01
MIN_SATURATION = 0.3
MIN_SHAPE_IOU = 0.6
# pixels; the shape templates are compared at each of these blurs
BLUR_SIGMAS = (0.0, 0.6, 1.0, 1.5)
CENTER_RADIUS = 0.125  # half-way between the centre anchor (0.5) and the side anchors (0.25 / 0.75)
SIZE_THRESHOLD = float(np.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]))


@dataclass
class DetectedObject:
    colour: str  # palette name or "unknown"
    shape: str  # circle / square / triangle or "unknown"
    size: str  # small / large
    position: str  # left / right / top / bottom / center
    area: float  # sum of coverage alpha, in pixels
    centroid: tuple[float, float]  # (x, y) in pixels, coverage-weighted
    # (x0, y0, x1, y1) in pixels, inclusive, of the alpha >= 0.5 mask
    bbox: tuple[int, int, int, int]
    hue: float = 0.0
    saturation: float = 0.0
    shape_iou: dict = field(default_factory=dict)


@dataclass
class FidelityResult:
    colour_shape: bool
    full: bool
    details: dict


# ---------------------------------------------------------------- input conversion


def to_rgb_float(image, value_range="auto") -> np.ndarray:
    """Any supported image -> float64 (H, W, 3) in [0, 1].

    Accepted: numpy uint8 (H, W, 3); numpy float (H, W, 3); PIL image (any mode, converted to RGB);
    torch tensor (3, H, W), uint8 or float. Float inputs use `value_range`: (-1, 1), (0, 1), or
    "auto", which takes (-1, 1) when any value is below -0.1 and (0, 1) otherwise (a saturated
    colour in [-1, 1] has a channel near -1). Values a little outside the range (generated images
    overshoot) are clipped; far outside raises ValueError.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"a torch image must be (3, H, W); got shape {tuple(image.shape)} "
                "(for a batch, call evaluate or loop over images)"
            )
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(f"a torch image must be uint8 or floating, got {image.dtype}")
        image = image.detach().to(
            "cpu", torch.uint8 if image.dtype == torch.uint8 else torch.float32
        )
        image = image.permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a numpy array, PIL image or torch tensor, got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a numpy image must be (H, W, 3); got shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image is too small to analyse: {image.shape[:2]}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"image dtype must be uint8 or floating, got {image.dtype}")
    image = image.astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    if value_range == "auto":
        # Below -0.1 is beyond the overshoot a [0, 1] image may have; a [-1, 1] image with any
        # saturated colour is.
        value_range = (-1.0, 1.0) if image.min() < -0.1 else (0.0, 1.0)
    if isinstance(value_range, list):
        value_range = tuple(value_range)
    if value_range not in ((-1, 1), (0, 1)):
        raise ValueError(f"value_range must be 'auto', (-1, 1) or (0, 1), got {value_range!r}")
    low, high = value_range
    slack = 0.1 * (high - low)
    if image.min() < low - slack or image.max() > high + slack:
        raise ValueError(
            f"float image values [{image.min():.3g}, {image.max():.3g}] are outside the expected "
            "range "
            f"{value_range} (images in 0..255 should be uint8)"
        )
    return np.clip((image - low) / (high - low), 0.0, 1.0)


# ---------------------------------------------------------------- connected components


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: (labels with 0 = background and 1..n, n).

    Every foreground pixel starts with its own id (flat index + 1); each pass takes the minimum id
    over the pixel and its foreground neighbours, then follows ids as pointers (the pixel whose id
    is L holds a smaller or equal id in the same component), which shortens long chains. At the
    fixed point a component holds one id: its smallest.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape
    none = height * width + 1  # larger than every id, so background never wins a minimum
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        neighbour_min = np.minimum.reduce(
            [
                padded[1:-1, 1:-1],
                padded[:-2, 1:-1],
                padded[2:, 1:-1],
                padded[1:-1, :-2],
                padded[1:-1, 2:],
            ]
        )
        updated = np.where(mask, neighbour_min, none)
        flat = updated.ravel()
        updated[mask] = flat[updated[mask] - 1]  # pointer jump
        if np.array_equal(updated, labels):
            break
        labels = updated
    ids = np.unique(labels[mask])
    out = np.zeros((height, width), dtype=np.int64)
    out[mask] = np.searchsorted(ids, labels[mask]) + 1
    return out, len(ids)


# ---------------------------------------------------------------- detection


def _hue_saturation(rgb: np.ndarray) -> tuple[float, float]:
    """HSV hue in degrees and saturation (max - min) / max of one RGB colour in [0, 1]."""
    r, g, b = rgb
    high, low = max(r, g, b), min(r, g, b)
    chroma = high - low
    if chroma <= 1e-9:
        return 0.0, 0.0
    if high == r:
        hue = 60.0 * (((g - b) / chroma) % 6.0)
    elif high == g:
        hue = 60.0 * ((b - r) / chroma + 2.0)
    else:
        hue = 60.0 * ((r - g) / chroma + 4.0)
    return hue, chroma / high


def _nearest_colour(hue: float) -> str:
    def circular_distance(name):
        delta = abs(hue - COLOUR_HUES[name]) % 360.0
        return min(delta, 360.0 - delta)

    return min(COLOUR_HUES, key=circular_distance)


def _position(offset_x: float, offset_y: float) -> str:
    if max(abs(offset_x), abs(offset_y)) < CENTER_RADIUS:
        return "center"
    if abs(offset_x) >= abs(offset_y):
        return "left" if offset_x < 0 else "right"
    return "top" if offset_y < 0 else "bottom"


def _grow(mask: np.ndarray) -> np.ndarray:
    """Mask plus its 8 neighbours (binary dilation with a 3x3 square)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.logical_or.reduce(
        [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    )


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, zero outside the image: B_rows @ image @ B_cols^T with B[i, j] = g(i
    - j)."""
    if sigma == 0:
        return image

    def blur_matrix(n: int) -> np.ndarray:
        offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
        normaliser = np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()
        return np.exp(-0.5 * (offsets / sigma) ** 2) / normaliser

    return blur_matrix(image.shape[0]) @ image @ blur_matrix(image.shape[1]).T


def _fit_shape(
    shape: str, alpha: np.ndarray, area: float, centroid
) -> tuple[float, float, float, float]:
    """Place the ideal `shape` with the same area and centroid as the blob: (soft IoU, side, box cx,
    box cy).

    side = sqrt(area / fill_ratio); a triangle's centroid lies side/6 below its box centre, a
    circle's and a square's at it (blur keeps both area and centroid). Soft IoU = sum(min(alpha,
    ideal)) / sum(max(alpha, ideal)), on a window around the blob, best over a few blur widths,
    because a blurred square looks like a sharp circle but still like a blurred square.
    """
    side = float(np.sqrt(area / FILL_RATIO[shape]))
    box_cx, box_cy = centroid[0], centroid[1] - (side / 6 if shape == "triangle" else 0.0)
    height, width = alpha.shape
    margin = side / 2 + 4
    x0, x1 = max(int(box_cx - margin), 0), min(int(box_cx + margin) + 1, width)
    y0, y1 = max(int(box_cy - margin), 0), min(int(box_cy + margin) + 1, height)
    sharp = shape_coverage(shape, y1 - y0, x1 - x0, box_cx - x0, box_cy - y0, side, SUPERSAMPLE)
    window = alpha[y0:y1, x0:x1]
    # blob mass outside the window still counts against the fit
    outside = area - float(window.sum())
    best_iou = 0.0
    for sigma in BLUR_SIGMAS:
        ideal = _gaussian_blur(sharp, sigma)
        iou = np.minimum(window, ideal).sum() / (np.maximum(window, ideal).sum() + outside)
        best_iou = max(best_iou, float(iou))
    return best_iou, side, box_cx, box_cy


def detect(image, value_range="auto") -> list[DetectedObject]:
    """Objects in the image, largest first. See `to_rgb_float` for the accepted image types."""
    rgb = to_rgb_float(image, value_range)
    height, width, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    difference = rgb - background
    distance = np.linalg.norm(difference, axis=-1)
    labels, count = label_components(distance > FOREGROUND_DISTANCE)
    image_side = np.sqrt(height * width)
    ys, xs = np.mgrid[0:height, 0:width]

    objects = []
    for label in range(1, count + 1):
        component = labels == label
        if component.sum() < MIN_AREA_FRACTION * height * width:
            continue
        # Core = the component's pixels farthest from the background: free of edge blending with the
        # background.
        core = component & (distance >= 0.7 * np.percentile(distance[component], 90))
        colour_rgb = rgb[core].mean(axis=0)
        hue, saturation = (float(v) for v in _hue_saturation(colour_rgb))
        colour = _nearest_colour(hue) if saturation >= MIN_SATURATION else "unknown"

        # Coverage is summed over the component grown by one pixel, so faint blurred edges still
        # count.
        region = _grow(component) & ((labels == 0) | component)
        direction = colour_rgb - background
        alpha = (
            np.clip(difference @ direction / max(direction @ direction, 1e-9), 0.0, 1.0) * region
        )
        area = float(alpha.sum())
        if area < 1.0:  # colour indistinguishable from the background: nothing to measure
            continue
        centroid = (
            float((alpha * (xs + 0.5)).sum() / area),
            float((alpha * (ys + 0.5)).sum() / area),
        )
        fits = {name: _fit_shape(name, alpha, area, centroid) for name in SHAPES}
        best = max(fits, key=lambda name: fits[name][0])
        shape = best if fits[best][0] >= MIN_SHAPE_IOU else "unknown"
        _, side, box_cx, box_cy = fits[best]

        size = "small" if side / image_side < SIZE_THRESHOLD else "large"
        position = _position(box_cx / width - 0.5, box_cy / height - 0.5)
        rows, cols = np.nonzero(alpha >= 0.5)
        bbox = (
            (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
            if rows.size
            else (0, 0, -1, -1)
        )
        objects.append(
            DetectedObject(
                colour,
                shape,
                size,
                position,
                area,
                centroid,
                bbox,
                hue,
                saturation,
                {name: fit[0] for name, fit in fits.items()},
            )
        )
    return sorted(objects, key=lambda o: -o.area)


# ---------------------------------------------------------------- scoring


def _matches(wanted, found: DetectedObject, attributes) -> bool:
    return all(
        getattr(wanted, a) is None or getattr(wanted, a) == getattr(found, a) for a in attributes
    )


def score(image, prompt, value_range="auto") -> FidelityResult:
    """Score one image against a prompt (str in the dataset's caption language, or a SceneSpec)."""
    spec = prompt if isinstance(prompt, SceneSpec) else parse_prompt(prompt)
    detected = detect(image, value_range)
    wanted = spec.objects
    # Try every assignment of distinct detections to prompt objects (at most a handful of objects).
    assignments = list(itertools.permutations(detected, len(wanted)))
    colour_shape = any(
        all(_matches(w, d, ("colour", "shape")) for w, d in zip(wanted, a)) for a in assignments
    )
    full_assignment = next(
        (
            a
            for a in assignments
            if all(
                _matches(w, d, ("colour", "shape", "size", "position")) for w, d in zip(wanted, a)
            )
        ),
        None,
    )
    full = full_assignment is not None and len(detected) == len(wanted)
    if full:
        reason = "match"
    elif not colour_shape:
        reason = "a requested colour-shape object is missing"
    elif full_assignment is None:
        reason = "colour and shape found, but size or position differ"
    else:
        reason = f"extra objects: {len(detected)} detected, {len(wanted)} requested"
    return FidelityResult(
        colour_shape, full, {"spec": spec, "detected": detected, "reason": reason}
    )


def evaluate(images, prompts, value_range="auto") -> dict:
    """Rates over a set: images is a sequence of single images, a (N, 3, H, W) tensor or a (N, H, W,
    3) array."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str, one per image, not a single str")
    prompts = list(prompts)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim != 4:
        raise ValueError(f"a batch of images must be 4-D, got shape {tuple(images.shape)}")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("evaluate needs at least one image")
    results = [score(image, prompt, value_range) for image, prompt in zip(images, prompts)]
    colour_shape = sum(r.colour_shape for r in results)
    full = sum(r.full for r in results)
    return {
        "colour_shape": colour_shape / len(results),
        "full": full / len(results),
        "colour_shape_count": colour_shape,
        "full_count": full,
        "count": len(results),
    }
