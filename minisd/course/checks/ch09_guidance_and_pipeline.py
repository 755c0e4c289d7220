"""Chapter 09 (guidance and the pipeline): classifier-free guidance."""
from __future__ import annotations

from . import Task

TITLE = "Guidance and the whole pipeline"
GOALS = [
    "Derive classifier-free guidance and see what the guidance scale does to images.",
    "Assemble the text-to-image pipeline from the pieces of earlier chapters: tokenizer, text encoder, UNet, "
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
    scales = [("a typical scale", round(ctx.uniform(3.0, 12.0), 2)), ("scale 1 (no guidance)", 1.0),
              ("scale 0 (unconditional)", 0.0)]
    for label, scale in scales:
        eps_u, eps_c = ctx.randn(*shape), ctx.randn(*shape)
        mistakes = {
            "your result is ε_c + s·(ε_u − ε_c): the scale pushes away from the conditional prediction instead of "
            "towards it (the two predictions are swapped)": guided(eps_c, eps_u, scale),
            "your result is ε_c + s·(ε_c − ε_u): start from the unconditional prediction":
                eps_c + scale * (eps_c - eps_u),
            "your result is ε_u + s·ε_c: guide along the difference ε_c − ε_u": eps_u + scale * eps_c,
            "your result is s·ε_c: the unconditional prediction is missing": scale * eps_c,
        }
        with ctx.case(f"{label}, s = {scale}"):
            ctx.expect_close(ctx.call(eps_u, eps_c, scale), guided(eps_u, eps_c, scale), what="guided prediction",
                             mistakes=mistakes)


TASKS = [
    Task("classifier_free_guidance", "(eps_uncond, eps_cond, scale)",
         "Combine the UNet's unconditional and conditional noise predictions into the guided prediction: start at the "
         "unconditional one and move `scale` times along the difference towards the conditional one.",
         check_classifier_free_guidance,
         "random predictions of random shapes; scales between 3 and 12, exactly 1, and 0."),
]
