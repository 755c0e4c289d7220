"""Weights in and out: official Stable Diffusion checkpoints and diffusers folders -> minisd, and
minisd -> official.

    official .ckpt / .safetensors ──read (mmap)──► detect the config from key names and shapes (+
    the YAML, if given)
        ──rename by the rules of official_keys.py──► minisd names (+ every other tensor under
        `extra.`) ──► a minisd file (`convert_file`), or a StableDiffusion model in memory
        (`load_official_or_diffusers`)

Nothing in a checkpoint runs: `.ckpt` pickles are opened with `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers, and a pickle that needs anything else is refused.

Dtypes. File to file, every tensor keeps its dtype and bits (a fp16 checkpoint gives a fp16 minisd
file, and converting that back gives the original bytes); `--half` stores every floating tensor as
fp16. Only `minisd.load` casts, to the dtype asked for (float32 by default), because that is what
the model runs in.

The round trip official -> minisd -> official is exact: tensors minisd does not run stay under
`extra.` by their official names, and `extra.minisd_official_layout` (a JSON string in a uint8
tensor) records the few choices the names alone cannot: the text tower's spelling, whether the UNet
came from the EMA copies, the .ckpt's global_step.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from safetensors import safe_open
from safetensors.torch import save_file

from ..config import OPENCLIP_LAYERS, PREDICTION_TYPES, SDConfig
from ..files import atomic_write
from ..model import StableDiffusion
from .convert_config import config_from_diffusers, config_from_official
from .errors import ConversionError
from .keymap import from_diffusers
from .validate import check_config_counts
from .minisd_file import EXTRA, FORMAT_KEY, check_fits, expected_shapes, from_state_dict, write_file
# (minisd.weights.convert.explain_key, for the conversion chapter)
from .official_keys import explain_key  # noqa: F401
from .official_keys import (
    UNET_PREFIX,
    OfficialNames,
    ema_name,
    is_extra,
    join_for_official,
    official_schedule,
    split_for_minisd,
)

LAYOUT_KEY = "minisd_official_layout"
# in official files exported from a minisd model: sizes shapes can't tell
SOURCE_CONFIG_KEY = "minisd_config_of_origin"
Report = Callable[[str], None]


# ── reading ───────────────────────────────────────────────────────────────────────────────────────


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A single-file checkpoint -> (tensors, info). Tensors are memory-mapped where the format
    allows, so nothing is copied until used. info is {"metadata": the safetensors header's strings}
    or {"ckpt": the .ckpt's plain values beside its state_dict (global_step, ...)}."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise ConversionError(f"{path} is empty or truncated ({len(head)} bytes): not a checkpoint")
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return _read_safetensors(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return _read_pickle(path, mmap=head[:4] == b"PK\x03\x04")
    raise ConversionError(
        f"{path} is neither a safetensors file nor a torch checkpoint (first bytes {head[:8]!r}); "
        f"minisd converts official .ckpt/.safetensors files, diffusers folders and minisd files"
    )


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, {"metadata": dict(f.metadata() or {})}
    except Exception as error:  # safetensors raises its own types for truncated or corrupt files
        raise ConversionError(
            f"{path} is not a readable safetensors file, maybe truncated or corrupt ({error})"
        ) from None


def _read_pickle(path: Path, mmap: bool) -> tuple[dict, dict]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        wanted = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
        needs = (
            f"it asks for `{wanted.group(1)}`"
            if wanted
            else f"torch says: {str(error).splitlines()[0]}"
        )
        raise ConversionError(
            f"{path} is a pickle that needs more than tensors and plain containers to load "
            f"({needs}). minisd opens "
            ".ckpt files with torch.load(weights_only=True) so that no code in them runs, and "
            "refuses this one. Use "
            "the .safetensors release of the model, or re-save only its state_dict where you "
            "trust the file"
        ) from None
    except Exception as error:  # a truncated zip, a damaged pickle, ...
        # torch's first sentence; the rest is advice for its own users
        detail = str(error).split(". ")[0].strip()
        raise ConversionError(
            f"{path} is not a readable torch checkpoint, maybe truncated or corrupt "
            f"({type(error).__name__}: {detail})"
        ) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    state = data.get("state_dict", data)
    if not isinstance(state, dict):
        raise ConversionError(
            f"{path}: its 'state_dict' is a {type(state).__name__}, not a dict of tensors"
        )
    plain = {
        k: v for k, v in data.items() if k != "state_dict" and isinstance(v, (int, float, str))
    }
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {"ckpt": plain}


def read_yaml(path) -> dict:
    """An official inference YAML (v1-inference.yaml, v2-inference-v.yaml, ...) as a dict."""
    try:
        import yaml  # imported here: PyYAML is optional, needed only for --config
    except ImportError:
        raise ConversionError(
            "--config needs PyYAML to read the official YAML file: pip install pyyaml"
        ) from None
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
        data["model"]["params"]["unet_config"]
    except OSError as error:
        raise ConversionError(f"cannot read the config {path}: {error.strerror}") from None
    except (yaml.YAMLError, KeyError, TypeError):
        raise ConversionError(
            f"{path} is not an official Stable Diffusion inference YAML "
            f"(expected model.params.unet_config in it, like v1-inference.yaml)"
        ) from None
    return data


# ── official -> minisd ────────────────────────────────────────────────────────────────────────────


def official_to_minisd(
    state: dict, config: SDConfig, text_style: str, ema: bool, source: str, report: Report
) -> dict[str, torch.Tensor]:
    names, expected = OfficialNames(config, text_style), expected_shapes(config)
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    ema_of = {k: ema_name(k) for k in unet_keys}
    ema_count = sum(e in state for e in ema_of.values())
    if ema:
        if ema_count == 0:
            raise ConversionError(
                f"--ema: {source} has no EMA weights (model_ema.*); an '-emaonly' file already "
                f"holds its EMA weights as the plain ones: convert it without --ema"
            )
        absent = [e for e in ema_of.values() if e not in state]
        if absent:
            raise ConversionError(
                f"--ema: {source} lacks the EMA copies of {len(absent)} UNet tensors, e.g. "
                f"{', '.join(absent[:3])}"
            )
        report("UNet weights: the EMA copies (model_ema.*); the plain ones are kept under extras")
    elif ema_count:
        report(
            "UNet weights: the plain ones (model.diffusion_model.*); the file also has EMA copies: "
            "--ema uses them"
        )
    else:
        report("UNet weights: model.diffusion_model.* (the file has no EMA copies)")
    taken = set(ema_of.values()) if ema else set()
    out, unexpected = {}, []
    for key, tensor in state.items():
        if key in taken:
            continue
        if ema and key in ema_of:
            out[EXTRA + key], tensor = tensor, state[ema_of[key]]
        elif is_extra(key):
            out[EXTRA + key] = tensor
            continue
        name = names.to_minisd(key)
        for new, value in split_for_minisd(name, tensor) if name else [(None, tensor)]:
            if new not in expected:
                unexpected.append(key)
                continue
            out[new] = value
    # reported by their names in the user's file
    check_fits(source, expected, out, unexpected, display=names.to_official)
    return out


# ── minisd -> official ────────────────────────────────────────────────────────────────────────────


def minisd_to_official(
    config: SDConfig, tensors: dict, report: Report
) -> tuple[dict[str, torch.Tensor], dict]:
    """minisd tensors (with `extra.`) -> (official state dict, {"ckpt": .., "metadata": ..} of the
    original file)."""
    marker = tensors.get("extra." + LAYOUT_KEY)
    layout = (
        json.loads(bytes(marker.tolist()).decode())
        if marker is not None
        else {
            "text_style": "openclip" if config.text.activation == "gelu" else "clip",
            "unet": "model",
        }
    )
    names = OfficialNames(config, layout["text_style"])
    model = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    out = {}
    for key, value in join_for_official(model, layout["text_style"]).items():
        official = names.to_official(key)
        from_ema = layout["unet"] == "model_ema" and official.startswith(UNET_PREFIX)
        out[ema_name(official) if from_ema else official] = value
    out.update(
        {
            k[len("extra.") :]: v
            for k, v in tensors.items()
            if k.startswith("extra.") and k != "extra." + LAYOUT_KEY
        }
    )
    original = {key: layout.get(key, {}) for key in ("ckpt", "metadata")}
    # not from an official file: add the schedule buffers the official code expects
    if marker is None:
        out.update({k: v for k, v in official_schedule(config).items() if k not in out})
        report(
            "no official extras stored: wrote the schedule buffers as the official code computes "
            "them"
        )
        original["metadata"] = original["ckpt"] = {SOURCE_CONFIG_KEY: config.to_json()}
    if layout["text_style"] == "openclip" and config.text.layers < OPENCLIP_LAYERS:
        report(
            f"note: the text tower has {config.text.layers} of OpenCLIP ViT-H's {OPENCLIP_LAYERS} "
            f"layers (SD 2 runs {OPENCLIP_LAYERS - 1}); the official code loads it with "
            "strict=False and never runs the missing ones"
        )
    return out, original


def _layout_marker(text_style: str, ema: bool, info: dict) -> torch.Tensor:
    text = json.dumps({"text_style": text_style, "unet": "model_ema" if ema else "model", **info})
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


# ── diffusers folders ─────────────────────────────────────────────────────────────────────────────

# Old diffusers files name the VAE's attention query/key/value/proj_attn (and store 1×1 convs: see
# TRANSFORMS).
DIFFUSERS_VAE_LEGACY = [
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
]
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def read_diffusers_folder(
    folder: Path, prediction_type: Optional[str], report: Report
) -> tuple[SDConfig, dict]:
    absent = [
        p for p in ("unet", "vae", "text_encoder") if not (folder / p / "config.json").is_file()
    ]
    if absent:
        raise ConversionError(
            f"{folder} is a folder but not a diffusers Stable Diffusion pipeline: it lacks "
            f"{', '.join(f'{p}/config.json' for p in absent)}"
        )
    config = config_from_diffusers(folder, prediction_type, report)
    states = {part: _read_folder_weights(folder / part) for part in ("unet", "vae", "text_encoder")}
    for pattern, replacement in DIFFUSERS_VAE_LEGACY:
        states["vae"] = {re.sub(pattern, replacement, k): v for k, v in states["vae"].items()}
    mapped = from_diffusers(
        unet=states["unet"], vae=states["vae"], text_encoder=states["text_encoder"]
    )
    tensors = {
        new: value for key, tensor in mapped.items() for new, value in split_for_minisd(key, tensor)
    }
    return config, tensors


def _read_folder_weights(folder: Path) -> dict:
    index = sorted(folder.glob("*.index.json"))
    if index:  # sharded: the index maps every tensor to its file
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    else:
        usual = [name for name in WEIGHT_FILES if (folder / name).is_file()]
        files = (
            usual[:1]
            or [
                p.name for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            ][:1]
        )
    if not files:
        raise ConversionError(
            f"{folder} has a config.json but no weights file ({' or '.join(WEIGHT_FILES)})"
        )
    state = {}
    for name in files:
        state.update(read_checkpoint(folder / name)[0])
    return state


# ── entry points ──────────────────────────────────────────────────────────────────────────────────


def read_as_minisd(
    path,
    config=None,
    prediction_type: Optional[str] = None,
    ema: bool = False,
    report: Report = print,
) -> tuple[SDConfig, dict[str, torch.Tensor]]:
    """Any supported input (official file, diffusers folder, minisd file) -> (SDConfig, minisd-named
    tensors)."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConversionError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    if not path.exists():
        raise ConversionError(f"no checkpoint at {path}")
    if path.is_dir():
        sd_config, tensors = read_diffusers_folder(path, prediction_type, report)
        check_fits(str(path), expected_shapes(sd_config), tensors)
        return sd_config, tensors
    state, info = read_checkpoint(path)
    if FORMAT_KEY in info.get("metadata", {}):  # already a minisd file
        sd_config = SDConfig.from_json(info["metadata"][FORMAT_KEY])
        # counts first: a config claiming 200,000 layers is refused before any module is built
        check_config_counts(sd_config, {k: tuple(v.shape) for k, v in state.items()}, str(path))
        check_fits(str(path), expected_shapes(sd_config), state)
        return sd_config, state
    if not any(k.startswith(UNET_PREFIX) for k in state):
        sdxl = any(k.startswith("conditioner.") for k in state)
        raise ConversionError(
            f"{path}: unknown layout, no tensor is named like an official Stable Diffusion 1.x/2.x "
            "checkpoint (model.diffusion_model.*); its first keys are "
            f"{', '.join(list(state)[:3])}."
            + (" It looks like SDXL, which minisd does not implement." if sdxl else "")
        )
    origin = info.get("metadata", info.get("ckpt", {})).get(SOURCE_CONFIG_KEY)
    sd_config, text_style = config_from_official(
        {k: tuple(v.shape) for k, v in state.items()},
        read_yaml(config) if config else None,
        prediction_type,
        (lambda _: None) if origin and not config else report,
        scale_factor=state.get("scale_factor"),
        betas=state.get("betas"),
    )
    # exported by minisd: its own config also knows the head counts and the schedule
    if origin and not config:
        sd_config = SDConfig.from_json(origin)
        if prediction_type:
            sd_config.prediction_type = prediction_type
        report(f"config: the minisd config stored in the file ({sd_config.name})")
    tensors = official_to_minisd(state, sd_config, text_style, ema, str(path), report)
    tensors["extra." + LAYOUT_KEY] = _layout_marker(text_style, ema, info)
    return sd_config, tensors


def load(
    path,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    config=None,
    prediction_type: Optional[str] = None,
    ema: bool = False,
    verbose: bool = True,
) -> StableDiffusion:
    """`minisd.load`: a minisd file, an official checkpoint (.ckpt/.safetensors) or a diffusers
    folder as a StableDiffusion on `device` in `dtype` (official and diffusers weights are
    converted in memory; `config`, `prediction_type`, `ema` as for `convert_file`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    report = print if verbose else (lambda _: None)
    sd_config, tensors = read_as_minisd(path, config, prediction_type, ema, report)
    sd = from_state_dict(sd_config, tensors, source=str(path))
    return sd.to(device=device, dtype=dtype)


def convert_file(
    src,
    out,
    to: str = "minisd",
    config=None,
    prediction_type: Optional[str] = None,
    ema: bool = False,
    half: bool = False,
    report: Report = print,
) -> None:
    """Convert `src` into a minisd file (to='minisd') or an official single file (to='official':
    .safetensors/.ckpt)."""
    out = Path(out)
    suffixes = (".safetensors",) if to == "minisd" else (".safetensors", ".ckpt")
    if to not in ("minisd", "official"):
        raise ConversionError(f"--to must be 'minisd' or 'official', got {to!r}")
    if out.suffix not in suffixes:
        raise ConversionError(
            f"name the {to} output {' or '.join('*' + s for s in suffixes)}, got {out.name}"
        )
    if not out.resolve().parent.is_dir():
        raise ConversionError(f"the output folder {out.resolve().parent} does not exist")
    sd_config, tensors = read_as_minisd(src, config, prediction_type, ema, report)
    original = {"ckpt": {}, "metadata": {}}
    if to == "official":
        tensors, original = minisd_to_official(sd_config, tensors, report)
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    if to == "minisd":
        write_file(out, tensors, sd_config)
    else:
        official = tensors
        if out.suffix == ".ckpt":
            atomic_write(
                out, lambda tmp: torch.save({"state_dict": official, **original["ckpt"]}, tmp)
            )
        else:
            atomic_write(
                out, lambda tmp: save_file(official, tmp, metadata=original["metadata"] or None)
            )
    dtypes = sorted(
        {str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()}
    )
    report(f"wrote {out} ({to} layout, {out.stat().st_size / 1e9:.2f} GB, {'/'.join(dtypes)})")
