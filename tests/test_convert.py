"""The weights converter: official checkpoints and diffusers folders in, minisd and official files
out.

Full-size random-weight checkpoints in the exact official layouts (tests/data/*_manifest.json; fp16,
or fp8 where only names and bits matter, to keep the files small; one on disk at a time) are read
by minisd and by diffusers' own single-file conversion functions; the text encoder, UNet and VAE
must agree in fp32. Official -> minisd -> official must return every
tensor bit for bit. Every failure must be one paragraph on stderr, exit status 2, and no output
file.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import minisd  # noqa: E402
import weights_convert  # noqa: E402
from convert_helpers import (
    diffusers_text,
    diffusers_unet,
    diffusers_vae,
    layout,
    manifest,  # noqa: E402
    random_tensors,
    with_ema_and_extras,
)
from minisd.weights import convert  # noqa: E402
from minisd.weights.convert import (
    ConversionError,
    minisd_to_official,
    read_as_minisd,
    read_checkpoint,
)  # noqa: E402
from minisd.weights.keymap import DIFFUSERS_UNET, DIFFUSERS_VAE, rename  # noqa: E402
from minisd.weights.official_keys import OfficialNames, explain_key, is_extra  # noqa: E402
from reference_models import rel_err  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TOLERANCE = 1e-4  # fp32; diffusers itself agrees with the official code to ~5e-6
ROOT = Path(__file__).parents[1]


@contextlib.contextmanager
def fast_torch_save():
    """torch.save spends most of its time on CRC32s that these throw-away test files do not need."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    previous = config.save.compute_crc32 if config else None
    if config:
        config.save.compute_crc32 = False
    try:
        yield
    finally:
        if config:
            config.save.compute_crc32 = previous


def quiet(_line):
    pass


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # the very same memory (a view passed through unchanged): no need to read it
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))



# ── the checkpoints: one full-size file on disk at a time
# ──────────────────────────────────────────────────────────
# Disk (decimal GB; tests/data/*_manifest.json: SD 1.x 1,066,247,385 values, SD 2.x 1,303,609,229,
# the SD 1.x UNet 859,520,964): fp16 SD 1.x 2.13, SD 2.x 2.61; the fp8 copies that only pass names
# and bits through 1.07 and 1.30; the fp8 full .ckpt (+ EMA UNet) 1.93. The largest moment is one
# SD 2.x file (2.61), or an fp8 SD 2.x file and its converted copy (2.61), or a diffusers folder
# saved in fp16 (2.58). Written all at once, as before, they took 13-19 GB.

FP8 = torch.float8_e4m3fn  # 1 byte a value: for the tests whose property is names and bits only


def sd1_state(dtype=torch.float16) -> dict:
    return random_tensors(layout("sd1"), dtype=dtype, seed=1)


def sd2_state(dtype=torch.float16) -> dict:
    return random_tensors(layout("sd2"), dtype=dtype, seed=2)


def inpainting_state() -> dict:
    """The SD 1.x weights with a 9-channel conv_in, as sd-v1-5-inpainting.ckpt has."""
    state = sd1_state()
    state["model.diffusion_model.input_blocks.0.0.weight"] = random_tensors(
        {"w": ([320, 9, 3, 3], "float32")}, seed=3
    )["w"]
    return state


def save_ckpt(checkpoint: dict, path: Path) -> None:
    with fast_torch_save():
        torch.save(checkpoint, path)


# sd1.safetensors: the SD 1.x manifest as is (text without text_model., int64 position_ids).
# sd1-full.ckpt: the same weights as CompVis released v1-5-pruned.ckpt: text_model., float
# position_ids, EMA copies, logvar, wrapped in {"state_dict", "global_step"} (fp8, so that it and
# sd1-fp8.safetensors, its safetensors twin, stay small). sd2.ckpt / sd2.safetensors: the SD 2.x
# manifest. sd1-inpainting.safetensors: the SD 1.x manifest with a 9-channel conv_in.
BUILDERS = {
    "sd1.safetensors": lambda path: save_file(sd1_state(), str(path)),
    "sd1-inpainting.safetensors": lambda path: save_file(inpainting_state(), str(path)),
    "sd2.ckpt": lambda path: save_ckpt({"state_dict": sd2_state()}, path),
    "sd2.safetensors": lambda path: save_file(sd2_state(), str(path)),
    "sd1-full.ckpt": lambda path: save_ckpt(
        {"state_dict": with_ema_and_extras(sd1_state(FP8), dtype=FP8), "global_step": 840000},
        path,
    ),
    "sd1-fp8.safetensors": lambda path: save_file(sd1_state(FP8), str(path)),
    "sd2-fp8.safetensors": lambda path: save_file(sd2_state(FP8), str(path)),
}


def digests(tensors: dict) -> dict:
    """{name: (dtype, shape, SHA-256 of the bytes)}: equal digests mean equal bits, so two files can
    be compared without both being on disk."""
    out = {}
    for name, tensor in tensors.items():
        data = tensor.detach().reshape(-1).view(torch.uint8).numpy()
        out[name] = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest())
    return out


def differences(a: dict, b: dict) -> list:
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and a[k] != b[k]]


class Checkpoints:
    """The full-size checkpoints, written when a test first asks for one. Asking for another deletes
    the one before, so one is on disk at a time however the tests are ordered or selected; the tests
    below come grouped by file, so each file is written once."""

    def __init__(self, folder: Path):
        self.folder, self.current, self.minisd_digests = folder, None, {}

    def path(self, name: str) -> Path:
        if self.current != name:
            self.drop()
            BUILDERS[name](self.folder / name)
            self.current = name
        return self.folder / name

    def minisd_tensors_digests(self, name: str) -> dict:
        """Digests of what read_as_minisd gives for `name`, kept after the file is gone."""
        if name not in self.minisd_digests:
            _, tensors = read_as_minisd(self.path(name), report=quiet)
            self.minisd_digests[name] = digests(tensors)
        return self.minisd_digests[name]

    def drop(self) -> None:
        if self.current is not None:
            (self.folder / self.current).unlink(missing_ok=True)
            self.current = None
        # a tensor memory-mapped from a deleted file keeps its blocks allocated until it is freed
        gc.collect()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Built once for the session (only this module uses it) and deleted with its last test."""
    folder = tmp_path_factory.mktemp("convert")
    store = Checkpoints(folder)
    yield store
    store.drop()
    shutil.rmtree(folder, ignore_errors=True)  # pytest would otherwise keep it for three runs


def original_config(family: str) -> dict:
    config = copy.deepcopy(manifest("sd2" if family == "sd2" else "sd1")["config"])
    if family == "sd1-inpainting":  # as v1-inpainting-inference.yaml says
        config["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    return config


def make_inputs(config: minisd.SDConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.tensor([[49406]]),
            torch.randint(0, 49406, (1, 20), generator=g),
            torch.full((1, 56), config.text.pad_token_id),
        ],
        dim=1,
    )
    ids[0, 21] = 49407
    return dict(
        ids=ids,
        x=torch.randn(1, config.unet.in_channels, 8, 8, generator=g),
        t=torch.tensor([321]),
        context=torch.randn(1, 77, config.unet.context_dim, generator=g),
        image=torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        z=torch.randn(1, 4, 4, 4, generator=g),
    )


@torch.no_grad()
def minisd_outputs(sd, inputs, parts) -> dict:
    out = {"unet": sd.unet(inputs["x"], inputs["t"], inputs["context"])}
    if "vae" in parts:
        posterior = sd.vae.encode(inputs["image"])
        out.update(
            {
                "vae mean": posterior.mean,
                "vae logvar": posterior.logvar,
                "vae decode": sd.vae.decode(inputs["z"]),
            }
        )
    if "text" in parts:
        out["text"] = sd.text_encoder(inputs["ids"])
    return out


@torch.no_grad()
def diffusers_outputs(models, inputs) -> dict:
    out = {
        "unet": models["unet"](
            inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]
        ).sample
    }
    if "vae" in models:
        posterior = models["vae"].encode(inputs["image"]).latent_dist
        out.update(
            {
                "vae mean": posterior.mean,
                "vae logvar": posterior.logvar,
                "vae decode": models["vae"].decode(inputs["z"]).sample,
            }
        )
    if "text" in models:
        out["text"] = models["text"](inputs["ids"]).last_hidden_state
    return out


def parity(path: Path, family: str, folder: Path | None, parts=("text", "unet", "vae")) -> dict:
    """Relative errors of minisd (loading `path`, then the diffusers folder saved from the
    reference) vs diffusers."""
    sd = minisd.load(path)
    inputs = make_inputs(sd.config)
    ours = minisd_outputs(sd, inputs, parts)
    del sd
    checkpoint = {k: v.float() for k, v in read_checkpoint(path)[0].items()}
    config = original_config(family)
    builders = {
        "text": lambda: diffusers_text(checkpoint),
        "unet": lambda: diffusers_unet(checkpoint, config),
        "vae": lambda: diffusers_vae(checkpoint, config),
    }
    models = {part: builders[part]() for part in parts}
    del checkpoint, builders
    reference = diffusers_outputs(models, inputs)


def reference(checkpoint: dict, family: str, parts, inputs) -> tuple[dict, dict]:
    """diffusers' models, built by its own single-file conversion functions from `checkpoint` (in
    fp32), and their outputs."""
    checkpoint = {k: v.float() for k, v in checkpoint.items()}
    config = original_config(family)
    builders = {
        "text": lambda: diffusers_text(checkpoint),
        "unet": lambda: diffusers_unet(checkpoint, config),
        "vae": lambda: diffusers_vae(checkpoint, config),
    }
    models = {part: builders[part]() for part in parts}
    return models, diffusers_outputs(models, inputs)


def report_errors(title: str, errors: dict) -> dict:
    shown = {k: f"{v:.2e}" if isinstance(v, float) else v for k, v in errors.items()}
    print(f"\n{title} relative errors vs diffusers:", shown)
    return errors


def parity(path: Path, family: str, parts=("text", "unet", "vae")) -> dict:
    """Relative errors of minisd loading `path` vs diffusers reading the same file."""
    sd = minisd.load(path)
    inputs = make_inputs(sd.config)
    ours = minisd_outputs(sd, inputs, parts)
    del sd
    _, theirs = reference(read_checkpoint(path)[0], family, parts, inputs)
    return report_errors(family, {part: rel_err(ours[part], theirs[part]) for part in ours})


def folder_parity(family: str, folder: Path) -> dict:
    """Relative errors of minisd loading a diffusers pipeline folder vs the diffusers models it was
    saved from (in fp16: the random weights are fp16 values, so saving loses nothing)."""
    from diffusers import DDIMScheduler

    state, preset = (sd2_state(), minisd.sd2()) if family == "sd2" else (sd1_state(), minisd.sd1())
    inputs = make_inputs(preset)
    models, theirs = reference(state, family, ("text", "unet", "vae"), inputs)
    del state
    for part, name in (("text_encoder", "text"), ("unet", "unet"), ("vae", "vae")):
        models.pop(name).half().save_pretrained(folder / part)
    DDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    ).save_pretrained(folder / "scheduler")
    sd = minisd.load(folder)
    ours = minisd_outputs(sd, inputs, ("text", "unet", "vae"))
    errors = {part: rel_err(ours[part], theirs[part]) for part in ours}
    errors["prediction_type"] = sd.config.prediction_type  # from scheduler/scheduler_config.json
    del sd
    shutil.rmtree(folder)
    return report_errors(f"{family} diffusers folder", errors)


def assert_close_to_diffusers(errors: dict, count: int) -> None:
    numeric = {part: error for part, error in errors.items() if isinstance(error, float)}
    assert len(numeric) == count
    assert all(error <= TOLERANCE for error in numeric.values()), numeric


def assert_preset(config: minisd.SDConfig, preset: minisd.SDConfig, name: str) -> None:
    fields = ("unet", "vae", "text", "prediction_type", "latent_scale", "beta_start", "beta_end")
    for field in fields + ("image_size",):
        assert getattr(config, field) == getattr(preset, field), (name, field)


def assert_same_minisd_tensors(checkpoints, first: str, second: str, dtype) -> None:
    """The parity tests read one format; the other must give the very same minisd tensors, so the
    same outputs (compared by digest: the two files are not on disk together)."""
    a, b = (
        {k: v for k, v in checkpoints.minisd_tensors_digests(name).items()
         if not k.startswith("extra.")}
        for name in (first, second)
    )
    assert a and not differences(a, b), differences(a, b)[:10]
    assert a["unet.conv_in.weight"][0] == dtype  # file to file, the dtype is kept


# ── SD 1.x, sd1.safetensors
# ──────────────────────────────────────────────────────────────────────────────────────


def test_sd1_outputs_match_diffusers_single_file_conversion(checkpoints):
    assert_close_to_diffusers(parity(checkpoints.path("sd1.safetensors"), "sd1"), 5)


def test_sd1_detected_config_and_printout(checkpoints):
    lines = []
    config, _ = read_as_minisd(checkpoints.path("sd1.safetensors"), report=lines.append)
    assert_preset(config, minisd.sd1(), "sd1.safetensors")
    assert config.prediction_type == "epsilon" and not config.is_inpainting
    assert "SD 1.x" in lines[0] and "8 heads" in lines[0] and "1×1-conv" in lines[0]


def test_usage_errors(checkpoints, tmp_path, capsys, monkeypatch):
    source = checkpoints.path("sd1.safetensors")
    assert "does not exist" in run_cli(
        capsys, source, "-o", tmp_path / "absent" / "x.safetensors"
    )
    assert "*.safetensors" in run_cli(capsys, source, "-o", tmp_path / "x.ckpt")
    assert "no EMA weights" in run_cli(capsys, source, "-o", tmp_path / "x.safetensors", "--ema")
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML is not a runtime dependency
    assert "pip install pyyaml" in run_cli(
        capsys,
        source,
        "-o",
        tmp_path / "x.safetensors",
        "--config",
        tmp_path / "v1-inference.yaml",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(checkpoints, tmp_path, capsys, monkeypatch):
    from minisd.weights import minisd_file

    source = checkpoints.path("sd1.safetensors")

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    # where the writers look it up: both import save_file by name (patching safetensors.torch
    # itself would let the real one write the whole 2.13 GB file)
    for module in (minisd_file, convert):
        monkeypatch.setattr(module, "save_file", broken_save)
    assert "No space left" in run_cli(capsys, source, "-o", tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ── SD 1.x inpainting, sd1-inpainting.safetensors
# ─────────────────────────────────────────────────────────────────


def test_inpainting_unet_matches_diffusers_and_is_detected(checkpoints):
    """Only the UNet differs from SD 1.x (9 input channels), so only the UNet is compared."""
    path = checkpoints.path("sd1-inpainting.safetensors")
    assert_close_to_diffusers(parity(path, "sd1-inpainting", parts=("unet",)), 1)
    config, _ = read_as_minisd(path, report=quiet)
    assert_preset(config, minisd.sd1_inpaint(), path.name)
    assert config.is_inpainting


# ── SD 2.x, sd2.ckpt then sd2.safetensors
# ─────────────────────────────────────────────────────────────────────────


def test_sd2_outputs_match_diffusers_single_file_conversion(checkpoints):
    assert_close_to_diffusers(parity(checkpoints.path("sd2.ckpt"), "sd2"), 5)


def test_sd2_ckpt_and_safetensors_give_the_same_weights(checkpoints):
    assert_same_minisd_tensors(checkpoints, "sd2.ckpt", "sd2.safetensors", torch.float16)


def test_sd2_detection_printout_and_prediction_type(checkpoints, tmp_path):
    yaml = pytest.importorskip("yaml")
    path = checkpoints.path("sd2.safetensors")
    lines = []
    config, _ = read_as_minisd(path, report=lines.append)
    assert_preset(config, minisd.sd2(), path.name)
    text = "\n".join(lines)
    assert config.prediction_type == "v_prediction"
    assert (
        "SD 2.x" in text
        and "OpenCLIP" in text
        and "--prediction-type epsilon" in text
        and "--config" in text
    )
    v_yaml, eps_yaml = tmp_path / "v2-inference-v.yaml", tmp_path / "v2-inference.yaml"
    v_yaml.write_text(yaml.safe_dump(manifest("sd2")["config"]))
    base = copy.deepcopy(manifest("sd2")["config"])
    del base["model"]["params"]["parameterization"]  # v2-inference.yaml: the 512-base model, ε
    eps_yaml.write_text(yaml.safe_dump(base))
    assert read_as_minisd(path, config=v_yaml, report=quiet)[0].prediction_type == "v_prediction"
    config, _ = read_as_minisd(path, config=eps_yaml, report=quiet)
    assert (config.prediction_type, config.name) == ("epsilon", "sd2-base")
    config, _ = read_as_minisd(path, prediction_type="epsilon", report=quiet)
    assert config.prediction_type == "epsilon"
    v1_yaml = tmp_path / "v1-inference.yaml"
    v1_yaml.write_text(yaml.safe_dump(manifest("sd1")["config"]))
    with pytest.raises(ConversionError, match="describes another model: its context_dim is 768"):
        # its 8 heads would be silently wrong
        read_as_minisd(path, config=v1_yaml, report=quiet)


# ── diffusers pipeline folders (no single file on disk meanwhile)
# ─────────────────────────────────────────────


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_matches_diffusers(checkpoints, family):
    checkpoints.drop()  # the folder (2.13 / 2.58 GB) is then the only large thing on disk
    errors = folder_parity(family, checkpoints.folder / f"{family}-diffusers")
    assert_close_to_diffusers(errors, 5)
    assert errors["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")


# ── the full SD 1.x .ckpt (EMA copies and extras), sd1-full.ckpt
# ──────────────────────────────────────────────


@pytest.mark.parametrize("ema", [False, True])
def test_round_trip_of_a_full_ckpt_bit_for_bit(checkpoints, monkeypatch, ema):
    """EMA copies, model_ema.decay/num_updates, logvar, float position_ids, text_model. and
    global_step come back, also when the UNet was taken from the EMA copies. In memory: the file is
    read once (memory-mapped), so tensors that pass through untouched are recognised as the very
    same memory instead of being read twice."""
    path = checkpoints.path("sd1-full.ckpt")
    original, info = read_checkpoint(path)
    monkeypatch.setattr(convert, "read_checkpoint", lambda path: (original, info))
    config, tensors = read_as_minisd(path, ema=ema, report=quiet)
    official, back_info = minisd_to_official(config, tensors, quiet)
    assert set(official) == set(original)
    assert all(same_bits(official[k], original[k]) for k in original)
    assert back_info["ckpt"] == info["ckpt"] == {"global_step": 840000}
    assert (
        original["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype
        == torch.float32
    )


def test_ema_selection(checkpoints):
    path = checkpoints.path("sd1-full.ckpt")
    original, _ = read_checkpoint(path)
    lines = []
    _, plain = read_as_minisd(path, report=lines.append)
    assert any("plain" in line and "--ema" in line for line in lines)
    lines.clear()
    _, ema = read_as_minisd(path, ema=True, report=lines.append)
    assert any("EMA copies (model_ema.*)" in line for line in lines)
    for official_key, minisd_key in (
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("output_blocks.5.2.conv.bias", "up_levels.1.resample.conv.bias"),
        (
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "middle.attention.blocks.0.attn2.to_k.weight",
        ),
    ):
        flat = "model_ema.diffusion_model" + official_key.replace(".", "")
        assert same_bits(ema["unet." + minisd_key], original[flat])
        assert same_bits(
            plain["unet." + minisd_key], original["model.diffusion_model." + official_key]
        )
        plain_key = "model.diffusion_model." + official_key
        assert same_bits(ema["extra." + plain_key], original[plain_key])  # kept for the round trip
    assert same_bits(ema["vae.decoder.conv_out.weight"], plain["vae.decoder.conv_out.weight"])


def test_sd1_ckpt_and_safetensors_give_the_same_weights(checkpoints):
    """The full .ckpt (text_model., float position_ids, EMA copies) and the plain safetensors file
    of the same weights."""
    assert_same_minisd_tensors(checkpoints, "sd1-full.ckpt", "sd1-fp8.safetensors", FP8)


# ── round trips through the command line, sd1-fp8.safetensors and sd2-fp8.safetensors
# ─────────────────────


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_through_files_bit_for_bit(checkpoints, family):
    """The CLI both ways. SD 1.x in the manifest's spelling (no text_model., int64 position_ids); SD
    2.x with its fused OpenCLIP q/k/v, text_projection, logit_scale and the 24th text layer. The
    dtype is kept (fp8 here: names and bits are the property, and two SD 2.x copies stay at 2.6
    GB)."""
    name = f"{family}-fp8.safetensors"
    original = checkpoints.path(name)
    middle, back = checkpoints.folder / f"minisd-{name}", checkpoints.folder / f"back-{name}"
    assert weights_convert.main([str(original), "-o", str(middle)]) == 0
    expected = digests(read_checkpoint(original)[0])
    checkpoints.drop()  # its last user: the original's space is freed before the copy back
    floats = {v.dtype for v in read_checkpoint(middle)[0].values() if v.is_floating_point()}
    assert floats == {FP8}
    assert weights_convert.main([str(middle), "-o", str(back), "--to", "official"]) == 0
    middle.unlink()
    found = digests(read_checkpoint(back)[0])
    back.unlink()
    assert not differences(expected, found), differences(expected, found)[:10]




def test_export_of_a_minisd_trained_model(tmp_path):
    """No extras: the model tensors (bf16 here, kept) under official names, plus the schedule
    buffers as the official code computes them (float32 from float64), plus the minisd config so
    that sizes the official layout cannot express (tiny's head counts) come back; --half stores
    fp16."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    sd = minisd.StableDiffusion(minisd.tiny()).eval()
    minisd.save(sd, tmp_path / "tiny.safetensors", dtype=torch.bfloat16)
    assert (
        weights_convert.main(
            [
                str(tmp_path / "tiny.safetensors"),
                "-o",
                str(tmp_path / "official.safetensors"),
                "--to",
                "official",
            ]
        )
        == 0
    )
    official, _ = read_checkpoint(tmp_path / "official.safetensors")
    names = OfficialNames(sd.config, "clip")
    ours = read_checkpoint(tmp_path / "tiny.safetensors")[0]
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in official)
    for key, value in official.items():
        minisd_key = names.to_minisd(key)
        if minisd_key is not None:
            assert same_bits(ours[minisd_key], value.reshape(ours[minisd_key].shape)), key
    assert len(ours) == sum(names.to_minisd(k) is not None for k in official)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert official["betas"].dtype == torch.float32
    torch.testing.assert_close(official["betas"], reference.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        official["alphas_cumprod"], reference.alphas_cumprod, rtol=1e-5, atol=0
    )
    assert official["scale_factor"].item() == pytest.approx(0.18215)
    assert (
        weights_convert.main(
            [str(tmp_path / "official.safetensors"), "-o", str(tmp_path / "back.safetensors")]
        )
        == 0
    )
    config, back = read_as_minisd(tmp_path / "back.safetensors", report=quiet)
    assert config == sd.config and all(same_bits(ours[k], back[k]) for k in ours)
    # the converter writes what minisd.load reads
    loaded = minisd.load(tmp_path / "back.safetensors")
    assert loaded.dtype == torch.float32 and all(
        torch.equal(v, ours["unet." + k].float()) for k, v in loaded.unet.state_dict().items()
    )
    assert (
        weights_convert.main(
            [
                str(tmp_path / "tiny.safetensors"),
                "-o",
                str(tmp_path / "half.ckpt"),
                "--to",
                "official",
                "--half",
            ]
        )
        == 0
    )
    assert {v.dtype for v in read_checkpoint(tmp_path / "half.ckpt")[0].values()} == {torch.float16}
    # the config rides in the .ckpt too
    assert read_as_minisd(tmp_path / "half.ckpt", report=quiet)[0] == sd.config


def test_small_diffusers_folder_with_bin_files_and_legacy_names(tmp_path):
    """A diffusers folder as older releases wrote it: pytorch .bin weights (read with
    weights_only=True), the VAE's attention named query/key/value/proj_attn, transformers'
    text_model. level; no scheduler config (ε assumed)."""
    from reference_models import (
        diffusers_unet as tiny_unet,
        diffusers_vae as tiny_vae,
        transformers_clip,
    )

    torch.manual_seed(0)
    config = minisd.tiny()
    models = {
        "unet": tiny_unet(config),
        "vae": tiny_vae(config),
        "text_encoder": transformers_clip(config),
    }
    legacy = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    for part, model in models.items():
        (tmp_path / part).mkdir()
        state = model.state_dict()
        if part == "vae":
            rename_legacy = lambda k: re.sub(
                r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: legacy[m.group(0)], k
            )  # noqa
            state = {rename_legacy(k) if "mid_block" in k else k: v for k, v in state.items()}
        if part == "text_encoder":
            model.config.save_pretrained(tmp_path / part)
            state = {"text_model." + k: v for k, v in state.items()}
        else:
            model.save_config(tmp_path / part)
        name = "pytorch_model.bin" if part == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(state, tmp_path / part / name)
    sd = minisd.load(tmp_path)
    assert (
        sd.config.prediction_type == "epsilon"
        and sd.config.unet == config.unet
        and sd.config.text == config.text
    )
    inputs = make_inputs(config)
    inputs.update(
        x=torch.randn(1, 4, 8, 8),
        context=torch.randn(1, 77, 32),
        image=torch.rand(1, 3, 16, 16) * 2 - 1,
        z=torch.randn(1, 4, 8, 8),
    )
    models["text"] = models.pop("text_encoder")
    ours, reference = (
        minisd_outputs(sd, inputs, ("text", "unet", "vae")),
        diffusers_outputs(models, inputs),
    )
    assert all(rel_err(ours[part], reference[part]) <= TOLERANCE for part in ours), {
        part: rel_err(ours[part], reference[part]) for part in ours
    }



def test_explain_key_follows_diffusers_naming(capsys):
    """Every UNet and VAE key: our rules give the name diffusers' converter + minisd's diffusers
    keymap give."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    for family, config, style in (
        ("sd1", minisd.sd1(), "clip-flat"),
        ("sd2", minisd.sd2(), "openclip"),
    ):
        checkpoint = {
            k: torch.empty(shape, device="meta") for k, (shape, _) in layout(family).items()
        }
        owner = {id(v): k for k, v in checkpoint.items()}
        original = manifest(family)["config"]
        unet = convert_ldm_unet_checkpoint(
            checkpoint, create_unet_diffusers_config_from_ldm(original, checkpoint)
        )
        vae = convert_ldm_vae_checkpoint(
            checkpoint, create_vae_diffusers_config_from_ldm(original, checkpoint)
        )
        names = OfficialNames(config, style)
        pairs = [("unet." + rename(k, DIFFUSERS_UNET), v) for k, v in unet.items()] + [
            ("vae." + rename(k, DIFFUSERS_VAE), v) for k, v in vae.items()
        ]
        assert len(pairs) == sum(
            k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in checkpoint
        )
        for expected, tensor in pairs:
            official = owner[id(tensor if tensor._base is None else tensor._base)]
            assert names.to_minisd(official) == expected, official
            assert names.to_official(expected) == official
    capsys.readouterr()
    explain_key("model.diffusion_model.output_blocks.5.2.conv.weight")
    explain_key("unet.down_levels.0.resnets.1.norm1.weight")
    explain_key("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", minisd.sd2())
    explain_key("model_ema.decay")
    out = capsys.readouterr().out.splitlines()
    assert (
        "  rule 'output_blocks.5.2.conv.' -> 'up_levels.1.resample.conv.': "
        "unet.up_levels.1.resample.conv.weight"
    ) in out
    assert "  = unet.up_levels.1.resample.conv.weight" in out
    assert any(
        line.startswith("  rule '{resnet}.norm1.' -> '{resnet}.in_layers.0.'") for line in out
    )
    assert "  = model.diffusion_model.input_blocks.2.0.in_layers.0.weight" in out
    assert any("fused" in line for line in out) and out[-1].startswith("  not a model tensor")


# ── errors: one paragraph on stderr, exit status 2, no file left
# ─────────────────────────────────────────────────


def run_cli(capsys, *args) -> str:
    assert weights_convert.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("weights_convert.py: error: ") and "\n" not in err and "Traceback" not in err
    ), err
    return err


def small_files(folder: Path) -> dict:
    paths = {
        name: folder / name
        for name in ("t.safetensors", "t.ckpt", "notes.txt", "other.safetensors")
    }
    save_file({"model.diffusion_model.x": torch.zeros(1000, 100)}, str(paths["t.safetensors"]))
    torch.save({"state_dict": {"x": torch.zeros(1000, 100)}}, paths["t.ckpt"])
    for name in ("t.safetensors", "t.ckpt"):
        data = paths[name].read_bytes()
        paths[name].write_bytes(data[: len(data) // 2])
    paths["notes.txt"].write_text("not weights\n")
    save_file({"conditioner.embedders.0.weight": torch.zeros(3)}, str(paths["other.safetensors"]))
    return paths


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unreadable_files_fail_cleanly(tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    paths = small_files(inputs)
    assert "truncated" in run_cli(capsys, paths["t.safetensors"], "-o", out / "a.safetensors")
    assert "truncated" in run_cli(capsys, paths["t.ckpt"], "-o", out / "a.safetensors")
    message = run_cli(capsys, paths["notes.txt"], "-o", out / "a.safetensors")
    assert "neither a safetensors file nor a torch checkpoint" in message
    assert "unknown layout" in run_cli(
        capsys, paths["other.safetensors"], "-o", out / "a.safetensors"
    )
    assert "no checkpoint at" in run_cli(
        capsys, inputs / "absent.ckpt", "-o", out / "a.safetensors"
    )
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"x": torch.zeros(2)}, "payload": Exploit(marker)}, inputs / "evil.ckpt"
    )
    message = run_cli(capsys, inputs / "evil.ckpt", "-o", out / "a.safetensors")
    assert "weights_only=True" in message and "system" in message and not marker.exists()
    assert list(out.iterdir()) == []


def test_cli_process_exit_status(tmp_path):
    paths = small_files(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "weights_convert.py"),
            str(paths["t.safetensors"]),
            "-o",
            str(tmp_path / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2
        and "Traceback" not in result.stderr
        and result.stderr.count("\n") == 1
    )
    assert not (tmp_path / "out.safetensors").exists()


def _meta_layout(family, drop=(), add=(), reshape=None, dtype=torch.float16):
    """The layout's model tensors on the meta device (shapes only), its few small buffers for
    real."""
    keys = layout(family)
    small = random_tensors({k: v for k, v in keys.items() if is_extra(k)}, dtype=dtype)
    state = {
        k: small[k] if k in small else torch.empty(shape, device="meta", dtype=dtype)
        for k, (shape, _) in keys.items()
        if k not in drop
    }
    state.update({k: torch.empty(3, device="meta") for k in add})
    for key, shape in (reshape or {}).items():
        state[key] = torch.empty(shape, device="meta", dtype=torch.float16)
    return state


@pytest.mark.parametrize("case", ["missing", "unexpected", "mismatch"])
def test_keys_that_do_not_fit(case, tmp_path, capsys, monkeypatch):
    """Layouts built on the meta device (shapes only, no 2 GB file): the errors arise before any
    data is read."""
    u = "model.diffusion_model."
    to_v = u + "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    dropped = [k for k in layout("sd1") if k.startswith(u + "output_blocks.4.1.")]
    state = {
        "missing": lambda: _meta_layout(
            "sd1", drop=dropped + ["first_stage_model.decoder.conv_out.bias"]
        ),
        "unexpected": lambda: _meta_layout(
            "sd1", add=[u + "input_blocks.1.2.weight", "first_stage_model.loss.w"]
        ),
        "mismatch": lambda: _meta_layout("sd1", reshape={to_v: [640, 1024]}),
    }[case]()
    monkeypatch.setattr(convert, "read_checkpoint", lambda path: (state, {}))
    (tmp_path / "in.safetensors").write_bytes(b"")
    message = run_cli(capsys, tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors")
    expected = {
        "missing": [
            "missing keys",
            "model.diffusion_model.output_blocks.4.1.* (",
            "decoder.conv_out.bias",
        ],
        "unexpected": [
            "2 unexpected keys",
            u + "input_blocks.1.2.weight",
            "first_stage_model.loss.w",
        ],
        "mismatch": [f"shape mismatch at {to_v}: expected [640, 768], found [640, 1024]"],
    }[case]
    assert all(part in message for part in expected), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_dtypes_are_kept(dtype, monkeypatch):
    state = _meta_layout("sd2", dtype=dtype)
    monkeypatch.setattr(convert, "read_checkpoint", lambda path: (state, {}))
    _, tensors = read_as_minisd(Path(__file__), report=quiet)
    assert {v.dtype for k, v in tensors.items() if not k.endswith("layout")} == {dtype}
    assert tensors["unet.conv_in.weight"].dtype == dtype




def test_conversion_error_is_a_value_error():
    # minisd.load's callers catch ValueError for bad input
    assert issubclass(ConversionError, ValueError)
