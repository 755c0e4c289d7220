"""Key renaming as a table of rules, and the rules that map diffusers/transformers names onto
minisd's.

A rule is (pattern, replacement): a regular expression over a dotted key and what it becomes.
`rename` applies every rule of a table in order, so a key may be touched by several (a block rename,
then a layer rename inside it). (The official checkpoints' rules, official_keys.py, are the ones
the conversion chapter explains key by key with `explain_key`.)

Rules that change tensors (splitting a fused q/k/v, reshaping 1×1 convs to linear layers) live in
`convert.py`; this table only renames.
"""
from __future__ import annotations

import re
from typing import Iterable

Rule = tuple[str, str]

# diffusers UNet2DConditionModel -> minisd UNet
DIFFUSERS_UNET: list[Rule] = [
    (r"^time_embedding\.", "time_mlp."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down_levels.\1.resample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up_levels.\1.resample."),
    (r"^down_blocks\.", "down_levels."),
    (r"^up_blocks\.", "up_levels."),
    (r"^mid_block\.resnets\.0\.", "middle.resnet1."),
    (r"^mid_block\.resnets\.1\.", "middle.resnet2."),
    (r"^mid_block\.attentions\.0\.", "middle.attention."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.geglu.proj."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
]

# diffusers AutoencoderKL -> minisd AutoencoderKL
DIFFUSERS_VAE: list[Rule] = [
    (
        r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.",
        r"\1.levels.\3.resample.",
    ),
    (r"^(encoder|decoder)\.(down|up)_blocks\.", r"\1.levels."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.resnet1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.resnet2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.middle.attention.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.attention.attention."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]

# transformers CLIPTextModel (with or without the `text_model.` level) -> minisd CLIPTextEncoder
TRANSFORMERS_CLIP: list[Rule] = [
    (r"^text_model\.", ""),
    (r"^embeddings\.(token|position)_embedding\.", r"\1_embedding."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.self_attn\.q_proj\.", ".attn.to_q."),
    (r"\.self_attn\.k_proj\.", ".attn.to_k."),
    (r"\.self_attn\.v_proj\.", ".attn.to_v."),
    (r"\.self_attn\.out_proj\.", ".attn.to_out."),
    (r"\.layer_norm([12])\.", r".norm\1."),
    (r"\.mlp\.fc([12])\.", r".fc\1."),
    (r"^final_layer_norm\.", "final_norm."),
]
# Buffers that the reference stores but minisd rebuilds (never trust a stored position_ids: some
# files hold floats).
TRANSFORMERS_CLIP_DROP = (r"(^|\.)embeddings\.position_ids$",)


def rename(key: str, rules: Iterable[Rule]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def rename_state_dict(state: dict, rules: Iterable[Rule], drop: Iterable[str] = ()) -> dict:
    rules, drop = list(rules), list(drop)
    return {rename(k, rules): v for k, v in state.items() if not any(re.search(d, k) for d in drop)}


def from_diffusers(unet=None, vae=None, text_encoder=None) -> dict:
    """Map diffusers/transformers state dicts (any subset) onto one minisd-named state dict
    (`unet.`, `vae.`, ...)."""
    out = {}
    for part, state, rules, drop in (
        ("unet", unet, DIFFUSERS_UNET, ()),
        ("vae", vae, DIFFUSERS_VAE, ()),
        ("text_encoder", text_encoder, TRANSFORMERS_CLIP, TRANSFORMERS_CLIP_DROP),
    ):
        if state is not None:
            out.update({f"{part}.{k}": v for k, v in rename_state_dict(state, rules, drop).items()})
    return out
