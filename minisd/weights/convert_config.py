"""What a checkpoint says about its architecture: an SDConfig from an official file's shapes (and
YAML), or from a diffusers folder's config.json files.

Shapes settle almost everything: widths, levels, blocks per level, attention levels, 1×1-conv vs
linear projections, the context width, inpainting (9 input channels), the text tower (OpenAI CLIP
ViT-L for SD 1.x, OpenCLIP ViT-H for SD 2.x). They cannot tell three things, which the official YAML
(`--config`) settles:

- the head layout: SD 1.x has 8 heads at every level (`num_heads: 8`), SD 2.x 64-dim heads
  (`num_head_channels: 64`); without a YAML the text tower decides (ViT-L -> 8 heads, ViT-H ->
  64-dim heads);
- what the UNet predicts: `parameterization: "v"` -> v-prediction, else ε. SD 2.x comes as 768-v (v)
  and 512-base (ε) with identical shapes; minisd assumes v for SD 2.x and says so;
- the schedule (linear_start, linear_end, timesteps) and scale_factor (the file's `scale_factor`
  buffer when present).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..clip import TextEncoderConfig
from ..config import OPENCLIP_LAYERS, SD_LATENT_SCALE, SDConfig
from .errors import ConversionError
from .official_keys import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, official_schedule
from .validate import DIFFUSERS_REQUIRED, check_unet_input, read_json_config, require_keys
from ..unet import UNetConfig
from ..vae import VAEConfig

# The official SD 2 code always builds OpenCLIP ViT-H/14's OPENCLIP_LAYERS-layer tower (config.py)
# and stops PENULTIMATE layer before its end (`layer: "penultimate"`).
PENULTIMATE = 1


def _error(message: str) -> Exception:
    return ConversionError(message)


def text_style_of(shapes: dict) -> str:
    keys = [
        k for k in shapes if k.startswith("cond_stage_model.") and not k.endswith("position_ids")
    ]
    # longest prefix first: text_model. before the flat spelling
    for style in ("openclip", "clip", "clip-flat"):
        if any(k.startswith(TEXT_PREFIXES[style]) for k in keys):
            return style
    raise _error(
        "no text encoder in the checkpoint: expected cond_stage_model.transformer.* (SD 1.x) or "
        "cond_stage_model.model.* (SD 2.x)"
    )


def config_from_official(
    shapes: dict,
    yaml: Optional[dict],
    prediction_type: Optional[str],
    report: Callable[[str], None],
    scale_factor: Optional[torch.Tensor] = None,
    betas: Optional[torch.Tensor] = None,
) -> tuple[SDConfig, str]:
    """(SDConfig, text spelling) from an official state dict's {key: shape} and, optionally, its
    parsed YAML."""

    def shape(key):
        if key not in shapes:
            raise _error(f"the checkpoint lacks {key}, which minisd needs to tell the architecture")
        return shapes[key]

    def count(pattern):
        return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})

    params = (yaml or {}).get("model", {}).get("params", {})
    unet_yaml = params.get("unet_config", {}).get("params", {})
    style = text_style_of(shapes)
    openclip = style == "openclip"

    u = UNET_PREFIX
    channels, in_channels = shape(u + "input_blocks.0.0.weight")[:2]
    latents = shape(VAE_PREFIX + "decoder.conv_in.weight")[1]
    check_unet_input(u + "input_blocks.0.0.weight", shape(u + "input_blocks.0.0.weight"), latents)
    downsample = re.compile(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight$")
    downsamples = sorted(int(m.group(1)) for k in shapes if (m := downsample.match(k)))
    per_level = (
        downsamples[0] - 1
        if downsamples
        else count(r"model\.diffusion_model\.input_blocks\.(\d+)\.") - 1
    )
    # first block of every level
    firsts = [1 + level * (per_level + 1) for level in range(len(downsamples) + 1)]
    widths = [shape(f"{u}input_blocks.{b}.0.out_layers.3.weight")[0] for b in firsts]
    attends = tuple(f"{u}input_blocks.{b}.1.proj_in.weight" in shapes for b in firsts)
    if not any(attends):
        raise _error(
            "the UNet has no spatial transformers (input_blocks.N.1.*): not a Stable Diffusion "
            "1.x/2.x UNet"
        )
    attention = f"{u}input_blocks.{firsts[attends.index(True)]}.1."
    if unet_yaml.get("num_heads", -1) != -1:  # the official code's -1 means "not this way"
        heads = {"num_heads": unet_yaml["num_heads"], "head_dim": None}
    elif unet_yaml.get("num_head_channels", -1) != -1:
        heads = {"num_heads": None, "head_dim": unet_yaml["num_head_channels"]}
    else:
        heads = (
            {"num_heads": None, "head_dim": 64} if openclip else {"num_heads": 8, "head_dim": None}
        )
    unet = UNetConfig(
        in_channels=in_channels,
        out_channels=shape(u + "out.2.weight")[0],
        channels=channels,
        channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=per_level,
        attention_levels=attends,
        context_dim=shape(attention + "transformer_blocks.0.attn2.to_k.weight")[1],
        transformer_depth=count(re.escape(attention) + r"transformer_blocks\.(\d+)\."),
        linear_projection=len(shape(attention + "proj_in.weight")) == 2,
        **heads,
    )

    v = VAE_PREFIX
    vae_channels, image_channels = shape(v + "encoder.conv_in.weight")[:2]
    levels = count(r"first_stage_model\.encoder\.down\.(\d+)\.")
    vae = VAEConfig(
        in_channels=image_channels,
        out_channels=shape(v + "decoder.conv_out.weight")[0],
        channels=vae_channels,
        channel_mult=tuple(
            shape(f"{v}encoder.down.{i}.block.0.conv1.weight")[0] // vae_channels
            for i in range(levels)
        ),
        num_res_blocks=count(r"first_stage_model\.encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=shape(v + "decoder.conv_in.weight")[1],
    )

    t = TEXT_PREFIXES[style]
    if openclip:
        vocab, width = shape(t + "token_embedding.weight")
        layers = count(re.escape(t) + r"transformer\.resblocks\.(\d+)\.")
        layer = params.get("cond_stage_config", {}).get("params", {}).get("layer", "penultimate")
        runs = OPENCLIP_LAYERS - (PENULTIMATE if layer == "penultimate" else 0)
        text = TextEncoderConfig(
            vocab_size=vocab,
            max_length=shape(t + "positional_embedding")[0],
            width=width,
            layers=layers,
            heads=max(1, width // 64),
            activation="gelu",
            pad_token_id=0,
            mlp_ratio=shape(t + "transformer.resblocks.0.mlp.c_fc.weight")[0] // width,
            use_layers=runs if layers > runs else None,
        )
    else:
        vocab, width = shape(t + "embeddings.token_embedding.weight")
        text = TextEncoderConfig(
            vocab_size=vocab,
            max_length=shape(t + "embeddings.position_embedding.weight")[0],
            width=width,
            layers=count(re.escape(t) + r"encoder\.layers\.(\d+)\."),
            # 64-dim heads in both CLIP towers (ViT-L: 12 of them)
            heads=max(1, width // 64),
            mlp_ratio=shape(t + "encoder.layers.0.mlp.fc1.weight")[0] // width,
        )

    sd2 = openclip
    if prediction_type:
        why = "--prediction-type"
    elif yaml is not None:
        prediction_type, why = (
            ("v_prediction" if params.get("parameterization") == "v" else "epsilon"),
            "the YAML",
        )
    elif sd2 and in_channels == unet.out_channels:
        prediction_type = "v_prediction"
        why = (
            "SD 2.x default; shapes cannot tell 768-v from 512-base: for 512-base pass "
            "--prediction-type epsilon "
            "or --config v2-inference.yaml"
        )
    else:
        prediction_type, why = (
            "epsilon",
            "the default for " + ("SD 1.x" if not sd2 else "SD 2.x inpainting/depth"),
        )
    latent_scale = float(params["scale_factor"]) if "scale_factor" in params else SD_LATENT_SCALE
    if (
        "scale_factor" not in params
        and scale_factor is not None
        and abs(float(scale_factor) - SD_LATENT_SCALE) > 1e-4
    ):
        # not SD's 0.18215 (which fp16 files store as 0.18213)
        latent_scale = round(float(scale_factor), 6)
    try:
        config = SDConfig(
            unet=unet,
            vae=vae,
            text=text,
            prediction_type=prediction_type,
            latent_scale=latent_scale,
            beta_start=float(params.get("linear_start", 0.00085)),
            beta_end=float(params.get("linear_end", 0.012)),
            num_train_timesteps=int(params.get("timesteps", 1000)),
            # 768-v, else 512
            image_size=768 if sd2 and prediction_type == "v_prediction" else 512,
            name=("sd2" if sd2 else "sd1")
            + (
                "-inpainting"
                if in_channels == 9
                else "-base"
                if sd2 and prediction_type == "epsilon"
                else ""
            ),
        )
    except ValueError as error:
        raise _error(f"the checkpoint's parts do not fit together: {error}") from None

    text_name = (
        f"OpenCLIP ViT-H ({text.layers} layers, runs {text.use_layers or text.layers})"
        if openclip
        else f"OpenAI CLIP ViT-L ({text.layers} layers)"
    )
    report(
        f"detected: SD {'2' if sd2 else '1'}.x layout; text {text_name} at {t}*, width {width}; "
        "UNet "
        f"{in_channels}->{unet.out_channels} "
        f"channels{' (inpainting)' if in_channels == 9 else ''}, "
        f"{'64-dim heads' if unet.head_dim else f'{unet.num_heads} heads'}, "
        f"{'linear' if unet.linear_projection else '1×1-conv'} projections, context "
        f"{unet.context_dim}; "
        f"VAE {vae.latent_channels} latent channels"
    )
    report(f"prediction type: {prediction_type} ({why}); latent scale {latent_scale}")
    for name, ours, theirs in (
        ("model_channels", channels, unet_yaml.get("model_channels")),
        ("context_dim", unet.context_dim, unet_yaml.get("context_dim")),
    ):
        # its head layout and prediction type would be wrong too
        if theirs is not None and ours != theirs:
            raise _error(
                f"--config describes another model: its {name} is {theirs} but the weights have "
                f"{ours}; "
                f"pass the YAML that came with this checkpoint (SD 1.x: v1-inference.yaml, SD 2.x: "
                f"v2-inference-v.yaml or v2-inference.yaml)"
            )
    # v1-inference.yaml given for an inpainting model
    if unet_yaml.get("in_channels", in_channels) != in_channels:
        report(
            f"note: the YAML says in_channels={unet_yaml['in_channels']} but the weights have "
            f"{in_channels}: "
            f"using the weights"
        )
    if betas is not None and betas.shape == (config.num_train_timesteps,):
        stored, expected = betas.double(), official_schedule(config)["betas"].double()
        # fp16 files round betas to ~1e-3
        if ((stored - expected).abs().max() / expected.max()) > 1e-3:
            report(
                "note: the file's stored betas differ from the schedule assumed here; pass "
                "--config if the model "
                "was trained with another linear_start/linear_end"
            )
    return config, style


def config_from_diffusers(
    folder: Path, prediction_type: Optional[str], report: Callable[[str], None]
) -> SDConfig:
    """SDConfig from a diffusers pipeline folder's unet/, vae/, text_encoder/ (and scheduler/)
    config.json files."""

    def read(name):
        return read_json_config(folder / name)

    u, v, t = read("unet/config.json"), read("vae/config.json"), read("text_encoder/config.json")
    s = read("scheduler/scheduler_config.json")
    require_keys(folder, dict(zip(DIFFUSERS_REQUIRED, (u, v, t))))
    if u.get("addition_embed_type") or u.get("class_embed_type"):
        extra = u.get("addition_embed_type") or u.get("class_embed_type")
        raise _error(
            f"{folder}: this UNet has extra conditioning ({extra}); minisd implements Stable "
            "Diffusion "
            f"1.x/2.x only"
        )
    widths, vae_widths = u["block_out_channels"], v["block_out_channels"]
    # diffusers' old name for the head count
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list) else [heads] * len(widths)
    if len(set(heads)) == 1:
        head_layout = {"num_heads": heads[0], "head_dim": None}
    elif len({w // h for w, h in zip(widths, heads)}) == 1:
        head_layout = {"num_heads": None, "head_dim": widths[0] // heads[0]}
    else:
        raise _error(
            f"{folder}/unet/config.json: heads {heads} for widths {widths} are neither constant "
            "nor "
            f"of one size"
        )
    depth = u.get("transformer_layers_per_block", 1)
    unet = UNetConfig(
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=u["layers_per_block"],
        attention_levels=tuple(kind.startswith("CrossAttn") for kind in u["down_block_types"]),
        context_dim=u["cross_attention_dim"],
        transformer_depth=depth if isinstance(depth, int) else depth[0],
        linear_projection=bool(u.get("use_linear_projection", False)),
        groups=u.get("norm_num_groups", 32),
        **head_layout,
    )
    vae = VAEConfig(
        in_channels=v["in_channels"],
        out_channels=v["out_channels"],
        channels=vae_widths[0],
        channel_mult=tuple(w // vae_widths[0] for w in vae_widths),
        num_res_blocks=v["layers_per_block"],
        latent_channels=v["latent_channels"],
        groups=v.get("norm_num_groups", 32),
    )
    gelu = t.get("hidden_act") == "gelu"
    # diffusers keeps only the text layers SD runs (SD 2: 23 of OpenCLIP's 24), so all of them run
    # here
    text = TextEncoderConfig(
        vocab_size=t["vocab_size"],
        max_length=t["max_position_embeddings"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=t["intermediate_size"] // t["hidden_size"],
        activation=t["hidden_act"],
        # SD 2 pads prompts with 0, SD 1 with end-of-text
        pad_token_id=0 if gelu else 49407,
    )
    why = (
        "--prediction-type"
        if prediction_type
        else "scheduler_config.json"
        if "prediction_type" in s
        else "default"
    )
    prediction_type = prediction_type or s.get("prediction_type", "epsilon")
    config = SDConfig(
        unet=unet,
        vae=vae,
        text=text,
        prediction_type=prediction_type,
        latent_scale=v.get("scaling_factor", SD_LATENT_SCALE),
        beta_schedule=s.get("beta_schedule", "scaled_linear"),
        beta_start=s.get("beta_start", 0.00085),
        beta_end=s.get("beta_end", 0.012),
        num_train_timesteps=s.get("num_train_timesteps", 1000),
        name=f"diffusers:{folder.name}",
        image_size=u.get("sample_size", 64) * 2 ** (len(vae_widths) - 1),
    )
    report(
        f"detected: diffusers pipeline, text {text.layers} layers of width {text.width} "
        f"({text.activation}), UNet "
        f"{unet.in_channels}->{unet.out_channels} channels, context {unet.context_dim}; prediction "
        "type "
        f"{prediction_type} ({why})"
    )
    return config
