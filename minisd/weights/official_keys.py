"""How the official Stable Diffusion checkpoints name their tensors, as a table of rules, and what
else they carry.

An official single file (CompVis `v1-5-pruned.ckpt`, Stability `v2-1_768-ema-pruned.safetensors`,
...) holds one flat state dict of the original LatentDiffusion module:

    model.diffusion_model.*    the UNet            -> minisd `unet.*`
    first_stage_model.*        the VAE             -> minisd `vae.*`
    cond_stage_model.*         the text encoder    -> minisd `text_encoder.*`
    betas, alphas_cumprod ...  the noise schedule, model_ema.* (EMA copies), ... -> kept under
                               minisd `extras`

A rule is a pair (official, minisd) of name fragments, read in both directions. `{n}` stands for a
number (the same one on both sides), `{coder}` for `encoder`/`decoder`, `{resnet}` for a ResNet
block already moved to its minisd place. A fragment that starts with "." may match anywhere in a
key, any other only at its start; "$" pins the end. Rules apply in order (official -> minisd) or in
reverse order (minisd -> official); `explain_key` shows which fired.

The UNet's official indexing is flat: `input_blocks.N.M` counts conv_in, then per level
`num_res_blocks` × [ResNet at .0 (+ transformer at .1)], then a downsample `input_blocks.N.0.op`;
`output_blocks.N` mirrors it with one more block per level and the upsample `.conv` after the
transformer (index 2) or the ResNet (index 1). No regex can count, so `unet_rules(config)` writes
out those placement rules for the given number of levels and blocks.

Three rules change tensors, not only names (`TRANSFORMS`): OpenCLIP fuses q, k, v into one
`in_proj_weight` [3·width, width] (minisd splits it); the VAE's mid attention uses 1×1 convs [C, C,
1, 1] where minisd has Linear [C, C]; the UNet transformer's proj_in/proj_out are 1×1 convs (SD 1.x)
or Linear (SD 2.x), and minisd's follow the checkpoint (`UNetConfig.linear_projection`), so they
need no change.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch

from ..config import SDConfig, sd1
from ..unet import UNetConfig
from ..vae import VAEConfig

Rule = tuple[str, str]  # (official fragment, minisd fragment)

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# The text tower comes in three spellings; minisd remembers which one a file used so it can write it
# back.
TEXT_PREFIXES = {
    # SD 1.x, OpenAI CLIP ViT-L/14 as transformers names it
    "clip": "cond_stage_model.transformer.text_model.",
    # SD 1.x, older transformers without the text_model level
    "clip-flat": "cond_stage_model.transformer.",
    "openclip": "cond_stage_model.model.",  # SD 2.x, OpenCLIP ViT-H/14
}

# Official tensors that minisd does not run but keeps (under `extras`, by their official names) for
# the round trip.
EXTRA_PATTERNS = (
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|scale_factor|logvar|lvlb_weights)$",
    # EMA copies, names with the dots removed
    r"^model_ema\.",
    # OpenCLIP's contrastive head, unused by SD 2
    r"^cond_stage_model\.model\.(text_projection|logit_scale)$",
    # a stored arange (sometimes float!): never trusted
    r"^cond_stage_model\..*position_ids$",
)

# Inside the UNet's blocks, after they have moved to their minisd places.
UNET_LAYER_RULES: list[Rule] = [
    # ResBlock keeps its layers in Sequentials: in_layers = [GroupNorm, SiLU, conv],
    # out_layers = [GroupNorm, SiLU, Dropout, conv]
    ("{resnet}.in_layers.0.", "{resnet}.norm1."),
    ("{resnet}.in_layers.2.", "{resnet}.conv1."),
    ("{resnet}.emb_layers.1.", "{resnet}.time_emb_proj."),  # emb_layers = [SiLU, Linear]
    ("{resnet}.out_layers.0.", "{resnet}.norm2."),
    ("{resnet}.out_layers.3.", "{resnet}.conv2."),
    ("{resnet}.skip_connection.", "{resnet}.conv_shortcut."),
    (".transformer_blocks.", ".blocks."),
    (".to_out.0.", ".to_out."),  # to_out = [Linear, Dropout]
    (".ff.net.0.proj.", ".ff.geglu.proj."),  # ff.net = [GEGLU, Dropout, Linear]
    (".ff.net.2.", ".ff.proj_out."),
]

VAE_RULES: list[Rule] = [
    ("encoder.down.{n}.block.", "encoder.levels.{n}.resnets."),
    ("encoder.down.{n}.downsample.", "encoder.levels.{n}.resample."),
    ("{coder}.mid.block_1.", "{coder}.middle.resnet1."),
    ("{coder}.mid.block_2.", "{coder}.middle.resnet2."),
    ("{coder}.mid.attn_1.norm.", "{coder}.middle.attention.norm."),
    ("{coder}.mid.attn_1.q.", "{coder}.middle.attention.attention.to_q."),
    ("{coder}.mid.attn_1.k.", "{coder}.middle.attention.attention.to_k."),
    ("{coder}.mid.attn_1.v.", "{coder}.middle.attention.attention.to_v."),
    ("{coder}.mid.attn_1.proj_out.", "{coder}.middle.attention.attention.to_out."),
    (".nin_shortcut.", ".conv_shortcut."),
]

CLIP_TEXT_RULES: list[Rule] = [  # transformers' CLIPTextModel names, below the text prefix
    ("embeddings.token_embedding.", "token_embedding."),
    ("embeddings.position_embedding.", "position_embedding."),
    ("encoder.layers.{n}.", "layers.{n}."),
    (".self_attn.q_proj.", ".attn.to_q."),
    (".self_attn.k_proj.", ".attn.to_k."),
    (".self_attn.v_proj.", ".attn.to_v."),
    (".self_attn.out_proj.", ".attn.to_out."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".mlp.fc1.", ".fc1."),
    (".mlp.fc2.", ".fc2."),
    ("final_layer_norm.", "final_norm."),
]

OPENCLIP_TEXT_RULES: list[Rule] = [
    ("positional_embedding$", "position_embedding.weight$"),
    ("transformer.resblocks.{n}.", "layers.{n}."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    # then split into to_q, to_k, to_v: see TRANSFORMS
    (".attn.in_proj_weight$", ".attn.to_qkv.weight$"),
    (".attn.in_proj_bias$", ".attn.to_qkv.bias$"),
    (".attn.out_proj.", ".attn.to_out."),
    (".mlp.c_fc.", ".fc1."),
    (".mlp.c_proj.", ".fc2."),
    ("ln_final.", "final_norm."),
]

# Tensor transforms, on minisd-side names: (pattern, what the official file stores, what minisd
# stores).
FUSED_QKV = r"^text_encoder\.layers\.\d+\.attn\.to_qkv\.(weight|bias)$"
VAE_ATTENTION_1X1 = (
    r"^vae\.(encoder|decoder)\.middle\.attention\.attention\.to_(q|k|v|out)\.weight$"
)
TRANSFORMS = [
    (FUSED_QKV, "one fused tensor, q then k then v along dim 0", "to_q, to_k, to_v"),
    (VAE_ATTENTION_1X1, "1×1 conv weight [C, C, 1, 1]", "Linear weight [C, C]"),
]

_PLACEHOLDERS = {
    "{n}": r"(\d+)",
    "{coder}": r"(encoder|decoder)",
    "{resnet}": r"((?:down|up)_levels\.\d+\.resnets\.\d+|middle\.resnet[12])",
}


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """The placement rules for a UNet of this shape (SD 1.x/2.x: 12 input blocks, 12 output blocks),
    then the layers."""
    levels, per_level = len(cfg.channel_mult), cfg.num_res_blocks
    rules: list[Rule] = [
        ("time_embed.0.", "time_mlp.linear_1."),
        ("time_embed.2.", "time_mlp.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
    ]
    block = 1
    for level in range(levels):
        for i in range(per_level):
            rules.append((f"input_blocks.{block}.0.", f"down_levels.{level}.resnets.{i}."))
            if cfg.attention_levels[level]:
                rules.append((f"input_blocks.{block}.1.", f"down_levels.{level}.attentions.{i}."))
            block += 1
        if level < levels - 1:
            rules.append((f"input_blocks.{block}.0.op.", f"down_levels.{level}.resample.conv."))
            block += 1
    rules += [
        ("middle_block.0.", "middle.resnet1."),
        ("middle_block.1.", "middle.attention."),
        ("middle_block.2.", "middle.resnet2."),
    ]
    block = 0
    # minisd's up_levels run deepest first, as output_blocks do
    for up, level in enumerate(reversed(range(levels))):
        for i in range(per_level + 1):
            rules.append((f"output_blocks.{block}.0.", f"up_levels.{up}.resnets.{i}."))
            if cfg.attention_levels[level]:
                rules.append((f"output_blocks.{block}.1.", f"up_levels.{up}.attentions.{i}."))
            if i == per_level and level > 0:
                upsample_slot = 2 if cfg.attention_levels[level] else 1
                rules.append(
                    (
                        f"output_blocks.{block}.{upsample_slot}.conv.",
                        f"up_levels.{up}.resample.conv.",
                    )
                )
            block += 1
    return rules + [("out.0.", "norm_out."), ("out.2.", "conv_out.")] + UNET_LAYER_RULES


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """The decoder's `up.N` counts levels by resolution (N = levels-1 is the deepest); minisd counts
    in run order."""
    levels = len(cfg.channel_mult)
    return [
        rule
        for level in range(levels)
        for rule in (
            (f"decoder.up.{level}.block.", f"decoder.levels.{levels - 1 - level}.resnets."),
            (f"decoder.up.{level}.upsample.", f"decoder.levels.{levels - 1 - level}.resample."),
        )
    ] + VAE_RULES


class OfficialNames:
    """The naming of one official file: its part prefixes and rule tables, for a given config and
    text spelling."""

    def __init__(self, config: SDConfig, text_style: str = "clip"):
        if text_style not in TEXT_PREFIXES:
            raise ValueError(
                f"text_style must be one of {sorted(TEXT_PREFIXES)}, got {text_style!r}"
            )
        self.config, self.text_style = config, text_style
        text_rules = OPENCLIP_TEXT_RULES if text_style == "openclip" else CLIP_TEXT_RULES
        # (official prefix, minisd part, rules), longest official prefix first so that text_model.
        # wins over flat
        self.parts = [
            (UNET_PREFIX, "unet", unet_rules(config.unet)),
            (VAE_PREFIX, "vae", vae_rules(config.vae)),
            (TEXT_PREFIXES[text_style], "text_encoder", text_rules),
        ]
        self._compiled = {
            part: ([_compile(a, b) for a, b in rules], [_compile(b, a) for a, b in reversed(rules)])
            for _, part, rules in self.parts
        }

    def to_minisd(self, key: str, trace: Optional[list] = None) -> Optional[str]:
        """Official key -> minisd key, or None when no part prefix matches (not a model tensor)."""
        for prefix, part, rules in self.parts:
            if key.startswith(prefix):
                if trace is not None:
                    trace.append((prefix, part + ".", part + "." + key[len(prefix) :]))
                return (
                    part
                    + "."
                    + _apply(key[len(prefix) :], self._compiled[part][0], trace, part + ".")
                )
        return None

    def to_official(self, key: str, trace: Optional[list] = None) -> str:
        """minisd key -> official key (a fused OpenCLIP q/k/v maps to its `in_proj_*`)."""
        part, rest = key.split(".", 1)
        prefix = next(p for p, name, _ in self.parts if name == part)
        if self.text_style == "openclip" and part == "text_encoder":
            rest = re.sub(r"\.attn\.to_[qkv]\.(weight|bias)$", r".attn.to_qkv.\1", rest)
        if trace is not None:
            trace.append((part + ".", prefix, prefix + rest))
        return prefix + _apply(rest, self._compiled[part][1], trace, prefix)


def ema_name(official_key: str) -> str:
    """model.diffusion_model.input_blocks.0.0.weight ->
    model_ema.diffusion_modelinput_blocks00weight."""
    return "model_ema." + official_key[len("model.") :].replace(".", "")


def is_extra(official_key: str) -> bool:
    return any(re.search(pattern, official_key) for pattern in EXTRA_PATTERNS)


def split_for_minisd(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Apply TRANSFORMS official -> minisd to one renamed tensor (views, except the q/k/v split,
    which is cloned so the three never share storage: safetensors refuses to save tensors that
    do)."""
    if re.match(FUSED_QKV, key):
        return [
            (key.replace(".to_qkv.", f".to_{name}."), part.clone())
            for name, part in zip("qkv", tensor.chunk(3))
        ]
    if re.match(VAE_ATTENTION_1X1, key) and tensor.ndim == 4:
        return [(key, tensor.reshape(tensor.shape[:2]))]
    return [(key, tensor)]


def join_for_official(tensors: dict, text_style: str) -> dict:
    """Apply TRANSFORMS minisd -> official to a minisd state dict (no `extra.` keys): fuse q/k/v,
    add 1×1 dims."""
    out = {}
    for key, tensor in tensors.items():
        fused = re.match(r"^(text_encoder\.layers\.\d+\.attn\.)to_([qkv])\.(weight|bias)$", key)
        if text_style == "openclip" and fused:
            if fused.group(2) == "q":
                head, tail = fused.group(1), fused.group(3)
                out[f"{head}to_qkv.{tail}"] = torch.cat(
                    [tensors[f"{head}to_{n}.{tail}"] for n in "qkv"]
                )
        elif re.match(VAE_ATTENTION_1X1, key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
        else:
            out[key] = tensor
    return out


def official_schedule(config: SDConfig) -> dict[str, torch.Tensor]:
    """The buffers ldm's DDPM.register_schedule stores: computed in float64 numpy, saved as float32
    (v_posterior=0)."""
    if config.beta_schedule != "scaled_linear":
        raise ValueError(
            f"the official code's 'linear' schedule is minisd's 'scaled_linear'; "
            f"got {config.beta_schedule!r}"
        )
    betas = (
        torch.linspace(
            config.beta_start**0.5,
            config.beta_end**0.5,
            config.num_train_timesteps,
            dtype=torch.float64,
        )
        ** 2
    ).numpy()
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * np.sqrt(alphas)
        / (1.0 - alphas_cumprod),
        "scale_factor": config.latent_scale,
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


def explain_key(
    key: str, config: Optional[SDConfig] = None, text_style: Optional[str] = None
) -> str:
    """Print (and return) every rule that maps `key`, official -> minisd or minisd -> official (SD
    1.x by default)."""
    config = config or sd1()
    # the longest text prefix the key starts with, else the config's text tower
    if text_style is None:
        styles = [s for s in TEXT_PREFIXES if key.startswith(TEXT_PREFIXES[s])]
        default = "openclip" if config.text.activation == "gelu" else "clip"
        text_style = max(styles, key=lambda s: len(TEXT_PREFIXES[s])) if styles else default
    names, trace, lines = OfficialNames(config, text_style), [], [key]
    from_minisd = key.split(".", 1)[0] in ("unet", "vae", "text_encoder")
    if from_minisd:
        result = names.to_official(key, trace)
        minisd_key = re.sub(r"\.to_[qkv]\.", ".to_qkv.", key) if text_style == "openclip" else key
    elif is_extra(key):
        result = minisd_key = None
        lines.append(
            "  not a model tensor: kept as is under minisd's extras, and written back on export"
        )
    else:
        result = minisd_key = names.to_minisd(key, trace)
        if result is None:
            lines.append("  no rule: not a tensor of a Stable Diffusion 1.x/2.x checkpoint")
    lines += [f"  rule {source!r} -> {target!r}: {after}" for source, target, after in trace]
    lines += [
        f"  tensor: official {official} <-> minisd {ours}"
        for pattern, official, ours in TRANSFORMS
        if minisd_key and re.match(pattern, minisd_key)
    ]
    text = "\n".join(lines + ([f"  = {result}"] if result else []))
    print(text)
    return text


def _compile(source: str, target: str) -> tuple[str, str, str, str]:
    """('encoder.down.{n}.block.', 'encoder.levels.{n}.resnets.') -> (regex, replacement, source,
    target)."""
    ends = source.endswith("$")
    pieces = re.split(r"(\{\w+\})", source.rstrip("$"))
    pattern = "".join(_PLACEHOLDERS[p] if p in _PLACEHOLDERS else re.escape(p) for p in pieces)
    pattern = ("" if source.startswith(".") else "^") + pattern + ("$" if ends else "")
    holders = [p for p in pieces if p in _PLACEHOLDERS]
    if holders != re.findall(r"\{\w+\}", target):
        raise ValueError(
            f"rule {source!r} -> {target!r}: both sides need the same placeholders in the same "
            "order"
        )
    numbers = iter(range(1, len(holders) + 1))
    replacement = re.sub(r"\{\w+\}", lambda _: f"\\{next(numbers)}", target.rstrip("$"))
    return pattern, replacement, source, target


def _apply(key: str, compiled: list, trace: Optional[list], shown_prefix: str) -> str:
    for pattern, replacement, source, target in compiled:
        new = re.sub(pattern, replacement, key, count=1)
        if new != key and trace is not None:
            trace.append((source, target, shown_prefix + new))
        key = new
    return key
