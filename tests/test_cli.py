"""`python -m minisd generate`: files written, settings stored and read back, and clean failures
(status 2, nothing written) on bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minisd
from minisd.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    minisd.save(minisd.StableDiffusion(minisd.tiny()), path)
    return path


def run(argv):
    """main() as the shell sees it: argparse's own errors raise SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def test_generate_writes_pngs_with_their_settings_and_from_png_regenerates(
    model_file, tmp_path, capsys
):
    out = tmp_path / "cat.png"
    assert (
        run(
            [
                "generate",
                "a red (circle:1.2)",
                "--model",
                model_file,
                "--steps",
                3,
                "--seed",
                10,
                "--batch",
                2,
                "--negative-prompt",
                "blue",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 0
    )
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cat-0.png", "cat-1.png"]
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "cat-0.png"),
        str(tmp_path / "cat-1.png"),
    ]
    with Image.open(tmp_path / "cat-1.png") as image:
        # enlarged 8× (nearest neighbour) to the 256 px viewing size; the native size is recorded
        assert image.size == (256, 256)
        settings = json.loads(image.text["minisd"])
        assert image.text["prompt"] == "a red (circle:1.2)"
        big = np.asarray(image)
    pixels = big[::8, ::8]
    assert np.array_equal(big, pixels.repeat(8, axis=0).repeat(8, axis=1))
    assert (
        settings["seed"] == 11 and settings["steps"] == 3 and settings["negative_prompt"] == "blue"
    )
    assert (
        settings["guidance_scale"] == 7.5
        and settings["sampler"] == "ddim"
        and settings["height"] == 32
        and settings["view_scale"] == 8
    )

    # The same image from the library, and again from its own file. Batch 1 against batch 2: the
    # matrix kernels may round differently with the batch size, so allow ±1 level.
    expected = minisd.load(model_file).generate(
        "a red (circle:1.2)", negative_prompt="blue", steps=3, seed=[11]
    )[0]
    assert np.abs(np.asarray(expected).astype(int) - pixels.astype(int)).max() <= 1
    again = tmp_path / "again" / "x.png"
    again.parent.mkdir()
    assert run(["generate", "--from-png", tmp_path / "cat-1.png", "--out", again, "--quiet"]) == 0
    assert np.abs(np.asarray(Image.open(again)).astype(int) - big.astype(int)).max() <= 1
    # Flags next to --from-png override the stored settings.
    assert (
        run(
            [
                "generate",
                "--from-png",
                tmp_path / "cat-1.png",
                "--seed",
                3,
                "--out",
                again,
                "--quiet",
            ]
        )
        == 0
    )
    with Image.open(again) as image:
        assert json.loads(image.text["minisd"])["seed"] == 3


def test_guidance_rescale_is_applied_stored_and_read_back(model_file, tmp_path, capsys):
    """--guidance-rescale reaches generate (the PNG equals the library's image with the same φ and
    differs from φ = 0), is stored in the PNG and comes back with --from-png; PNGs written before
    the setting existed read as 0."""
    # the random model's conditional and unconditional predictions differ little: at s = 7.5 the
    # rescale moves pixels by one level, at s = 100 by ~18, well clear of the ±1 of fused attention
    common = ["--model", model_file, "--steps", 3, "--seed", 4, "--guidance-scale", 100, "--quiet"]
    out = tmp_path / "rescaled.png"
    assert run(["generate", "a red circle", *common, "--guidance-rescale", 0.7, "--out", out]) == 0
    with Image.open(out) as image:
        assert json.loads(image.text["minisd"])["guidance_rescale"] == 0.7
        pixels = np.asarray(image).astype(int)[::8, ::8]
    sd = minisd.load(model_file)
    kwargs = dict(steps=3, seed=[4], guidance_scale=100.0)
    expected = np.asarray(sd.generate("a red circle", guidance_rescale=0.7, **kwargs)[0])
    plain = np.asarray(sd.generate("a red circle", **kwargs)[0]).astype(int)
    # ±1 level: the command line runs fused attention (tests/test_fastpath.py), the library math
    assert np.abs(pixels - expected.astype(int)).max() <= 1
    assert np.abs(pixels - plain).max() > 5
    again = tmp_path / "again.png"
    assert run(["generate", "--from-png", out, "--out", again, "--quiet"]) == 0
    with Image.open(again) as image:
        assert json.loads(image.text["minisd"])["guidance_rescale"] == 0.7
        assert np.abs(np.asarray(image).astype(int)[::8, ::8] - pixels).max() <= 1
    # a PNG without the setting (an older minisd): plain guidance
    from minisd.images import read_png_settings, save_png

    stored = read_png_settings(out)
    del stored["guidance_rescale"]
    save_png(Image.open(out).convert("RGB"), tmp_path / "old.png", stored)
    assert run(["generate", "--from-png", tmp_path / "old.png", "--out", again, "--quiet"]) == 0
    with Image.open(again) as image:
        assert json.loads(image.text["minisd"])["guidance_rescale"] == 0.0
        assert np.abs(np.asarray(image).astype(int)[::8, ::8] - plain).max() <= 1


def test_img2img_and_inpainting_from_files(model_file, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "in.png"
    )
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert (
        run(
            [
                "generate",
                "a cat",
                "--model",
                model_file,
                "--steps",
                4,
                "--seed",
                1,
                "--quiet",
                "--init-image",
                tmp_path / "in.png",
                "--strength",
                0.5,
                "--out",
                tmp_path / "img2img.png",
            ]
        )
        == 0
    )
    assert (
        run(
            [
                "generate",
                "a cat",
                "--model",
                model_file,
                "--steps",
                4,
                "--seed",
                1,
                "--quiet",
                "--init-image",
                tmp_path / "in.png",
                "--mask",
                tmp_path / "mask.png",
                "--out",
                tmp_path / "inp.png",
            ]
        )
        == 0
    )
    original, inpainted = (
        np.asarray(Image.open(tmp_path / "in.png")),
        np.asarray(Image.open(tmp_path / "inp.png"))[::8, ::8],  # saved enlarged 8×
    )
    # the kept half is the input, pixel for pixel
    assert np.array_equal(inpainted[:, :16], original[:, :16])
    assert not np.array_equal(inpainted[:, 16:], original[:, 16:])


def test_out_folder_and_subprocess_entry_point(model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minisd",
            "generate",
            "a square",
            "--model",
            str(model_file),
            "--steps",
            "2",
            "--seed",
            "7",
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["minisd-7.png"]
    assert result.stdout.strip() == str(tmp_path / "minisd-7.png")


def test_lora_adapter_from_the_command_line(model_file, tmp_path, capsys):
    """--lora loads an adapter on top of the model: the PNG equals the library's image with the same
    adapter, differs from the image without it, and records the adapter; an adapter made for
    another architecture is refused."""
    from minisd.train.lora import add_lora, load_adapter, save_adapter

    sd = minisd.load(model_file)
    add_lora(sd.unet, rank=2)
    add_lora(sd.text_encoder, rank=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in sd.named_parameters():
            if name.endswith(".up"):
                parameter.normal_(0, 0.5)  # a "trained" adapter: B is no longer zero
    save_adapter(sd, tmp_path / "adapter.safetensors")
    common = [
        "generate",
        "a red circle",
        "--model",
        model_file,
        "--steps",
        3,
        "--seed",
        5,
        "--quiet",
    ]
    assert (
        run(common + ["--lora", tmp_path / "adapter.safetensors", "--out", tmp_path / "with.png"])
        == 0
    )
    assert run(common + ["--out", tmp_path / "without.png"]) == 0
    with_adapter, without = (
        np.asarray(Image.open(tmp_path / n)).astype(int)[::8, ::8]
        for n in ("with.png", "without.png")
    )
    expected = minisd.load(model_file)
    load_adapter(expected, tmp_path / "adapter.safetensors")
    expected = np.asarray(expected.generate("a red circle", steps=3, seed=[5])[0]).astype(int)
    assert np.abs(with_adapter - expected).max() <= 1
    assert np.abs(with_adapter - without).max() > 10
    with Image.open(tmp_path / "with.png") as image:
        assert json.loads(image.text["minisd"])["lora"] == str(tmp_path / "adapter.safetensors")

    wider = dataclasses.replace(minisd.tiny().text, layers=3)  # a text encoder with one more layer
    other = minisd.StableDiffusion(dataclasses.replace(minisd.tiny(), text=wider))
    add_lora(other.text_encoder, rank=2)
    save_adapter(other, tmp_path / "other.safetensors")
    capsys.readouterr()
    assert (
        run(common + ["--lora", tmp_path / "other.safetensors", "--out", tmp_path / "bad.png"]) == 2
    )
    assert "does not have" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", 0], "steps must be in"),
        (["--strength", 1.5, "--init-image", "{img}"], "strength must be in"),
        (["--height", 30], "height must be a multiple of 8"),
        (["--guidance-scale", -2], "guidance_scale must be >= 0"),
        (["--eta", 3], "eta must be in"),
        (["--guidance-rescale", 1.5], "guidance_rescale must be in [0, 1]"),
        (["--guidance-rescale", "nan"], "guidance_rescale must be a number in [0, 1]"),
        (["--guidance-rescale", "much"], "invalid float value"),
        (["--sampler", "lms"], "invalid choice: 'lms'"),
        (["--steps", "many"], "invalid int value"),
        (["--init-image", "{tmp}/missing.png"], "does not exist"),
        (["--init-image", "{tmp}/notes.png"], "not a readable image"),
        (["--init-image", "{img}", "--mask", "{small_mask}"], "must have the same size"),
        (["--mask", "{img}"], "needs the image"),
        (["--model", "{tmp}/nothing.safetensors"], "does not exist"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--dtype", "float16"], "float16 needs a GPU"),
        (["--out", "{tmp}/no/such/folder/x.png"], "does not exist"),
        (["--out", "{tmp}/x.jpg"], "must be a .png"),
        (["--batch", 0], "--batch must be >= 1"),
        (["--from-png", "{img}"], "carries no minisd settings"),
        (["--lora", "{tmp}/missing.safetensors"], "does not exist"),
        (["--lora", "{img}"], "not a readable safetensors file"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_write_nothing(
    args, message, model_file, tmp_path, capsys
):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (32, 32)).save(inputs / "img.png")
    Image.new("L", (16, 32)).save(inputs / "small_mask.png")
    (inputs / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    names = {"img": inputs / "img.png", "small_mask": inputs / "small_mask.png", "tmp": inputs}
    args = [str(a).format(**names) for a in args]
    argv = [
        "generate",
        "a cat",
        "--model",
        model_file,
        "--steps",
        2,
        "--out",
        out / "x.png",
        "--quiet",
        *args,
    ]
    assert run(argv) == 2
    assert message in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in inputs.iterdir()) == ["img.png", "notes.png", "small_mask.png"]


def test_missing_bundled_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import minisd.tools.cli_generate as cli

    monkeypatch.setattr(cli, "BUNDLED_MODEL", tmp_path / "bundled.safetensors")
    assert run(["generate", "a cat", "--out", tmp_path / "x.png", "--quiet"]) == 2
    assert "bundled model" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_no_command_and_unknown_command(capsys):
    assert run([]) == 2
    assert "generate" in capsys.readouterr().out
    assert run(["paint"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# ── the model card, the viewing size, the fast path ───────────────────────────────────────────

BUNDLED = REPO / "minisd" / "assets" / "bundled.safetensors"


def readme_prompts_for_the_bundled_model() -> list[str]:
    """Every prompt the README gives to `generate` (command line or Python) whose words the bundled
    model knows: its own examples (the LoRA's "orange" and SD 1.5's astronaut are for other
    models)."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r'generate[( ]\s*"([^"]+)"', text)
    card = minisd.load(BUNDLED).config.card
    return sorted({p for p in found if not card.unknown_words(p)})


def test_readme_prompts_draw_what_they_say():
    """Issue #12: each README prompt for the bundled model, at the card's defaults (the command
    line's), scored by the fidelity detector: colour and shape right for ≥ 19 of seeds 0–19."""
    from minisd.train import fidelity

    prompts = readme_prompts_for_the_bundled_model()
    assert "a red circle on the left" in prompts and len(prompts) >= 3, prompts
    sd = minisd.load(BUNDLED)
    assert sd.config.card.guidance_scale == 1.5
    for prompt in prompts:
        images = sd.generate([prompt] * 20, seed=list(range(20)), output_type="tensor")
        result = fidelity.evaluate(images, [prompt] * 20)
        assert result["colour_shape_count"] >= 19, (prompt, result)


def test_the_bundled_card_is_used_and_unknown_words_are_named(tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", "a photo of a red cat", "--steps", 2, "--seed", 0, "--out", out]
    assert run(argv + ["--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown: photo, of, cat" in err and "colours red" in err
    with Image.open(out) as image:
        settings = json.loads(image.text["minisd"])
        assert image.size == (256, 256)
    assert settings["guidance_scale"] == 1.5 and settings["sampler"] == "ddim"
    assert (settings["height"], settings["width"], settings["view_scale"]) == (32, 32, 8)
    # known words: no note
    argv = ["generate", "a red circle on the left", "--steps", 2, "--out", out, "--quiet"]
    assert run(argv) == 0 and capsys.readouterr().err == ""


def test_card_round_trip_and_official_defaults(tmp_path):
    from minisd.card import ModelCard

    assert minisd.sd1().card == ModelCard(7.5, 50, "ddim", None)  # SD's usual defaults
    sd = minisd.StableDiffusion(minisd.tiny())
    sd.config.card = ModelCard(2.0, 20, "ddpm", {"colours": ["red"], "other words": ["a"]})
    minisd.save(sd, tmp_path / "m.safetensors")
    assert minisd.load(tmp_path / "m.safetensors").config.card == sd.config.card
    assert sd.config.card.unknown_words("a (red:1.3) blue AND a cat") == ["blue", "and", "cat"]


def test_native_size_and_readable_flags(model_file, tmp_path):
    """--native-size keeps the model's pixels one to one; --readable (math attention) makes the
    same picture as the default fused path, up to float rounding (±1 of 255)."""
    common = ["generate", "a red circle", "--model", model_file, "--steps", 3, "--seed", 4]
    assert run(common + ["--out", tmp_path / "fast.png", "--quiet"]) == 0
    assert run(common + ["--out", tmp_path / "slow.png", "--quiet", "--readable"]) == 0
    assert run(common + ["--out", tmp_path / "native.png", "--quiet", "--native-size"]) == 0
    fast, slow, native = (
        np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int)
        for n in ("fast", "slow", "native")
    )
    assert native.shape == (32, 32, 3) and np.abs(fast[::8, ::8] - native).max() <= 1
    assert np.abs(fast - slow).max() <= 1

