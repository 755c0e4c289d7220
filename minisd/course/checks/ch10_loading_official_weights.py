"""Chapter 10 (loading official weights): split OpenCLIP's fused attention projection."""

from __future__ import annotations

import torch

from . import Task

TITLE = "Loading official weights"
GOALS = [
    "Read a checkpoint's key names and map them onto minisd's modules with a small rule table.",
    "Handle the differences between the official SD 1.x/2.x checkpoints, diffusers folders and "
    "minisd files.",
    "Split OpenCLIP's fused q/k/v projection and check the converted model against reference "
    "outputs.",
]
PREREQUISITES = {
    "Math": "none; careful bookkeeping of names and shapes.",
    "PyTorch": "state dicts, `reshape`/`chunk`/`clone`, regular expressions.",
}
READING_MINUTES = 50


def reference_split(in_proj):
    """The converter's rule (minisd.weights.official_keys.split_for_minisd): OpenCLIP
    (torch.nn.MultiheadAttention) stores [W_q; W_k; W_v] stacked along the output axis (dim 0)."""
    from minisd.weights.official_keys import split_for_minisd

    parts = dict(split_for_minisd("text_encoder.layers.0.attn.to_qkv.weight", in_proj))
    return tuple(parts[f"text_encoder.layers.0.attn.to_{name}.weight"] for name in "qkv")


def check_split_fused_qkv(ctx):
    for _ in range(2):
        d = ctx.integer(2, 16)
        fused = ctx.randn(3 * d, d)
        expected = reference_split(fused)
        with ctx.case(f"a fused weight [3d, d] with d = {d}"):
            got = ctx.call(fused)
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                ctx.fail(
                    f"expected a tuple (q, k, v) of 3 tensors, got {type(got).__name__}"
                    + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
                )
            parts = {"q": 0, "k": 1, "v": 2}
            for name, i in parts.items():
                tensor = ctx.expect_tensor(got[i], f"{name}")
                if tensor.shape == expected[i].shape and not torch.equal(tensor, expected[i]):
                    for other, j in parts.items():
                        if torch.equal(tensor, expected[j]):
                            ctx.fail(
                                f"your {name} is the {other} block: the fused tensor stacks q, k, "
                                "v in that "
                                f"order along dim 0"
                            )
                        if expected[j].dim() == 2 and torch.equal(tensor, expected[j].T):
                            ctx.fail(
                                f"your {name} is the transpose of the {other} block: keep the "
                                "blocks as "
                                f"they are stored ([out, in], like nn.Linear.weight)"
                            )
                ctx.expect_close(tensor, expected[i], what=name, atol=0, rtol=0)



# ------------------------------------------------------------------ warm-up: 1×1 convolution <-> linear

def check_conv1x1_to_linear(ctx):
    out_c, in_c = ctx.integer(2, 12), ctx.integer(2, 12)
    conv = ctx.seed_module(torch.nn.Conv2d(in_c, out_c, 1))
    x = ctx.randn(ctx.integer(1, 2), in_c, ctx.integer(2, 4), ctx.integer(2, 4))
    with ctx.case(f"a 1×1 conv weight [{out_c}, {in_c}, 1, 1]"):
        got = ctx.expect_tensor(ctx.call(conv.weight.detach()), "the linear weight")
        if tuple(got.shape) == (in_c, out_c) and in_c != out_c:
            ctx.fail(f"expected shape {(out_c, in_c)}, got {(in_c, out_c)}: nn.Linear's weight is [out, in], like "
                     f"the convolution's")
        ctx.expect_close(got, conv.weight.detach()[:, :, 0, 0], what="weight")
        linear = torch.nn.Linear(in_c, out_c)
        with torch.no_grad():                 # the property that matters: the same map, pixel by pixel
            linear.weight.copy_(got)
            linear.bias.copy_(conv.bias)
            ctx.expect_close(linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), conv(x), what="the layer's output")


# ------------------------------------------------------------------ core: one block's renaming rules

def check_rename_key(ctx):
    rules = [("model.diffusion_model.", "unet."), ("model.diffusion_model.input_blocks.0.0.", "unet.conv_in."),
             ("first_stage_model.", "vae."), ("first_stage_model.quant_conv.", "vae.quant_conv."),
             ("cond_stage_model.transformer.text_model.", "text_encoder."),
             ("model.diffusion_model.out.0.", "unet.norm_out."), ("model.diffusion_model.out.2.", "unet.conv_out.")]
    ctx.random.shuffle(rules)
    orders = [("shuffled rules", rules), ("general rules listed first", sorted(rules, key=lambda r: len(r[0])))]
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias",
            "model.diffusion_model.middle_block.1.norm.weight", "first_stage_model.quant_conv.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.bias", "model_ema.decay"]
    for (order, rules), key in ((o, k) for o in orders for k in keys):
        matches = [(old, new) for old, new in rules if key.startswith(old)]
        expected = None if not matches else (lambda old, new: new + key[len(old):])(
            *max(matches, key=lambda rule: len(rule[0])))
        with ctx.case(f"{order}, key {key!r}"):
            got = ctx.call(key, list(rules))
            if got != expected:
                first = matches[0][1] + key[len(matches[0][0]):] if matches else None
                hint = " (the first matching rule won; the LONGEST matching prefix must)" \
                    if got == first and first != expected else ""
                if expected is None:
                    hint = " (no rule matches: return None)"
                ctx.fail(f"expected {expected!r}, got {got!r}{hint}")


TASKS = [
    Task("split_fused_qkv", "(in_proj_weight)",
         "OpenCLIP's attention layers keep the query, key and value projections in one fused tensor, "
         "`in_proj_weight` [3d, d]. Return the three parts (W_q, W_k, W_v) as separate [d, d] tensors.",
         check_split_fused_qkv,
         "random fused weights of random widths; the parts must be exactly the blocks, in q, k, v order, as "
         "minisd's converter splits them.",
         level="core", minutes=15,
         allowed="torch.",
             forbidden=("minisd.weights.official_keys.split_for_minisd",)),
    Task("conv1x1_to_linear", "(weight)",
         "Turn the weight [out, in, 1, 1] of a 1×1 convolution (the VAE attention's layout in official files) "
         "into the weight [out, in] of the equivalent nn.Linear.",
         check_conv1x1_to_linear,
         "random sizes; the weight and the output of the resulting layer.",
         level="warm-up", minutes=5, allowed="torch."),
    Task("rename_key", "(key, rules)",
         "Rename an official checkpoint key with a rule table: rules is a list of (official prefix, minisd prefix); "
         "the rule with the LONGEST prefix that the key starts with wins (its prefix is replaced); return None "
         "when no rule matches.",
         check_rename_key,
         "UNet, VAE, text-encoder and unknown keys with shuffled, overlapping rules.",
         level="core", minutes=15, allowed="plain Python."),

]
