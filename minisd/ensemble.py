"""Model ensembles: several models denoising together, every step mixing their predictions,

    ε = Σₖ λₖ ε⁽ᵏ⁾          each ε⁽ᵏ⁾ guided with model k's own text encoder (guidance.py)

All members must share the latent space (same VAE layout and latent scale; the first member's VAE
encodes and decodes), the tokenizer, the prediction type and the noise schedule. The pipeline sees
an ensemble through `members` only: a plain model is an ensemble of one.
"""

from __future__ import annotations

from typing import Optional, Sequence

from . import pipeline
from .checks import check_number
from .model import StableDiffusion


class ModelEnsemble:
    """Several models denoising together: at every step ε = Σₖ λₖ ε⁽ᵏ⁾ (each guided with its own
    text encoder).

        ens = ModelEnsemble([sd_a, sd_b], weights=[0.5, 0.5])
        images = ens.generate("a red circle")

    Weights default to equal shares summing to 1 (which keeps the prediction's scale). The first
    model's VAE, tokenizer and config are used for everything outside the UNet.
    """

    def __init__(self, models: Sequence, weights: Optional[Sequence[float]] = None):
        models = list(models)
        if not models:
            raise ValueError("ModelEnsemble needs at least one model")
        for i, model in enumerate(models):
            if not isinstance(model, StableDiffusion):
                raise TypeError(
                    "ModelEnsemble members must be StableDiffusion models, got "
                    f"{type(model).__name__} at {i}"
                )
        weights = [1.0 / len(models)] * len(models) if weights is None else list(weights)
        if len(weights) != len(models):
            raise ValueError(f"ModelEnsemble got {len(models)} models but {len(weights)} weights")
        for w in weights:
            check_number("ensemble weight", w)
        check_compatible(models)
        self.models, self.weights = models, [float(w) for w in weights]

    @property
    def members(self) -> list[tuple]:
        return list(zip(self.models, self.weights))

    def generate(self, *args, **kwargs):
        """As `StableDiffusion.generate` (pipeline.generate), every step mixing the members."""
        return pipeline.generate(self, *args, **kwargs)

    def generate_steps(self, *args, **kwargs):
        return pipeline.denoise_steps(self, *args, **kwargs)


def check_compatible(models: Sequence) -> None:
    """Raise ValueError unless every model shares the first one's latent space, tokenizer, schedule
    and device."""
    first = models[0]

    def facts(sd):
        c = sd.config
        return {
            "VAE layout": c.vae,
            "latent_scale": c.latent_scale,
            "prediction_type": c.prediction_type,
            "noise schedule": (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps),
            "UNet input channels": c.unet.in_channels,
            "tokenizer (vocabulary, context length, pad id)": (
                c.text.vocab_size,
                c.text.max_length,
                c.text.pad_token_id,
            ),
            "device": sd.device,
        }

    reference = facts(first)
    for i, model in enumerate(models[1:], start=1):
        for name, value in facts(model).items():
            if value != reference[name]:
                raise ValueError(
                    f"ensemble member {i} ({model.config.name}) cannot be mixed with member 0 "
                    f"({first.config.name}): different {name}: {value} vs {reference[name]}"
                )
