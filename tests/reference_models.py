"""Build the reference implementations (diffusers, transformers) with the same shapes as a minisd
config.

Only the translation of *configurations* lives here; weights always travel through minisd's own key
mapping (`minisd.weights.keymap.from_diffusers`), so the tests check that mapping too.
"""
from __future__ import annotations

import torch

import minisd
from minisd.weights.keymap import from_diffusers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|: the error measure every parity test uses."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def diffusers_unet(cfg: minisd.SDConfig):
    from diffusers import UNet2DConditionModel
    u = cfg.unet
    widths = [u.channels * m for m in u.channel_mult]
    heads = [u.heads_at(w)[0] for w in widths]
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels
        ),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)
        ),
        block_out_channels=tuple(widths),
        layers_per_block=u.num_res_blocks,
        cross_attention_dim=u.context_dim,
        attention_head_dim=tuple(heads),  # diffusers' historical name: this is the number of heads
        use_linear_projection=u.linear_projection,
        norm_num_groups=u.groups,
        transformer_layers_per_block=u.transformer_depth,
    ).eval()


def diffusers_vae(cfg: minisd.SDConfig):
    from diffusers import AutoencoderKL

    v = cfg.vae
    n = len(v.channel_mult)
    return AutoencoderKL(
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.channels * m for m in v.channel_mult),
        layers_per_block=v.num_res_blocks,
        latent_channels=v.latent_channels,
        norm_num_groups=v.groups,
        sample_size=32,
        scaling_factor=cfg.latent_scale,
    ).eval()


def transformers_clip(cfg: minisd.SDConfig):
    """CLIPTextModel with as many layers as minisd *runs* (SD 2: 23 of 24, hidden_act='gelu', as
    diffusers does)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.text
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.mlp_ratio * t.width,
            num_hidden_layers=t.use_layers or t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.max_length,
            hidden_act=t.activation,
            layer_norm_eps=1e-5,
            projection_dim=t.width,
            # only pooling uses them
            bos_token_id=min(49406, t.vocab_size - 2),
            eos_token_id=min(49407, t.vocab_size - 1),
        )
    ).eval()


def minisd_from_references(
    cfg: minisd.SDConfig, unet=None, vae=None, text=None
) -> minisd.StableDiffusion:
    """A minisd model holding the reference modules' weights (mapped by minisd's keymap); parts not
    given stay random."""
    # Built on the meta device and filled by assignment: no time spent on random init, no second
    # copy of the weights.
    with torch.device("meta"):
        sd = minisd.StableDiffusion(cfg)
    mapped = from_diffusers(
        unet=unet.state_dict() if unet is not None else None,
        vae=vae.state_dict() if vae is not None else None,
        text_encoder=text.state_dict() if text is not None else None,
    )
    for part in ("unet", "vae", "text_encoder"):
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
        own = getattr(sd, part).state_dict()
        unexpected = set(sub) - set(own)
        assert not unexpected, (
            f"keymap produced keys minisd does not have: {sorted(unexpected)[:5]}"
        )
        # Only SD 2's 24th text layer may be absent (the reference keeps 23): everything else must
        # be covered.
        missing = {
            k
            for k in own
            if k not in sub
            and not (
                part == "text_encoder"
                and cfg.text.use_layers
                and k.startswith(f"layers.{cfg.text.use_layers}.")
            )
        }
        assert not sub or not missing, (
            f"keymap left minisd keys without weights: {sorted(missing)[:5]}"
        )
        # Parts not given (and SD 2's unused 24th layer) get random weights.
        sub.update({k: torch.randn(v.shape) * 0.02 for k, v in own.items() if k not in sub})
        getattr(sd, part).load_state_dict(sub, assign=True)
    return sd.eval()
