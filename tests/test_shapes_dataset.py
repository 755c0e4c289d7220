"""Tests for the procedural shapes dataset (minisd.train.shapes_dataset) and the prompt-fidelity
detector (minisd.train.fidelity).

References are independent of the code under test: the scene spec that produced an image (ground
truth for the detector), analytic areas of the shapes, and scipy.ndimage.label for the connected
components.
"""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.train.fidelity import detect, evaluate, label_components, score
from minisd.train.shapes_dataset import (
    BACKGROUND_RGB,
    COLOURS,
    DEFAULT_HELDOUT_PAIRS,
    FILL_RATIO,
    POSITION_ANCHOR,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    SUPERSAMPLE,
    SceneObject,
    SceneSpec,
    ShapesConfig,
    ShapesDataset,
    caption,
    parse_prompt,
    render,
    sample_spec,
)

SPLITS = ("train", "val", "heldout")


@functools.lru_cache(maxsize=None)
def labelled_images(image_size: int, count: int, seed: int = 11):
    """(uint8 image, spec) pairs drawn round-robin from the three splits."""
    datasets = [
        ShapesDataset(ShapesConfig(image_size=image_size, seed=seed), split) for split in SPLITS
    ]
    return [datasets[i % 3].image_at(i // 3) for i in range(count)]


def box_blur_and_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """3x3 mean filter (edges replicated), then Gaussian noise of std `sigma` on the [0, 1]
    scale."""
    x = image.astype(np.float64) / 255.0
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    x = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0)


# ---------------------------------------------------------------- dataset


def test_items_are_deterministic_and_seed_dependent():
    config = ShapesConfig(image_size=32, seed=5, length=100)
    first, second = (
        ShapesDataset(config),
        ShapesDataset(ShapesConfig(image_size=32, seed=5, length=100)),
    )
    other_seed = ShapesDataset(ShapesConfig(image_size=32, seed=6, length=100))
    for index in range(40):
        (image_a, caption_a), (image_b, caption_b) = first[index], second[index]
        assert torch.equal(image_a, image_b) and caption_a == caption_b
        assert image_a.dtype == torch.float32 and image_a.shape == (3, 32, 32)
        assert -1.0 <= image_a.min() and image_a.max() <= 1.0
    # Reading in another order gives the same items: nothing depends on hidden state.
    assert torch.equal(first[3][0], ShapesDataset(config)[3][0])
    differs = sum(not torch.equal(first[i][0], other_seed[i][0]) for i in range(40))
    assert differs >= 38
    val = ShapesDataset(config, "val")
    assert sum(not torch.equal(first[i][0], val[i][0]) for i in range(40)) >= 38
    assert len(first) == 100


def test_heldout_pairs_only_in_heldout_split():
    config = ShapesConfig(seed=0)
    heldout = set(DEFAULT_HELDOUT_PAIRS)
    seen = {split: set() for split in SPLITS}
    two_object = 0
    for split in SPLITS:
        dataset = ShapesDataset(config, split)
        for index in range(5000):
            spec = dataset.spec_at(index)
            pairs = {(obj.colour, obj.shape) for obj in spec.objects}
            seen[split] |= pairs
            two_object += len(spec.objects) == 2
            if split == "heldout":
                assert pairs & heldout, (
                    f"heldout item {index} has no held-out pair: {caption(spec)}"
                )
    assert not seen["train"] & heldout and not seen["val"] & heldout
    assert heldout <= seen["heldout"]
    # Every held-out colour and shape is still seen in training with another partner; all other
    # pairs are trained.
    assert {c for c, _ in seen["train"]} == set(COLOURS) and {s for _, s in seen["train"]} == set(
        SHAPES
    )
    assert len(seen["train"]) == len(COLOURS) * len(SHAPES) - len(heldout)
    assert 0.25 < two_object / 15000 < 0.35  # two_object_prob = 0.3


def test_every_caption_parses_back_to_its_spec():
    rng = np.random.default_rng(0)
    for index in range(3000):
        spec = sample_spec(rng, SPLITS[index % 3])
        assert parse_prompt(caption(spec)) == spec
    examples = {
        "a small red circle on the left": [SceneObject("red", "circle", "small", "left")],
        "A big purple triangle in the middle of the image.": [
            SceneObject("magenta", "triangle", "large", "center")
        ],
        "a green square": [SceneObject("green", "square")],
        "a green square and a yellow circle": [
            SceneObject("green", "square"),
            SceneObject("yellow", "circle"),
        ],
        "a large blue triangle at the top": [SceneObject("blue", "triangle", "large", "top")],
    }
    for prompt, objects in examples.items():
        assert parse_prompt(prompt) == SceneSpec(objects)


def test_rendered_shapes_have_analytic_area_and_position():
    # Without jitter a shape's coverage must equal fill_ratio * side^2 and sit at its anchor;
    # borders stay background.
    background = np.array(BACKGROUND_RGB, dtype=np.float64)
    colour = np.array([0.0, 0.0, 255.0])  # pure blue, what render draws without jitter
    for image_size in (32, 64):
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    image = render(
                        SceneSpec([SceneObject("blue", shape, size, position)]), image_size
                    )
                    # Coverage per pixel, from the known background and object colours.
                    direction = colour - background
                    alpha = ((image - background) @ direction) / (direction @ direction)
                    side = SIZE_FRACTION[size] * image_size
                    # Sub-sampling moves each edge by at most half a sub-sample spacing: area error
                    # <= perimeter * that.
                    perimeter = {"circle": np.pi, "square": 4.0, "triangle": 1.0 + np.sqrt(5.0)}[
                        shape
                    ] * side
                    tolerance = perimeter * 0.5 / SUPERSAMPLE
                    assert abs(alpha.sum() - FILL_RATIO[shape] * side**2) <= tolerance
                    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
                    cx, cy = (alpha * xs).sum() / alpha.sum(), (alpha * ys).sum() / alpha.sum()
                    ax, ay = POSITION_ANCHOR[position]
                    # A triangle's centroid is side/6 below its box centre.
                    expected_cy = ay * image_size + (side / 6 if shape == "triangle" else 0.0)
                    assert abs(cx - ax * image_size) < 0.3 and abs(cy - expected_cy) < 0.3
    for image, _ in labelled_images(64, 300):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == np.array(BACKGROUND_RGB)).all(), "a shape touches the image border"


def test_label_components_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        for _ in range(10):
            mask = rng.random((37, 29)) < density
            labels, count = label_components(mask)
            reference, reference_count = ndimage.label(mask)  # default structure = 4-connectivity
            assert count == reference_count
            # Same partition: labels correspond one-to-one.
            pairs = set(zip(labels[mask].tolist(), reference[mask].tolist()))
            assert len(pairs) == count and (labels[~mask] == 0).all()


# ---------------------------------------------------------------- detector


def _scores(pairs, transform=lambda image: image, value_range="auto"):
    results = [score(transform(image), caption(spec), value_range) for image, spec in pairs]
    return np.array([r.colour_shape for r in results]), np.array([r.full for r in results])


@pytest.mark.parametrize("image_size, count", [(32, 1000), (64, 300)])
def test_detector_scores_dataset_images(image_size, count):
    pairs = labelled_images(image_size, count)
    colour_shape_hits, full_hits = _scores(pairs)
    two = np.array([len(spec.objects) == 2 for _, spec in pairs])
    colour_shape, full = colour_shape_hits.mean(), full_hits.mean()
    two_colour_shape, two_full = colour_shape_hits[two].mean(), full_hits[two].mean()
    print(
        f"\n{image_size}px clean, {count} images: colour_shape {colour_shape:.4f} full {full:.4f}; "
        f"{two.sum()} two-object: colour_shape {two_colour_shape:.4f} full {two_full:.4f}"
    )
    assert colour_shape >= 0.98 and full >= 0.98
    assert two_colour_shape >= 0.98 and two_full >= 0.98
    # The dataset's own tensor format ([-1, 1], CHW) goes through evaluate.
    dataset = ShapesDataset(ShapesConfig(image_size=image_size, seed=2), "train")
    batch = [dataset[i] for i in range(60)]
    rates = evaluate(torch.stack([image for image, _ in batch]), [text for _, text in batch])
    assert rates["count"] == 60 and rates["full"] >= 0.98 and rates["colour_shape"] >= rates["full"]


def _mismatch(spec: SceneSpec, attribute: str, rng: np.random.Generator) -> SceneSpec:
    """Same scene with one attribute of one object changed to another value."""
    choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    objects = list(spec.objects)
    k = int(rng.integers(len(objects)))
    current = getattr(objects[k], attribute)
    new_value = [v for v in choices if v != current][int(rng.integers(len(choices) - 1))]
    objects[k] = SceneObject(**{**objects[k].__dict__, attribute: new_value})
    return SceneSpec(objects)


def test_detector_rejects_mismatched_prompts():
    rng = np.random.default_rng(1)
    pairs = labelled_images(32, 1000)[:250]
    for attribute in ("colour", "shape", "size", "position"):
        results = [score(image, caption(_mismatch(spec, attribute, rng))) for image, spec in pairs]
        rejected_full = np.mean([not r.full for r in results])
        rejected_colour_shape = np.mean([not r.colour_shape for r in results])
        print(
            f"\nwrong {attribute}: full rejected {rejected_full:.4f}, "
            f"colour_shape rejected {rejected_colour_shape:.4f}"
        )
        assert rejected_full >= 0.98
        if attribute in ("colour", "shape"):
            assert rejected_colour_shape >= 0.98


@pytest.mark.parametrize("image_size, count", [(32, 500), (64, 200)])
def test_detector_robust_to_noise_and_blur(image_size, count):
    rng = np.random.default_rng(2)
    pairs = labelled_images(image_size, 1000 if image_size == 32 else 300)[:count]
    degrade = lambda image: box_blur_and_noise(image, 0.05, rng)  # noqa: E731
    colour_shape_hits, full_hits = _scores(pairs, degrade, value_range=(0, 1))
    colour_shape, full = colour_shape_hits.mean(), full_hits.mean()
    print(
        f"\n{image_size}px 3x3 blur + noise sigma 0.05: colour_shape {colour_shape:.4f} "
        f"full {full:.4f}"
    )
    assert colour_shape >= 0.95 and full >= 0.95


def test_detector_accepts_every_documented_input_type():
    image, spec = labelled_images(32, 1000)[1]
    signed = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0
    unit = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    expected = [(o.colour, o.shape, o.size, o.position) for o in detect(image)]
    assert sorted(expected) == sorted((o.colour, o.shape, o.size, o.position) for o in spec.objects)
    # "auto" range: [0, 1] with a small undershoot (generated images) must not be mistaken for [-1,
    # 1].
    variants = (
        Image.fromarray(image),
        Image.fromarray(image).convert("RGBA"),
        signed,
        unit,
        unit - 0.03,
        signed.to(torch.bfloat16),
        image.astype(np.float32) / 255.0,
        torch.from_numpy(image).permute(2, 0, 1),
    )
    for variant in variants:
        assert [(o.colour, o.shape, o.size, o.position) for o in detect(variant)] == expected
    assert detect(np.full((32, 32, 3), 235, np.uint8)) == []


def test_bad_inputs_raise_clear_errors():
    image = labelled_images(32, 1000)[0][0]
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detect(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="outside the expected range"):
        detect(image.astype(np.float32))  # 0..255 floats
    with pytest.raises(ValueError, match="NaN"):
        detect(np.full((32, 32, 3), np.nan))
    with pytest.raises(ValueError, match="value_range"):
        detect(image.astype(np.float32) / 255, value_range=(0, 255))
    with pytest.raises(TypeError, match="uint8 or floating"):
        detect(torch.zeros(3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="numpy array, PIL image or torch tensor"):
        detect([[0, 0, 0]])
    for prompt, message in (
        ("a dog", "unknown word 'dog'"),
        ("a red", "no shape"),
        ("", "empty"),
        ("a red blue circle", "two colours"),
        ("a red circle and a blue square and a red square", "at most 2 objects"),
    ):
        with pytest.raises(ValueError, match=message):
            score(image, prompt)
    with pytest.raises(TypeError, match="prompt must be a str"):
        parse_prompt(3)
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        evaluate([image, image], ["a red circle"])
    with pytest.raises(ValueError, match="colour must be one of"):
        SceneObject("pink", "circle")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        SceneSpec([])
    with pytest.raises(ValueError, match="needs size and position"):
        render(SceneSpec([SceneObject("red", "circle")]))
    with pytest.raises(ValueError, match="two objects must be placed"):
        render(
            SceneSpec(
                [
                    SceneObject("red", "circle", "small", "left"),
                    SceneObject("red", "circle", "small", "top"),
                ]
            )
        )
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=8)
    with pytest.raises(ValueError, match="unseen in training"):
        ShapesConfig(heldout_pairs=[("red", "circle"), ("red", "square"), ("red", "triangle")])
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset(split="test")
    with pytest.raises(IndexError, match="index must be"):
        ShapesDataset(ShapesConfig(length=10))[10]
