"""From prompt text to the context the UNet cross-attends to: templates, composition, emphasis
weights.

Template:     template="a photo of {}, detailed" wraps every prompt (each part of a composed
              prompt) before encoding.

Composition:  "a cat AND a hat :0.5" -> [("a cat", 1.0), ("a hat", 0.5)]. Each part is encoded
              and guided separately (Liu et al. 2022, "Compositional Visual Generation"; the
              AUTOMATIC1111 webui syntax):
                  ε = ε_u + s · Σᵢ wᵢ (εᵢ − ε_u)          (see guidance.py)
              "AND" must be upper case with spaces around it; a part's weight is a trailing
              ":number".

Emphasis:     "a (red:1.3) circle" scales the context vectors of the emphasised tokens, as the
              AUTOMATIC1111 webui does (not compel, which instead blends with an empty prompt):
                  (text) ×1.1    [text] ÷1.1    (text:w) ×w    nesting multiplies
                  \\( \\) \\[ \\]  literal brackets
              An unmatched ')' or ']' is literal text; a bracket left open applies to the rest of
              the prompt. With per-token weights wₖ the context z [77, D] of one prompt becomes
                  z' = z ⊙ w  rescaled by mean(z) / mean(z ⊙ w)
              so its overall mean (over tokens and channels) is unchanged. The webui takes that mean
              over the whole batch; here it is taken per prompt, so a prompt's context does not
              depend on its neighbours. A prompt without emphasis is tokenized and encoded exactly
              as plain text (weights all 1: no rescale). A context whose mean is zero up to float
              rounding has no mean to keep and is not rescaled (see _emphasise).
"""

from __future__ import annotations

import re
import warnings

import torch

ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_AND = re.compile(r"\s+AND\s+")
_PART_WEIGHT = re.compile(r"^(.*?)\s*:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", re.DOTALL)


def apply_template(text: str, template: str | None) -> str:
    """'cat', 'a photo of {}, detailed' -> 'a photo of cat, detailed'."""
    if template is None:
        return text
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(
            f"template must be a string containing '{{}}' where the prompt goes, got {template!r}"
        )
    return template.replace("{}", text)


def split_composition(prompt: str) -> list[tuple[str, float]]:
    """'a cat AND a hat :0.5' -> [('a cat', 1.0), ('a hat', 0.5)]; a prompt without AND is one part
    of weight 1."""
    parts = []
    for part in _AND.split(prompt):
        match = _PART_WEIGHT.match(part)
        parts.append((match.group(1), float(match.group(2))) if match else (part, 1.0))
    return parts


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """'a (red:1.3) [dull] circle' -> [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('dull', 0.909…), ('
    circle', 1.0)].

    Adjacent pieces of equal weight are merged, so text without emphasis comes back whole with
    weight 1.
    """
    # [text, weight]; weights are multiplied in when a bracket closes
    pieces: list[list] = []
    open_round: list[int] = []  # index into `pieces` where each open '(' started
    open_square: list[int] = []
    buffer, i = "", 0

    def flush():
        nonlocal buffer
        if buffer:
            pieces.append([buffer, 1.0])
        buffer = ""

    def multiply(start: int, factor: float):
        for piece in pieces[start:]:
            piece[1] *= factor

    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            buffer += text[i + 1]
            i += 2
            continue
        weight_close = _WEIGHT_CLOSE.match(text, i) if char == ":" and open_round else None
        if weight_close:
            flush()
            multiply(open_round.pop(), float(weight_close.group(1)))
            i = weight_close.end()
            continue
        if char in "([":
            flush()
            (open_round if char == "(" else open_square).append(len(pieces))
        elif char == ")" and open_round:
            flush()
            multiply(open_round.pop(), ROUND_UP)
        elif char == "]" and open_square:
            flush()
            multiply(open_square.pop(), SQUARE_DOWN)
        else:
            buffer += char
        i += 1
    flush()
    for start in open_round:
        multiply(start, ROUND_UP)
    for start in open_square:
        multiply(start, SQUARE_DOWN)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def tokenize_weighted(
    tokenizer, text: str, max_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt with emphasis -> (ids [max_length] long, weights [max_length] float32);
    BOS/EOS/padding weigh 1."""
    ids, weights = [], []
    for piece, weight in parse_emphasis(text):
        piece_ids = tokenizer.encode(piece)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    if len(ids) > max_length - 2:
        warnings.warn(
            f"prompt longer than CLIP's {max_length}-token context: dropped its last "
            f"{len(ids) - (max_length - 2)} token(s) from {text[:60]!r}",
            stacklevel=3,
        )
        ids, weights = ids[: max_length - 2], weights[: max_length - 2]
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    row += [tokenizer.pad_token_id] * (max_length - len(row))
    weight_row = [1.0, *weights] + [1.0] * (max_length - 1 - len(weights))
    return torch.tensor(row, dtype=torch.long), torch.tensor(weight_row, dtype=torch.float32)


# |mean(z)| at most this times mean(|z|) is a zero mean: float rounding, not a mean to keep (see
# _emphasise). 1e-4 ≈ 800 float32 ε: above what the final LayerNorm's rounding leaves in a row's
# mean (a few ε, times mean|x|/std(x), times √width for its summation), below any mean a context
# has by its LayerNorm bias (e.g. 0.01 of mean|z|).
ZERO_MEAN = 1e-4


def _emphasise(z: torch.Tensor, w: torch.Tensor, prompt: str) -> torch.Tensor:
    """z [77, D] ⊙ w [77] rescaled by mean(z) / mean(z ⊙ w), computed in float64.

    The rescale is a ratio of two means; when mean(z) is zero up to rounding it is a ratio of
    rounding noise (a text encoder whose final LayerNorm has no bias gives every token a zero mean:
    the tiny test models), which picked a random scale, or raised, depending on the CPU's summation
    order. Such a context is left at z ⊙ w: rows of zero mean keep a zero mean under any weights,
    and otherwise the only scale giving mean 0 is 0, which would erase the prompt. float64 makes the
    result depend only on z and w, up to one final rounding to float32.
    """
    z64 = z.double()
    weighted = z64 * w.double()[:, None]
    if abs(z64.mean().item()) <= ZERO_MEAN * z64.abs().mean().item():
        return weighted.to(z.dtype)
    if abs(weighted.mean().item()) <= ZERO_MEAN * weighted.abs().mean().item():
        raise ValueError(
            f"emphasis weights make the context's mean zero in prompt {prompt!r}, so it cannot be "
            "rescaled to the original mean: use weights closer to 1"
        )
    return (weighted * (z64.mean() / weighted.mean())).to(z.dtype)


def has_emphasis(text: str) -> bool:
    return any(char in text for char in "()[]\\")


@torch.no_grad()
def encode_prompts(
    sd, prompts: list[str], weighting: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (context [B, 77, width] in the model's dtype and device, token ids [B, 77]).

    weighting=False reads brackets as plain text (what diffusers does).
    """
    max_length = sd.config.text.max_length
    if not weighting or not any(has_emphasis(p) for p in prompts):
        ids = sd.tokenizer(list(prompts), max_length=max_length)
        return sd.text_encoder(ids.to(sd.device)), ids
    rows = [tokenize_weighted(sd.tokenizer, p, max_length) for p in prompts]
    ids = torch.stack([r[0] for r in rows])
    weights = torch.stack([r[1] for r in rows]).to(sd.device)
    context = sd.text_encoder(ids.to(sd.device))
    for b in range(len(prompts)):
        if torch.all(weights[b] == 1):
            continue  # nothing emphasised: keep the exact plain-text context
        context[b] = _emphasise(context[b], weights[b], prompts[b])
    return context, ids
