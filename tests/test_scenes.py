"""Tests for the v2 scenes world (minisd.train.scenes, scene_language) and its detector
(minisd.train.scene_detector).

References independent of the code under test: the Scene that produced an image (ground truth for
the detector), analytic areas and centroids of the shapes, matplotlib's point-in-polygon test for
the polygonal shapes, and hand-written prompts with the spec a person reads in them.
"""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from minisd.train import scene_detector
from minisd.train.scene_detector import detect, score
from minisd.train.scene_language import (
    BACKGROUNDS,
    COLOURS,
    POSITION_CELLS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    caption,
    parse,
    satisfies,
)
from minisd.train.scenes import (
    CENTROID_BELOW_CENTRE,
    FILL_RATIO,
    HELDOUT_COUNTS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    RING_INNER,
    SIZE_FRACTION,
    SPLITS,
    STAR_INNER,
    SUPERSAMPLE,
    TRAIN_PAIRS,
    Background,
    Scene,
    SceneObject,
    ScenesConfig,
    ScenesDataset,
    is_heldout,
    render,
    shape_mask,
)

DETECTOR_SAMPLES = 240  # 80 per split: ~5 s of detection on one core


@functools.lru_cache(maxsize=None)
def items(count: int = DETECTOR_SAMPLES, seed: int = 3):
    """SceneItems drawn round-robin from the three splits."""
    datasets = [ScenesDataset(ScenesConfig(seed=seed), split) for split in SPLITS]
    return tuple(datasets[i % 3].item(i // 3) for i in range(count))


@functools.lru_cache(maxsize=None)
def detections(transform: str = "clean"):
    rng = np.random.default_rng(0)
    images = [item.image for item in items()]
    if transform == "blur+noise":
        images = [gaussian_blur_and_noise(image, 0.8, 0.03, rng) for image in images]
    return tuple(detect(image) for image in images)


def gaussian_blur_and_noise(image, sigma, noise, rng):
    """Separable Gaussian blur (edges replicated) of std `sigma` px, then N(0, noise²) per channel
    on the [0, 1] scale: roughly what a VAE decoder's soft edges and colour noise look like."""
    x = image.astype(np.float64) / 255.0
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in range(3)], "edge")
        x = sum(w * np.take(padded, range(i, i + x.shape[axis]), axis=axis)
                for i, w in enumerate(kernel))  # fmt: skip
    return np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0)


# ---------------------------------------------------------------- the world's rules


def test_vocabulary_meets_the_issue():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5 and {"star", "ring"} <= set(SHAPES)
    assert len(SIZES) >= 2 and len(POSITIONS) == 9 and len(RELATIONS) == 4
    assert {"white", "gradient", "stripes"} <= set(BACKGROUNDS)
    # every held-out colour and shape is still trained with other partners
    for colour, shape in HELDOUT_PAIRS:
        assert any(c == colour for c, _ in TRAIN_PAIRS) and any(s == shape for _, s in TRAIN_PAIRS)


def _polygon(shape):
    """The shape's outline in box coordinates, written from its definition, for matplotlib."""
    if shape == "triangle":
        return [(0, -1), (1, 1), (-1, 1)]
    if shape == "cross":
        a = 0.36
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                (-1, a), (-1, -a), (-a, -a)]  # fmt: skip
    if shape == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        return list(zip(radii * np.sin(angles), -radii * np.cos(angles)))
    return None


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_match_their_definition(shape):
    path = pytest.importorskip("matplotlib.path")
    grid = (np.arange(400) + 0.5) / 200 - 1.0  # 400² points in the box
    u, v = np.meshgrid(grid, grid)
    inside = shape_mask(shape, u, v)
    polygon = _polygon(shape)
    if polygon is not None:
        reference = path.Path(polygon).contains_points(np.stack([u.ravel(), v.ravel()], 1))
        # points within 1e-9 of an edge may fall either way; none of the grid's does
        assert (inside.ravel() == reference).mean() > 0.9999
    # fill ratio: the analytic area (module docstring) against the point count; a 400² grid
    # misplaces at most the points of the boundary band of one grid step: perimeter · step / 4
    perimeter = {"circle": 2 * np.pi, "square": 8, "triangle": 2 + 2 * np.sqrt(5),
                 "ring": 2 * np.pi * (1 + RING_INNER), "cross": 16, "star": 10 * 1.0}[shape]
    assert abs(inside.mean() - FILL_RATIO[shape]) < perimeter * (2 / 400) / 4


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_object_has_its_area_and_centroid(shape):
    for size in SIZES:
        for position, (row, col) in POSITION_CELLS.items():
            cx, cy, side = (col + 0.5) / 3, (row + 0.5) / 3, SIZE_FRACTION[size]
            obj = SceneObject("blue", shape, size, (row, col), cx, cy, side, 240.0)
            image = render(Scene(Background("white", (0.9,)), (obj,)), 64)
            # coverage = chroma / chroma(blue) (scenes docstring); pure blue has chroma 1
            pixels = image.astype(np.float64) / 255.0
            alpha = pixels.max(axis=-1) - pixels.min(axis=-1)
            side_px = side * 64
            # Sub-sampling moves an edge by at most half a sub-sample: area error <= perimeter x
            # that; uint8 rounding adds <= 0.5/255 per pixel of the 64² image.
            perimeter = 8 * side_px  # a bound for every shape here (the star's is 5.5 side)
            tolerance = perimeter * 0.5 / SUPERSAMPLE + 64 * 64 * 0.5 / 255
            assert abs(alpha.sum() - FILL_RATIO[shape] * side_px**2) <= tolerance
            ys, xs = np.mgrid[0:64, 0:64] + 0.5
            x_c, y_c = (alpha * xs).sum() / alpha.sum(), (alpha * ys).sum() / alpha.sum()
            expected_y = cy * 64 + CENTROID_BELOW_CENTRE.get(shape, 0.0) * side_px
            assert abs(x_c - cx * 64) < 0.3 and abs(y_c - expected_y) < 0.3


def test_items_are_deterministic_and_seed_dependent():
    first = ScenesDataset(ScenesConfig(seed=5, length=100))
    again = ScenesDataset(ScenesConfig(seed=5, length=100))
    other = ScenesDataset(ScenesConfig(seed=6, length=100))
    for index in (7, 3, 0, 99):  # any order: no hidden state
        (image_a, text_a), (image_b, text_b) = first[index], again[index]
        assert torch.equal(image_a, image_b) and text_a == text_b
        assert image_a.shape == (3, 64, 64) and image_a.dtype == torch.float32
        assert -1.0 <= image_a.min() and image_a.max() <= 1.0
    assert sum(not torch.equal(first[i][0], other[i][0]) for i in range(30)) >= 29
    val = ScenesDataset(ScenesConfig(seed=5, length=100), "val")
    assert sum(not torch.equal(first[i][0], val[i][0]) for i in range(30)) >= 29
    with pytest.raises(IndexError):
        first[100]


def test_scenes_respect_the_geometry():
    for item in items():
        cells = [obj.cell for obj in item.scene.objects]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 3
        for obj in item.scene.objects:
            row, col = obj.cell
            half = obj.side / 2
            # the box stays inside its own cell, 1/64 from its edges
            assert col / 3 + 1 / 64 - 1e-9 <= obj.cx - half and obj.cx + half <= (col + 1) / 3
            assert row / 3 + 1 / 64 - 1e-9 <= obj.cy - half and obj.cy + half <= (row + 1) / 3
        assert satisfies(item.scene.objects, item.spec, item.scene.background.kind)


# ---------------------------------------------------------------- captions and splits


def test_captions_parse_back_to_their_spec():
    for split in SPLITS:
        dataset = ScenesDataset(ScenesConfig(seed=1), split)
        for index in range(250):
            item = dataset.item(index)
            assert parse(item.caption) == item.caption_spec, item.caption
            assert parse(caption(item.spec)) == item.spec
            assert parse(caption(item.spec, np.random.default_rng(index))) == item.spec


def _obj(shape, colour=None, size=None, position=None, count=1):
    return ObjectSpec(shape, colour, size, position, count)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a green circle", SceneSpec((_obj("circle", "green"),))),
        ("two red stars", SceneSpec((_obj("star", "red", count=2),))),
        ("A big violet box in the top-left corner.",
         SceneSpec((_obj("square", "purple", "large", "top left"),))),
        ("in the middle, a tiny doughnut", SceneSpec((_obj("ring", None, "small", "center"),))),
        ("a red star to the left of a blue ring",
         SceneSpec((_obj("star", "red"), _obj("ring", "blue")), "left of")),
        ("3 pink crosses on a striped background",
         SceneSpec((_obj("cross", "pink", count=3),), background="stripes")),
        ("on a gray background, a yellow triangle at the bottom and two cyan discs",
         SceneSpec((_obj("triangle", "yellow", position="bottom"), _obj("circle", "cyan", count=2)),
                   background="grey")),
        ("orange square lower right, small green star upper left",
         SceneSpec((_obj("square", "orange", position="bottom right"),
                    _obj("star", "green", "small", "top left")))),
    ],
)  # fmt: skip
def test_prompts_people_write_parse(prompt, expected):
    assert parse(prompt) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a red cat", "unknown word 'cat'"),
        ("a red", "names no shape"),
        ("red stars", "say how many"),
        ("two red stars and two blue rings", "at most 3 objects"),
        ("a red star left of a blue ring above a green cross", "at most one relation"),
        ("two red stars in the center", "single object"),
    ],
)
def test_bad_prompts_get_one_clear_message(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse(prompt)


def test_heldout_elements_appear_only_in_the_heldout_split():
    seen = {split: {"pairs": set(), "counts": set(), "relations": set()} for split in SPLITS}
    for split in SPLITS:
        dataset = ScenesDataset(ScenesConfig(seed=2), split)
        for index in range(1500):
            spec = dataset.spec_at(index)
            assert is_heldout(spec) == (split == "heldout"), caption(spec)
            seen[split]["pairs"] |= {(o.colour, o.shape) for o in spec.objects}
            seen[split]["counts"] |= {(o.count, o.shape) for o in spec.objects}
            if spec.relation:
                a, b = spec.objects
                seen[split]["relations"].add((a.shape, spec.relation, b.shape))
    for split in ("train", "val"):
        assert not seen[split]["pairs"] & set(HELDOUT_PAIRS)
        assert not seen[split]["counts"] & set(HELDOUT_COUNTS)
    assert seen["train"]["pairs"] == set(TRAIN_PAIRS)  # every other pair is trained
    assert set(HELDOUT_PAIRS) <= seen["heldout"]["pairs"]
    assert set(HELDOUT_COUNTS) <= seen["heldout"]["counts"]
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for a, r, b in HELDOUT_RELATIONS:
        either_way = {(a, r, b), (b, converse[r], a)}
        assert either_way & seen["heldout"]["relations"]
        assert not either_way & (seen["train"]["relations"] | seen["val"]["relations"])


# ---------------------------------------------------------------- the detector


def _full_rate(found):
    hits = [satisfies(d.objects, item.spec, d.background) for item, d in zip(items(), found)]
    return float(np.mean(hits))


def test_detector_scores_the_datasets_own_images():
    rate = _full_rate(detections("clean"))
    print(f"\nfull-caption fidelity on {DETECTOR_SAMPLES} dataset images: {rate:.4f}")
    assert rate >= 0.99


def test_detector_tolerates_blur_and_colour_noise():
    # Gaussian blur σ = 0.8 px and colour noise σ = 0.03: the small (10 px) stars lose their
    # points first; 97% is the floor, measured 99% or better.
    rate = _full_rate(detections("blur+noise"))
    print(f"\nfull-caption fidelity, blurred and noised: {rate:.4f}")
    assert rate >= 0.97


def single_changes(spec: SceneSpec):
    """Every valid description that differs from `spec` in one stated attribute."""
    for i, obj in enumerate(spec.objects):
        options = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "count": (1, 2, 3),
                   "position": POSITIONS}  # fmt: skip
        for name, values in options.items():
            if getattr(obj, name) is None:
                continue
            for value in values:
                if value == getattr(obj, name):
                    continue
                try:
                    changed = dataclasses.replace(obj, **{name: value})
                    objects = spec.objects[:i] + (changed,) + spec.objects[i + 1 :]
                    yield SceneSpec(objects, spec.relation, spec.background)
                except ValueError:  # e.g. four objects in all
                    continue
    for relation in RELATIONS:
        if spec.relation not in (None, relation):
            yield dataclasses.replace(spec, relation=relation)
    for background in BACKGROUNDS:
        if spec.background not in (None, background):
            yield dataclasses.replace(spec, background=background)


def test_detector_rejects_captions_with_one_attribute_changed():
    rejected = total = 0
    for item, found in zip(items(), detections("clean")):
        for changed in single_changes(item.spec):
            # only true mismatches: the scene itself must not show the changed description
            if satisfies(item.scene.objects, changed, item.scene.background.kind):
                continue
            total += 1
            rejected += not satisfies(found.objects, changed, found.background)
    print(f"\n{rejected}/{total} single-attribute mismatches rejected ({rejected / total:.4f})")
    assert total > 20 * DETECTOR_SAMPLES and rejected / total >= 0.99


def test_score_reads_prompts_and_image_types():
    item = items()[0]
    as_tensor = torch.from_numpy(item.image).permute(2, 0, 1).float() / 127.5 - 1
    for image in (item.image, as_tensor):
        result = score(image, caption(item.spec))
        assert result.full and result.colour_shape
    wrong_colour = next(c for c in COLOURS if c != item.spec.objects[0].colour)
    spec = SceneSpec((dataclasses.replace(item.spec.objects[0], colour=wrong_colour),)
                     + item.spec.objects[1:], item.spec.relation)  # fmt: skip
    result = score(item.image, spec)
    assert not result.full and not result.colour_shape
    rates = scene_detector.evaluate([item.image, item.image], [caption(item.spec), spec])
    assert rates["full"] == 0.5 and rates["count"] == 2


# ---------------------------------------------------------------- training readiness


def test_trainers_run_a_few_steps_on_the_scenes_world(tmp_path):
    from minisd.__main__ import main as cli
    from minisd.train import training as T

    quiet = ["--no-progress", "--log-every", "1", "--sample-every", "0", "--checkpoint-every", "9"]
    small = ["--batch-size", "4", "--pool-size", "8", "--dataset", "scenes", *quiet]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the default preset with --dataset scenes is bundled-v2: 64 px, 16×16 latents
        assert cli(["train-vae", "--out", str(tmp_path / "vae"), "--steps", "2", *small]) == 0
        vae = tmp_path / "vae" / "vae.safetensors"
        assert cli(["train", "--vae", str(vae), "--out", str(tmp_path / "ldm"), "--steps", "2",
                    "--save-dtype", "float16", *small]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for run in ("vae", "ldm"):
        log = T.read_loss_log(tmp_path / run / "loss.jsonl")
        assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
        state = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
        assert state["args"]["dataset"] == "scenes"  # a resumed run keeps the dataset
    import minisd

    sd = minisd.load(tmp_path / "ldm" / "model.safetensors")
    assert sd.config.name == "bundled-v2" and sd.config.image_size == 64
    latents = sd.vae.encode(torch.zeros(1, 3, 64, 64)).mean
    assert latents.shape == (1, 4, 16, 16)


def test_pool_renders_the_scenes_world_and_bad_sizes_are_refused():
    from minisd.train import training as T

    images, captions = T.render_pool(64, 6, seed=0, dataset="scenes")
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    dataset = ScenesDataset(ScenesConfig(seed=0, length=6))
    assert captions == [dataset.item(i).caption for i in range(6)]
    with pytest.raises(T.UsageError, match="image_size must be an int >= 32"):
        T.check_dataset("scenes", 24)


def test_v2_presets_fit_the_budget(tmp_path):
    import minisd
    from minisd import StableDiffusion, save
    from minisd.train.presets_v2 import PRESETS_V2

    for name, preset in PRESETS_V2.items():
        config = preset()
        sd = StableDiffusion(config)
        # f = 4: 64×64 images, 16×16×4 latents, so the first UNet level's attention maps are 16×16
        assert config.image_size == 64 and sd.vae.downscale == 4
        assert config.vae.latent_channels == 4 and config.unet.attention_levels[0]
        path = tmp_path / f"{name}.safetensors"
        save(sd, path, dtype=torch.float16)  # as `train --save-dtype float16` writes it
        assert path.stat().st_size <= 25e6, f"{name}: {path.stat().st_size / 1e6:.1f} MB"
        assert minisd.load(path).config.name == name
