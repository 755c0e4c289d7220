"""Bad inputs found by probing (issue #12): each is refused with one paragraph on stderr, exit
status 2, no traceback, and nothing written; or, for the signal and the file mode, leaves the files
as a user would expect."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

import minisd
from minisd.__main__ import main as minisd_main

REPO = Path(__file__).resolve().parents[1]


def run(argv) -> int:
    try:
        return minisd_main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def convert(argv) -> int:
    import weights_convert

    try:
        return weights_convert.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def one_paragraph(err: str) -> str:
    assert "Traceback" not in err
    assert err.strip() and "\n\n" not in err.strip()
    return err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    minisd.save(minisd.StableDiffusion(minisd.tiny()), path)
    return path


def png_with_settings(path: Path, settings_json: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("minisd", settings_json)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width × height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


# ── the command line ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "case,message",
    [
        ("settings-list", "must be a JSON object"),
        ("weighting-no", "prompt_weighting must be true or false, got 'no'"),
        ("steps-string", "steps must be an integer"),
        ("bomb-settings", "decompression bomb"),
        ("bomb-init", "decompression bomb"),
        ("warning-bomb-init", "decompression bomb"),
        ("height-2048", "--height 2048 is more than 4x this model's native size"),
        ("width-2**20", "add --no-size-limit"),
    ],
)
def test_generate_refuses(case, message, model_file, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    base = ["generate", "a cat", "--model", model_file, "--steps", 2, "--quiet"]
    argv = {
        "settings-list": [
            "generate",
            "--from-png",
            png_with_settings(inputs / "list.png", '["a cat", 3]'),
        ],
        "weighting-no": [
            "generate",
            "--model",
            model_file,
            "--from-png",
            png_with_settings(inputs / "no.png", '{"prompt": "a", "prompt_weighting": "no"}'),
        ],
        "steps-string": [
            "generate",
            "--from-png",
            png_with_settings(inputs / "steps.png", '{"prompt": "a", "steps": "50"}'),
        ],
        "bomb-settings": ["generate", "--from-png", png_claiming(inputs / "b.png", 2**15, 2**15)],
        "bomb-init": base + ["--init-image", png_claiming(inputs / "c.png", 2**15, 2**15)],
        # 10,000² = 1e8 pixels: above PIL's limit, below twice it (where PIL only warns)
        "warning-bomb-init": base + ["--init-image", png_claiming(inputs / "w.png", 10**4, 10**4)],
        "height-2048": base + ["--height", 2048],
        "width-2**20": base + ["--width", 2**20],
    }[case]
    before = sorted(p.name for p in inputs.iterdir())
    assert run(argv + ["--out", out / "x.png"]) == 2
    err = one_paragraph(capsys.readouterr().err)
    assert message in err, err
    assert list(out.iterdir()) == [] and sorted(p.name for p in inputs.iterdir()) == before


def test_no_size_limit_lets_a_larger_image_through(model_file, tmp_path):
    # tiny's native size is 32: 4× is 128; 136 = 17 × 8 is over the limit, allowed with the flag
    out = tmp_path / "x.png"
    argv = ["generate", "a", "--model", model_file, "--steps", 1, "--height", 136, "--quiet"]
    assert run(argv + ["--out", out, "--no-size-limit", "--native-size"]) == 0
    assert Image.open(out).size == (32, 136)


# ── the converter and the loader ──────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory) -> dict:
    """The tiny model in the official layout, as tensors, without minisd's stored config: the
    converter must tell the architecture from the shapes alone."""
    from minisd.weights.convert import read_checkpoint

    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    minisd.save(minisd.StableDiffusion(minisd.tiny()), folder / "tiny.safetensors")
    argv = [folder / "tiny.safetensors", "-o", folder / "o.safetensors", "--to", "official"]
    assert convert(argv) == 0
    return read_checkpoint(folder / "o.safetensors")[0]


def test_unet_input_channels_that_fit_no_layout(official_tiny, tmp_path, capsys):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state = dict(official_tiny)
    state[key] = torch.zeros(state[key].shape[0], 3, 3, 3, dtype=state[key].dtype)
    save_file(state, str(tmp_path / "bad.safetensors"))
    capsys.readouterr()
    assert convert([tmp_path / "bad.safetensors", "-o", tmp_path / "out.safetensors"]) == 2
    err = one_paragraph(capsys.readouterr().err)
    assert key in err and "[32, 3, 3, 3]" in err and "[C, 4, 3, 3]" in err and "[C, 9, 3, 3]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


@pytest.mark.parametrize("content", ["", "[]", '{"in_channels": 4}'])
def test_diffusers_folder_with_an_empty_or_partial_config(content, tmp_path, capsys):
    folder = tmp_path / "pipe"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(content)
    assert convert([folder, "-o", tmp_path / "out.safetensors"]) == 2
    err = one_paragraph(capsys.readouterr().err)
    assert "unet/config.json" in err
    expected = {"": "not valid JSON", "[]": "JSON object", '{"in_channels": 4}': "lacks"}[content]
    assert expected in err
    assert not (tmp_path / "out.safetensors").exists()


def test_minisd_file_whose_config_claims_200000_text_layers(model_file, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["minisd_config"])
    config["text"]["layers"] = 200_000
    save_file(tensors, str(tmp_path / "liar.safetensors"), {"minisd_config": json.dumps(config)})
    began = time.perf_counter()
    argv = ["generate", "a", "--model", tmp_path / "liar.safetensors", "--out", tmp_path / "x.png"]
    assert run(argv + ["--quiet"]) == 2
    assert time.perf_counter() - began < 10  # refused before building anything
    err = one_paragraph(capsys.readouterr().err)
    assert "text.layers = 200000" in err and "hold 2" in err
    assert not (tmp_path / "x.png").exists()


def test_sigterm_during_a_conversion_leaves_no_tmp_file(tmp_path):
    """A conversion slowed down inside its write (a stand-in for a 2 GB file) is sent SIGTERM: the
    process ends with status 128 + 15 and its .tmp file is gone."""
    torch.manual_seed(0)
    minisd.save(minisd.StableDiffusion(minisd.tiny()), tmp_path / "tiny.safetensors")
    script = (
        "import sys, time, safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); print('writing', flush=True); time.sleep(60)\n"
        "st.save_file = slow\n"
        "import weights_convert\n"
        "sys.exit(weights_convert.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "tiny.safetensors"), "-o", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp") for p in out.parent.iterdir())  # mid-write
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


def test_an_overwritten_output_keeps_its_mode(model_file, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    assert convert([model_file, "-o", out]) == 0
    assert out.stat().st_mode & 0o777 == 0o640 and out.stat().st_size > 3
