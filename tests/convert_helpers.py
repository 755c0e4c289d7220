"""Random-weight checkpoints in the official layouts (tests/data/*_manifest.json), and the diffusers
reference that reads them with its own single-file conversion functions.

Run as a script to measure the converter on a full-size fp32 SD 1.x checkpoint (not part of CI):

    python tests/convert_helpers.py --benchmark [--keep]
"""
from __future__ import annotations

import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
TEXT_FLAT, TEXT_NESTED = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."


@lru_cache(maxsize=None)
def manifest(family: str) -> dict:
    """{'config': the official YAML as a dict, 'keys': {name: [shape, dtype]}} for 'sd1' or
    'sd2'."""
    return json.loads((DATA / f"{family}_manifest.json").read_text())


def layout(family: str, in_channels: int = 4) -> dict[str, tuple[list, str]]:
    keys = dict(manifest(family)["keys"])
    if in_channels != 4:  # inpainting: latents + mask + masked-image latents
        keys["model.diffusion_model.input_blocks.0.0.weight"] = (
            [320, in_channels, 3, 3],
            "float32",
        )
    return keys


def random_tensors(keys: dict, dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled so that activations stay O(1) through the full depth: weights N(0,
    1/fan_in), norm scales near 1, small biases. Values are slices of one shared random pool
    (drawing a billion fresh normals takes ~20 s on 2 cores); every tensor starts at its own random
    offset, so no two tensors are equal."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(1 << 24, generator=generator)
    # (scale, shift) -> normal·scale + shift, already in `dtype`: each tensor is then one copy
    pools: dict = {}

    def draw(shape, scale, shift=0.0):
        pool = pools.get((scale, shift))
        if pool is None:
            pool = pools[scale, shift] = (normal * scale + shift).to(dtype)
        n = math.prod(shape)
        source = pool if n <= pool.numel() else pool.repeat(1 + n // pool.numel())
        start = int(torch.randint(0, source.numel() - n + 1, (), generator=generator))
        return source[start : start + n].reshape(shape).clone()

    out = {}
    for name, (shape, stored_dtype) in keys.items():
        if stored_dtype.startswith("int"):
            out[name] = torch.arange(math.prod(shape), dtype=getattr(torch, stored_dtype)).reshape(
                shape
            )
            continue
        if name == "betas":
            value = torch.linspace(0.00085**0.5, 0.012**0.5, shape[0], dtype=torch.float64) ** 2
        elif name == "scale_factor":
            value = torch.tensor(0.18215)
        elif name.endswith("logit_scale"):
            value = torch.tensor(math.log(100.0))
        elif len(shape) >= 2:
            value = draw(shape, math.prod(shape[1:]) ** -0.5)
        elif name.endswith("weight"):
            value = draw(shape, 0.1, 1.0)
        else:
            value = draw(shape, 0.05)
        out[name] = value.to(dtype)
    return out


def with_ema_and_extras(state: dict, seed: int = 1, dtype=torch.float16) -> dict:
    """A 'full' SD 1.x file as CompVis released them: text under text_model., float position_ids,
    EMA copies (names with the dots removed, in `dtype`), model_ema.decay/num_updates and logvar."""
    out = {}
    for key, value in state.items():
        if key.startswith(TEXT_FLAT) and not key.startswith(TEXT_NESTED):
            key = TEXT_NESTED + key[len(TEXT_FLAT) :]
        out[key] = value.float() if key.endswith("position_ids") else value
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    ema = random_tensors(
        {k: (list(v.shape), "float32") for k, v in unet.items()}, dtype=dtype, seed=seed
    )
    out.update({"model_ema." + k[len("model.") :].replace(".", ""): v for k, v in ema.items()})
    out.update(
        {
            "model_ema.decay": torch.tensor(0.9999),
            "logvar": torch.zeros(1000),
            "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
        }
    )
    return out


# ── the reference: diffusers' own single-file conversion
# ────────────────────────────────────────────────────────


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _load_strict(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert not any(p.is_meta for p in model.parameters())
    return model.eval()


def diffusers_unet(checkpoint: dict, original_config: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    return _load_strict(
        _on_meta(lambda: UNet2DConditionModel(**config)),
        convert_ldm_unet_checkpoint(checkpoint, config),
    )


def diffusers_vae(checkpoint: dict, original_config: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    return _load_strict(
        _on_meta(lambda: AutoencoderKL(**config)), convert_ldm_vae_checkpoint(checkpoint, config)
    )


# The text towers as diffusers' pipelines configure them (openai/clip-vit-large-patch14;
# stable-diffusion-2's text_encoder/config.json, which keeps 23 of OpenCLIP's 24 layers).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
OPENCLIP_H_23 = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)


def diffusers_text(checkpoint: dict):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    openclip = any(k.startswith("cond_stage_model.model.") for k in checkpoint)
    model = _on_meta(
        lambda: CLIPTextModel(CLIPTextConfig(**(OPENCLIP_H_23 if openclip else CLIP_L)))
    )
    state = (
        convert_open_clip_checkpoint(model, checkpoint)
        if openclip
        else convert_ldm_clip_checkpoint(checkpoint)
    )
    # transformers >= 5 dropped the text_model. level of CLIPTextModel (diffusers strips it the same
    # way)
    model = _load_strict(model, {k.removeprefix("text_model."): v for k, v in state.items()})
    # a non-persistent buffer, still on the meta device
    model.embeddings.position_ids = torch.arange(77)[None]
    return model


# ── benchmark: time and peak memory of a full-size fp32 conversion
# ──────────────────────────────────────────────


def _measure(command: list) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of one child process, read from its own
    rusage."""
    import subprocess
    import time

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, command
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6


def make_benchmark_files(folder: Path) -> None:
    from safetensors.torch import save_file

    state = random_tensors(layout("sd1"), dtype=torch.float32)
    save_file(state, str(folder / "sd1.safetensors"))
    torch.save({"state_dict": state}, str(folder / "sd1.ckpt"))


def benchmark(keep: bool = False) -> None:
    """Convert a full-size fp32 SD 1.x checkpoint (~4.3 GB, random weights) from both formats, then
    back. Every step runs in its own process, started from this small one (a child's peak RSS starts
    at its parent's)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="minisd-bench-", dir="/tmp"))
    src, ckpt = folder / "sd1.safetensors", folder / "sd1.ckpt"
    out, back = folder / "minisd.safetensors", folder / "back.safetensors"
    script = str(Path(__file__).parents[1] / "weights_convert.py")
    try:
        runs = (
            (
                "write the files (not the converter)",
                [sys.executable, __file__, "--make-files", str(folder)],
            ),
            ("read the .safetensors (cat)", ["cat", str(src)]),
            ("copy the .safetensors (cp)", ["cp", str(src), str(back)]),
            (".safetensors -> minisd", [sys.executable, script, str(src), "-o", str(out)]),
            ("read the .ckpt (cat)", ["cat", str(ckpt)]),
            (".ckpt -> minisd", [sys.executable, script, str(ckpt), "-o", str(out)]),
            (
                "minisd -> official .safetensors",
                [sys.executable, script, str(out), "-o", str(back), "--to", "official"],
            ),
            (
                "minisd.load(official .safetensors)",
                [sys.executable, "-c", f"import minisd; minisd.load({str(src)!r})"],
            ),
            (
                "python -c 'import minisd.weights.convert'",
                [sys.executable, "-c", "import minisd.weights.convert"],
            ),
        )
        for name, command in runs:
            seconds, cpu, peak = _measure(command)
            print(
                f"{name:36} {seconds:6.1f} s wall {cpu:6.1f} s CPU   peak RSS {peak:5.2f} GB",
                flush=True,
            )
        print(
            f"(input {src.stat().st_size / 1e9:.2f} GB, load average {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} cores)"
        )
    finally:
        if not keep:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()


if __name__ == "__main__":
    if "--make-files" in sys.argv:
        make_benchmark_files(Path(sys.argv[sys.argv.index("--make-files") + 1]))
    elif "--benchmark" in sys.argv:
        benchmark(keep="--keep" in sys.argv)
