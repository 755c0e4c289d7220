"""Chapter 09 (guidance and the pipeline): classifier-free guidance."""

from __future__ import annotations

import torch

from minisd.guidance import Conditioning, combine

from . import Task

TITLE = "Guidance and the whole pipeline"
GOALS = [
    "Derive classifier-free guidance and see what the guidance scale does to images.",
    "Assemble the text-to-image pipeline from the pieces of earlier chapters: tokenizer, text "
    "encoder, UNet, "
    "sampler, VAE.",
    "Use negative prompts, img2img and inpainting, and know where each enters the loop.",
]
PREREQUISITES = {
    "Math": "Bayes' rule for scores (gradients of log-densities).",
    "PyTorch": "batching with `torch.cat`/`chunk`.",
}
READING_MINUTES = 60


def guided(eps_uncond, eps_cond, scale):
    """ε̂ = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, as SD writes it)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def check_classifier_free_guidance(ctx):
    shape = (ctx.integer(1, 3), 4, ctx.integer(2, 8), ctx.integer(2, 8))
    scales = [
        ("a typical scale", round(ctx.uniform(3.0, 12.0), 2)),
        ("scale 1 (no guidance)", 1.0),
        ("scale 0 (unconditional)", 0.0),
    ]
    for label, scale in scales:
        eps_u, eps_c = ctx.randn(*shape), ctx.randn(*shape)
        mistakes = {
            "your result is ε_c + s·(ε_u − ε_c): the scale pushes away from the conditional "
            "prediction instead of "
            "towards it (the two predictions are swapped)": guided(eps_c, eps_u, scale),
            "your result is ε_c + s·(ε_c − ε_u): start from the unconditional prediction": eps_c
            + scale * (eps_c - eps_u),
            "your result is ε_u + s·ε_c: guide along the difference ε_c − ε_u": eps_u
            + scale * eps_c,
            "your result is s·ε_c: the unconditional prediction is missing": scale * eps_c,
        }
        with ctx.case(f"{label}, s = {scale}"):
            ctx.expect_close(
                ctx.call(eps_u, eps_c, scale),
                guided(eps_u, eps_c, scale),
                what="guided prediction",
                mistakes=mistakes,
            )



# ------------------------------------------------------------------ core: composed prompts with weights

def _combine_reference(eps_uncond, eps_parts, weights, scale):
    """minisd.guidance.combine on the UNet batch [uncond rows, the parts of image 0, of image 1, ...]."""
    parts, batch = eps_parts.shape[0], eps_parts.shape[1]
    rows = [eps_uncond] + [eps_parts[p, b][None] for b in range(batch) for p in range(parts)]
    cond = Conditioning(context=torch.zeros(1), ids=torch.zeros(1),
                        row_image=torch.tensor(list(range(batch)) + [b for b in range(batch) for _ in range(parts)]),
                        part_weights=torch.tensor([float(weights[p]) for _ in range(batch) for p in range(parts)]),
                        num_images=batch, has_uncond=True)
    return combine(torch.cat(rows), cond, scale)


def check_composed_guidance(ctx):
    for label, parts in (("one part (plain guidance)", 1), ("several parts, one negative", ctx.integer(2, 4))):
        shape = (ctx.integer(1, 3), ctx.integer(1, 4), ctx.integer(2, 5), ctx.integer(2, 5))
        eps_uncond, eps_parts = ctx.randn(*shape), ctx.randn(parts, *shape)
        weights = ctx.rand(parts, low=0.2, high=1.5)
        if parts > 1:
            weights[-1] = -ctx.uniform(0.2, 1.0)
        scale = ctx.uniform(1.5, 12.0)
        expected = _combine_reference(eps_uncond, eps_parts, weights, scale)
        w = weights.reshape(-1, 1, 1, 1, 1)
        mistakes = {
            "your result ignores the weights": eps_uncond + scale * (eps_parts - eps_uncond).sum(0),
            "your result averages the parts instead of summing them":
                eps_uncond + scale * (w * (eps_parts - eps_uncond)).mean(0),
            "your result adds the weighted parts without subtracting the unconditional prediction from each":
                eps_uncond + scale * (w * eps_parts).sum(0),
        }
        with ctx.case(f"{label}: weights {[round(float(x), 2) for x in weights]}, scale {scale:.2f}"):
            ctx.expect_close(ctx.call(eps_uncond, eps_parts, weights, scale), expected, what="ε̃",
                             mistakes=mistakes)


# ------------------------------------------------------------------ warm-up: guidance rescale

def check_rescale_guidance(ctx):
    shape = (ctx.integer(1, 3), ctx.integer(1, 4), ctx.integer(2, 6), ctx.integer(2, 6))
    eps_cond = ctx.randn(*shape)
    eps_guided = eps_cond * ctx.uniform(2, 6) + ctx.randn(*shape)
    phi = ctx.choice([0.0, 0.7, 1.0, ctx.uniform(0.1, 0.9)])
    # Lin et al. (WACV 2024; arXiv 2023), eq. 15–16, per image (as diffusers' rescale_noise_cfg: std over C, H, W)
    dims = list(range(1, eps_cond.dim()))
    rescaled = eps_guided * eps_cond.std(dim=dims, keepdim=True) / eps_guided.std(dim=dims, keepdim=True)
    expected = phi * rescaled + (1 - phi) * eps_guided
    whole = eps_guided * eps_cond.std() / eps_guided.std()
    mistakes = {
        "your standard deviations are over the whole batch; take them per image (over C, H, W)":
            phi * whole + (1 - phi) * eps_guided,
        "your mix is the wrong way round: φ weighs the rescaled prediction": (1 - phi) * rescaled + phi * eps_guided,
    }
    with ctx.case(f"x {shape}, φ = {phi:.2f}"):
        ctx.expect_close(ctx.call(eps_guided, eps_cond, phi), expected, what="rescaled ε̃", mistakes=mistakes)


TASKS = [
    Task("classifier_free_guidance", "(eps_uncond, eps_cond, scale)",
         "Combine the UNet's unconditional and conditional noise predictions into the guided prediction: start at the "
         "unconditional one and move `scale` times along the difference towards the conditional one.",
         check_classifier_free_guidance,
         "random predictions of random shapes; scales between 3 and 12, exactly 1, and 0.",
         level="warm-up", minutes=5,
             forbidden=("minisd.guidance.combine",),
             allowed="arithmetic on the two predictions; not minisd.guidance.combine."),
    Task("composed_guidance", "(eps_uncond, eps_parts, weights, scale)",
         "Guidance for a composed prompt \"A :w₁ AND B :w₂ …\": eps_uncond [B, C, H, W], eps_parts [P, B, C, H, W] "
         "(one prediction per part), weights [P] (negative weights push away). Start at the unconditional "
         "prediction and move `scale` times the weighted sum of each part's difference from it.",
         check_composed_guidance,
         "one and several parts, a negative weight, random scales, against minisd.guidance.combine.",
         level="core", minutes=20, allowed="torch; your classifier_free_guidance."),
    Task("rescale_guidance", "(eps_guided, eps_cond, phi)",
         "Guidance rescale (Lin et al., WACV 2024; arXiv 2023): scale the guided prediction so that each image's "
         "standard deviation (over C, H, W) equals that of the conditional prediction, then return φ·rescaled + "
         "(1 − φ)·eps_guided.",
         check_rescale_guidance,
         "random predictions and φ in [0, 1], against the paper's formula (as diffusers implements it).",
         level="warm-up", minutes=15, allowed="torch."),

]
