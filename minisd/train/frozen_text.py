"""Condition the diffusion model on a pretrained text tower, frozen, as Stable Diffusion does.

Stable Diffusion trains its UNet to follow the token states of a CLIP text encoder that was
pretrained contrastively and is never updated again (SD 1's model card: "a fixed, pretrained text
encoder (CLIP ViT-L/14)"). The latent diffusion paper's own text-to-image model did the other thing:
its transformer τ_θ was trained jointly with the UNet (Rombach et al. 2022, eq. 3), as minisd's
default recipe does. `python -m minisd train --text-encoder tiny-clip` freezes the text tower of
chapter 13's tiny CLIP (minisd/contrastive.py):

    c = LayerNorm_final(h^L'),   h^ℓ = the ℓ-th layer of the tiny CLIP's text tower,  no gradient
    L = ‖ UNet(z_t, t, c) − target ‖²                 only the UNet's parameters are optimised

`--text-layer final` takes L' = L (SD 1: CLIP ViT-L's last layer); `penultimate` takes L' = L − 1,
still followed by the final LayerNorm (SD 2: OpenCLIP ViT-H's layer 23 of 24, then `ln_final`).
The tower comes in whole and its config replaces the model's text config, so the UNet's
cross-attention width (`context_dim`) becomes the tower's width, and the saved model file holds the
tower: `minisd.load` and `generate` need nothing else. `--text-encoder joint` (the default) keeps
the older recipe: a text encoder of the same architecture, trained from scratch with the UNet.
"""

from __future__ import annotations

import dataclasses

import torch

from ..clip import TextEncoderConfig
from ..config import SDConfig
from ..contrastive import BUNDLED_CLIP, load_tiny_clip
from ..tokenizer import CLIPTokenizer, family_of
from .training import UsageError

TEXT_ENCODERS = ("joint", "tiny-clip")
# how many of the tower's last layers are skipped
TEXT_LAYERS = {"final": 0, "penultimate": 1}


def check_options(text_encoder: str, text_layer, clip_path) -> None:
    """The combinations that make sense: --text-layer and --clip only with a pretrained tower."""
    if text_encoder not in TEXT_ENCODERS:
        raise UsageError(f"--text-encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
    if text_layer is not None and text_layer not in TEXT_LAYERS:
        raise UsageError(f"--text-layer must be one of {tuple(TEXT_LAYERS)}, got {text_layer!r}")
    if text_encoder == "joint":
        for name, value in (("--text-layer", text_layer), ("--clip", clip_path)):
            if value is not None:
                raise UsageError(
                    f"{name} applies to a pretrained text tower: add --text-encoder tiny-clip"
                )


def tower_config(text: TextEncoderConfig, text_layer: str) -> TextEncoderConfig:
    """The tower's config with `use_layers` set for the chosen layer (None: all layers run)."""
    skipped = TEXT_LAYERS[text_layer]
    if text.layers - skipped < 1:
        raise UsageError(
            f"--text-layer {text_layer} needs a text tower of at least {skipped + 1} layers; this "
            f"one has {text.layers}"
        )
    return dataclasses.replace(text, use_layers=text.layers - skipped if skipped else None)


def check_tokenizer_fits(text: TextEncoderConfig, source: str) -> None:
    """The diffusion model tokenizes prompts with CLIP's BPE into 77 ids (model.py): the tower must
    embed every id of that vocabulary and take 77 positions, or `generate` would fail later."""
    if text.vocab_size != CLIPTokenizer.vocab_size:
        raise UsageError(
            f"the text tower in {source} embeds {text.vocab_size} token ids; the tokenizer makes "
            f"ids in [0, {CLIPTokenizer.vocab_size})"
        )
    if text.max_length != CLIPTokenizer.model_max_length:
        raise UsageError(
            f"the text tower in {source} takes {text.max_length} tokens; prompts are tokenized to "
            f"{CLIPTokenizer.model_max_length}"
        )
    if family_of(text) != "clip":
        # the tiny CLIP tokenizes as OpenAI's CLIP does; the model would tokenize as OpenCLIP's
        raise UsageError(f"the text tower in {source} uses exact GELU (OpenCLIP's tokenizer)")


def load_tower(clip_path, text_layer: str) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """(config, weights) of the tiny CLIP's text tower in `clip_path` (None: the bundled one)."""
    source = str(clip_path) if clip_path is not None else str(BUNDLED_CLIP)
    try:
        clip = load_tiny_clip(clip_path)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--clip: {error}") from None
    check_tokenizer_fits(clip.config.text, source)
    weights = {k: v.detach().clone() for k, v in clip.text_tower.state_dict().items()}
    return tower_config(clip.config.text, text_layer), weights


def condition_on(config: SDConfig, text: TextEncoderConfig) -> SDConfig:
    """`config` with `text` as its text encoder and the UNet's cross-attention as wide as it."""
    unet = dataclasses.replace(config.unet, context_dim=text.width)
    return dataclasses.replace(config, text=text, unet=unet)


def freeze(text_encoder: torch.nn.Module) -> None:
    """No gradients, no optimizer state, eval mode (the tower has no dropout; eval says it is
    fixed)."""
    text_encoder.requires_grad_(False).eval()
