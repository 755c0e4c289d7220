"""The model card a minisd file carries: how to sample from the model by default, and what it knows.

A card lives in `SDConfig.card`, so it is saved with the config inside every minisd file. `generate`
and the command line take their defaults from it whenever the caller leaves a setting out:

    guidance_scale   s in ε = ε_u + s·(ε_c − ε_u)   (SD's usual 7.5; the bundled model's 1.5)
    steps, sampler   the sampling schedule           (SD's usual 50 DDIM steps)
    image size       `SDConfig.image_size`, the native resolution (already part of the config)
    vocabulary       for a model minisd trained on captions: the words its captions used, by kind

Official checkpoints and diffusers folders get the default card (SD's usual defaults, no vocabulary:
they know the words of the web). A model trained on minisd's shapes captions knows only those words;
`unknown_words` names the others, so a user learns why "a photo of a cat" draws a coloured blob.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SAMPLERS = ("ddim", "ddpm")
_WORD = re.compile(r"[a-z]+")


@dataclass
class ModelCard:
    guidance_scale: float = 7.5
    steps: int = 50
    sampler: str = "ddim"
    # kind -> words, e.g. {"colours": ("red", ...), "shapes": (...), "other words": ("a", "on")};
    # None: an open vocabulary (CLIP's, for models trained on the web)
    vocabulary: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.guidance_scale, bool) or not isinstance(
            self.guidance_scale, (int, float)
        ) or not self.guidance_scale >= 0:
            raise ValueError(
                f"card: guidance_scale must be a number >= 0, got {self.guidance_scale!r}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"card: steps must be an integer >= 1, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"card: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.vocabulary is not None:
            if not isinstance(self.vocabulary, dict) or not all(
                isinstance(kind, str)
                and isinstance(words, (list, tuple))
                and all(isinstance(w, str) for w in words)
                for kind, words in self.vocabulary.items()
            ):
                raise ValueError("card: vocabulary must map each kind to a list of words")
            # tuples, so a card read back from JSON equals the one saved
            self.vocabulary = {kind: tuple(words) for kind, words in self.vocabulary.items()}

    def known_words(self) -> Optional[set]:
        if self.vocabulary is None:
            return None
        return {word for words in self.vocabulary.values() for word in words}

    def unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words (lower case, letters only) that the card's vocabulary lacks, in order
        and once each; [] for an open vocabulary. Markup such as "(red:1.5)" is not a word."""
        known = self.known_words()
        if known is None:
            return []
        unknown = []
        for word in _WORD.findall(prompt.lower()):
            if word not in known and word not in unknown:
                unknown.append(word)
        return unknown

    def describe_unknown(self, prompt: str, model_name: str = "this") -> Optional[str]:
        """One line naming the prompt's unknown words and what the model knows, or None."""
        unknown = self.unknown_words(prompt)
        if not unknown:
            return None
        kinds = "; ".join(
            f"{kind} {', '.join(words)}"
            for kind, words in self.vocabulary.items()
            if kind != "other words"
        )
        return (
            f"the {model_name} model knows {kinds}; unknown: {', '.join(unknown)} "
            "(the image is made anyway, from what it knows)"
        )


def sampling_defaults(card: ModelCard, steps=None, guidance_scale=None, sampler=None):
    """(steps, guidance_scale, sampler) with each one left out (None) taken from the card."""
    return (
        card.steps if steps is None else steps,
        card.guidance_scale if guidance_scale is None else guidance_scale,
        card.sampler if sampler is None else sampler,
    )
