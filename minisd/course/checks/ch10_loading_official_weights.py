"""Chapter 10 (loading official weights): split OpenCLIP's fused attention projection."""
from __future__ import annotations

import torch

from . import Task

TITLE = "Loading official weights"
GOALS = [
    "Read a checkpoint's key names and map them onto minisd's modules with a small rule table.",
    "Handle the differences between the official SD 1.x/2.x checkpoints, diffusers folders and minisd files.",
    "Split OpenCLIP's fused q/k/v projection and check the converted model against reference outputs.",
]
PREREQUISITES = {
    "Math": "none; careful bookkeeping of names and shapes.",
    "PyTorch": "state dicts, `reshape`/`chunk`/`clone`, regular expressions.",
}
READING_MINUTES = 50


def reference_split(in_proj):
    """The converter's rule (minisd.weights.official_keys.split_for_minisd): OpenCLIP (torch.nn.MultiheadAttention) stores
    [W_q; W_k; W_v] stacked along the output axis (dim 0)."""
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
                ctx.fail(f"expected a tuple (q, k, v) of 3 tensors, got {type(got).__name__}"
                         + (f" of {len(got)}" if isinstance(got, (tuple, list)) else ""))
            parts = {"q": 0, "k": 1, "v": 2}
            for name, i in parts.items():
                tensor = ctx.expect_tensor(got[i], f"{name}")
                if tensor.shape == expected[i].shape and not torch.equal(tensor, expected[i]):
                    for other, j in parts.items():
                        if torch.equal(tensor, expected[j]):
                            ctx.fail(f"your {name} is the {other} block: the fused tensor stacks q, k, v in that "
                                     f"order along dim 0")
                        if expected[j].dim() == 2 and torch.equal(tensor, expected[j].T):
                            ctx.fail(f"your {name} is the transpose of the {other} block: keep the blocks as "
                                     f"they are stored ([out, in], like nn.Linear.weight)")
                ctx.expect_close(tensor, expected[i], what=name, atol=0, rtol=0)


TASKS = [
    Task("split_fused_qkv", "(in_proj_weight)",
         "OpenCLIP's attention layers keep the query, key and value projections in one fused tensor, "
         "`in_proj_weight` [3d, d]. Return the three parts (W_q, W_k, W_v) as separate [d, d] tensors.",
         check_split_fused_qkv,
         "random fused weights of random widths; the parts must be exactly the blocks, in q, k, v order, as "
         "minisd's converter splits them."),
]
