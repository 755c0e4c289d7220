"""Checks of a checkpoint before any module is built: one clear error instead of a traceback, a
model that fails only when it generates, or minutes spent building what the file cannot fill.

    check_unet_input      the UNet's first convolution reads the VAE's latents (c channels) or the
                          inpainting layout (latents + mask + masked-image latents: 2c + 1)
    read_json_config      a diffusers config.json that is a JSON object
    require_keys          ... holding every key the conversion reads
    check_config_counts   a minisd file's config against its tensors: the counts of repeated
                          modules (layers, levels, blocks) and the first shapes, so that a config
                          claiming 200,000 text layers is refused at once instead of built
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ConversionError


def check_unet_input(key: str, shape, latent_channels: int) -> None:
    """`shape` of the UNet's first convolution `key` must read c or 2c + 1 channels."""
    allowed = (latent_channels, 2 * latent_channels + 1)
    found = tuple(shape)
    if len(found) != 4 or found[1] not in allowed:
        raise ConversionError(
            f"{key} has shape {list(found)}: its input channels (dimension 1) must be the VAE's "
            f"{latent_channels} latent channels, or {allowed[1]} for the inpainting layout "
            f"(latents + mask + masked-image latents); allowed shapes [C, {allowed[0]}, 3, 3] or "
            f"[C, {allowed[1]}, 3, 3]"
        )


def read_json_config(path: Path) -> dict:
    """A diffusers config.json as a dict ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


# what config_from_diffusers reads without a default, per file
DIFFUSERS_REQUIRED = {
    "unet/config.json": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "cross_attention_dim",
    ),
    "vae/config.json": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
    ),
    "text_encoder/config.json": (
        "vocab_size",
        "max_position_embeddings",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
    ),
}


def require_keys(folder: Path, configs: dict) -> None:
    """configs: {"unet/config.json": dict, ...}; every key config_from_diffusers needs is there."""
    for name, required in DIFFUSERS_REQUIRED.items():
        missing = [key for key in required if key not in configs[name]]
        if missing:
            raise ConversionError(
                f"{folder / name} is incomplete: it lacks {', '.join(missing)} (a diffusers "
                "pipeline folder as saved by save_pretrained has them all)"
            )


def _count(keys, prefix: str) -> int:
    """How many modules `prefix.N.*` the keys hold (1 + the largest N; 0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = [int(m.group(1)) for key in keys if (m := pattern.match(key))]
    return 1 + max(indices) if indices else 0


def check_config_counts(config, shapes: dict, source: str) -> None:
    """Compare what `config` would build with what the tensors (`shapes`: key -> shape) hold, for
    the repeated modules and the first layers; ConversionError naming the first difference."""
    keys = list(shapes)
    u, v, t = config.unet, config.vae, config.text
    counts = (
        ("text.layers", t.layers, "text_encoder.layers"),
        ("unet.channel_mult (levels)", len(u.channel_mult), "unet.down_levels"),
        ("unet.num_res_blocks", u.num_res_blocks, "unet.down_levels.0.resnets"),
        ("vae.channel_mult (levels)", len(v.channel_mult), "vae.encoder.levels"),
        ("vae.num_res_blocks", v.num_res_blocks, "vae.encoder.levels.0.resnets"),
    )
    for name, claimed, prefix in counts:
        found = _count(keys, prefix)
        if found != claimed:
            raise ConversionError(
                f"{source}: its config says {name} = {claimed} but the weights hold {found} "
                f"({prefix}.*): the config does not describe these tensors"
            )
    first_shapes = (
        ("text_encoder.token_embedding.weight", (t.vocab_size, t.width)),
        ("text_encoder.position_embedding.weight", (t.max_length, t.width)),
        ("unet.conv_in.weight", (u.channels, u.in_channels, 3, 3)),
    )
    for key, expected in first_shapes:
        if key in shapes and tuple(shapes[key]) != expected:
            raise ConversionError(
                f"{source}: its config implies {key} of shape {list(expected)} but the file holds "
                f"{list(shapes[key])}: the config does not describe these tensors"
            )
    check_unet_input("unet.conv_in.weight", (u.channels, u.in_channels, 3, 3), v.latent_channels)
