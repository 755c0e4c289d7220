"""Chapter 13 (contrastive pretraining): the symmetric InfoNCE loss, a zero-shot classifier, and the
[EOS] pooling that turns a causal text encoder's states into a sentence embedding."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from minisd.contrastive import contrastive_loss, eos_positions

from . import Task

TITLE = "Contrastive pretraining (a tiny CLIP)"
READING_MINUTES = 60
GOALS = [
    "Derive CLIP's symmetric InfoNCE loss as two N-way classifications over a batch of pairs.",
    "Say what the learned temperature does, and why CLIP starts it at 0.07 and caps 1/T at 100.",
    "Explain why the [EOS] token's final state is the sentence embedding of a causal text encoder.",
    "Train a tiny CLIP on a CPU, and classify images zero-shot with prompt ensembles.",
]


def _loss_of(u, v, scale):
    return contrastive_loss(scale * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T)


def check_infonce(ctx):
    def run(label, n, d, scale):
        u, v = ctx.randn(n, d, scale=ctx.uniform(0.5, 3.0)), ctx.randn(n, d)
        if ctx.integer(0, 1):
            v = v + 2 * u  # partly aligned pairs: the loss is then well below ln N
        scale_tensor = torch.tensor(scale)
        expected = _loss_of(u, v, scale)
        un, vn = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        targets = torch.arange(n)
        one_way = (
            "your loss only asks each {} to find its {} ({}); the symmetric loss averages the "
        )
        one_way += "two directions"
        mistakes = {
            one_way.format("image", "caption", "rows"): F.cross_entropy(scale * un @ vn.T, targets),
            one_way.format("caption", "image", "columns"): F.cross_entropy(
                scale * vn @ un.T, targets
            ),
            "your logits miss the temperature: multiply the cosine similarities by logit_scale": (
                _loss_of(u, v, 1.0)
            ),
            "your logits divide by logit_scale: it is 1/T already, so multiply": (
                _loss_of(u, v, 1.0 / scale)
            ),
            "your logits use unnormalized embeddings: CLIP's logits are cosine similarities": (
                contrastive_loss(scale * u @ v.T)
            ),
            "your loss adds the two cross-entropies: take their mean": 2 * expected,
        }
        with ctx.case(label):
            got = ctx.expect_tensor(ctx.call(u, v, scale_tensor), "the loss")
            if got.numel() != 1:
                ctx.fail(f"the loss should be a single number, got shape {tuple(got.shape)}")
            ctx.expect_close(
                got.reshape(()).float(),
                expected,
                what="loss",
                atol=1e-5,
                rtol=1e-4,
                mistakes=mistakes,
            )

    n = ctx.integer(3, 12)
    run(f"{n} pairs of 8-dim embeddings, logit_scale 1/0.07", n, 8, 1 / 0.07)
    n, d = ctx.integer(2, 16), ctx.choice([4, 16, 32])
    scale = ctx.uniform(5.0, 100.0)
    run(f"{n} pairs of {d}-dim embeddings, logit_scale {scale:.3g}", n, d, scale)

    # The loss must stay differentiable: the towers and the temperature learn through it. The
    # sandbox makes the three inputs leaves that require grad and runs backward() there.
    with ctx.case("gradients reach the embeddings and the temperature"):
        n = ctx.integer(3, 8)
        u, v = ctx.randn(n, 8), ctx.randn(n, 8)
        scale = torch.tensor(2.659).exp()
        _, grads = ctx.call_with_input_grads(u, v, scale, wrt=(0, 1, 2))
        if grads is None:
            ctx.fail(
                "the loss is not connected to its inputs: no .item(), .detach() or torch.no_grad()"
            )
        leaves = [t.clone().requires_grad_(True) for t in (u, v, scale)]
        expected_grads = torch.autograd.grad(_loss_of(*leaves), leaves)
        names = ("image embeddings", "text embeddings", "logit scale")
        for position, (name, expected) in enumerate(zip(names, expected_grads)):
            got = grads.get(position)
            if got is None:
                ctx.fail(f"the loss has no gradient with respect to the {name}")
            # float32 sums of <= 8x8 terms of size <= 100 (the scale): ~1e-5 relative
            ctx.expect_close(got, expected, what=f"gradient of the {name}", atol=1e-5, rtol=1e-3)


def _predict(u, v, prompt_class, classes, ensemble="normalized_sum"):
    weights = torch.zeros(classes, v.shape[1]).index_add_(0, prompt_class, v)
    if ensemble == "normalized_sum":
        weights = F.normalize(weights, dim=-1)
    elif ensemble == "mean":
        counts = torch.bincount(prompt_class, minlength=classes).clamp(min=1)
        weights = weights / counts[:, None]
    return (u @ weights.T).argmax(dim=1)


def check_zero_shot(ctx):
    unequal, equal = "some classes with more prompts than others", "two prompts per class"
    for label_kind in (unequal, equal, unequal):
        classes, d, n = ctx.integer(3, 6), ctx.choice([8, 16]), ctx.integer(40, 80)
        if label_kind == equal:
            prompt_class = torch.arange(classes).repeat_interleave(2)
        else:
            counts = [ctx.integer(1, 6) for _ in range(classes)]
            prompt_class = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
        prompt_class = prompt_class[torch.randperm(len(prompt_class), generator=ctx.generator)]
        # Prompts scatter around a per-class direction (like the captions of one colour), some
        # classes tightly, some loosely: then a forgotten renormalization changes predictions.
        centres = ctx.randn(classes, d)
        spread = torch.tensor([ctx.uniform(0.2, 2.0) for _ in range(classes)])
        noise = spread[prompt_class, None] * ctx.randn(len(prompt_class), d)
        v = F.normalize(centres[prompt_class] + noise, dim=-1)
        u = F.normalize(
            centres[torch.randint(classes, (n,), generator=ctx.generator)] + 1.2 * ctx.randn(n, d),
            dim=-1,
        )
        expected = _predict(u, v, prompt_class, classes)
        nearest_prompt = prompt_class[(u @ v.T).argmax(dim=1)]
        wrong = {
            "you pick the class of the nearest single prompt; average each class's prompts first "
            "(prompt ensembling), then pick the nearest class": nearest_prompt,
            "your class embeddings are means of the prompts, not renormalized to unit length: "
            "classes whose prompts disagree get shorter vectors and lose unfairly": _predict(
                u, v, prompt_class, classes, ensemble="mean"
            ),
            "your class embeddings are sums of the prompts, not renormalized: classes with more "
            "prompts win more often": _predict(u, v, prompt_class, classes, ensemble="sum"),
        }
        with ctx.case(f"{n} images, {classes} classes, {len(prompt_class)} prompts ({label_kind})"):
            got = ctx.expect_tensor(ctx.call(u, v, prompt_class, classes), "the predictions")
            if tuple(got.shape) != (n,):
                ctx.fail(
                    f"expected one class index per image, shape ({n},), got {tuple(got.shape)}"
                )
            if got.dtype not in (torch.int64, torch.int32):
                ctx.fail(f"expected integer class indices (argmax), got dtype {got.dtype}")
            bad = (got.long() != expected).nonzero().flatten().tolist()
            if bad:
                notes = [text for text, answer in wrong.items() if torch.equal(got.long(), answer)]
                i = bad[0]
                ctx.fail(
                    f"{len(bad)} of {n} predictions differ (image {i}: predicted class "
                    f"{int(got[i])}, expected {int(expected[i])})"
                    + (f"; {notes[0]}" if notes else "")
                )


# Token-id conventions the pooling must handle: (label, BOS, EOS, pad, caption ids drawn from).
# OpenAI's CLIP (SD 1) pads with EOS itself; OpenCLIP (SD 2) pads with 0; the third is a made-up
# vocabulary whose EOS is not its largest id, where `ids.argmax()` stops finding the EOS.
ID_CONVENTIONS = [
    ("SD 1's convention: EOS 49407, padding with EOS", 49406, 49407, 49407, (256, 49406)),
    ("SD 2's convention: EOS 49407, padding with 0", 49406, 49407, 0, (256, 49406)),
    ("another vocabulary: EOS 2 is not the largest id, padding with 0", 1, 2, 0, (3, 1000)),
]


def _caption_ids(ctx, rows: int, n: int, bos: int, eos: int, pad: int, vocab) -> torch.Tensor:
    """rows × n ids: BOS, a caption of random length (one row fills the whole context), EOS,
    padding."""
    lengths = [ctx.integer(0, n // 2) for _ in range(rows)]
    lengths[ctx.integer(0, rows - 1)] = n - 2  # EOS in the last position: no padding at all
    ids = torch.full((rows, n), pad, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = ctx.randint(vocab[0], vocab[1], (length,))
        ids[row, : length + 2] = torch.cat([torch.tensor([bos]), words, torch.tensor([eos])])
    return ids


def check_eos_pooling(ctx):
    for label, bos, eos, pad, vocab in ID_CONVENTIONS:
        rows, n = ctx.integer(3, 6), ctx.choice([16, 24, 77])
        width = ctx.choice([8, 16, 32])
        dim = width if eos == 2 else ctx.choice([6, 12])  # square once: catches a missing ᵀ
        states, projection = ctx.randn(rows, n, width), ctx.randn(dim, width, scale=0.5)
        ids = _caption_ids(ctx, rows, n, bos, eos, pad, vocab)
        first = eos_positions(ids, eos)
        rows_index = torch.arange(rows)

        def pooled(positions, project=True, normalize=True, weights=projection):
            picked = states[rows_index, positions]
            out = picked @ weights.T if project else picked
            return F.normalize(out, dim=-1) if normalize else out

        last_eos = n - 1 - (ids == eos).flip(1).int().argmax(dim=1)
        upto_eos = torch.arange(n)[None, :] <= first[:, None]
        mean_upto = (states * upto_eos[..., None]).sum(1) / upto_eos.sum(1, keepdim=True)
        expected = pooled(first)
        mistakes = {
            "you take the state at the last position: after the caption come padding tokens; "
            "take the state of each row's first end-of-text token": lambda: pooled(
                torch.full((rows,), n - 1)
            ),
            "you take the last end-of-text token of each row: where the padding is EOS itself "
            "(SD 1), that is the end of the padding; take the first": lambda: pooled(last_eos),
            "you take the argmax of the ids: that finds the end-of-text token only where it is "
            "the largest id of the vocabulary (OpenAI's 49407); look for eos_token_id itself": (
                lambda: pooled(ids.argmax(dim=1))
            ),
            "you take the first token's state (start-of-text): under the causal mask it has read "
            "nothing but itself, the same for every caption": lambda: pooled(
                torch.zeros(rows, dtype=torch.long)
            ),
            "you take the state just before the end-of-text token (the caption's last word); "
            "CLIP takes the end-of-text state itself": lambda: pooled(first - 1),
            "you average the states up to the end-of-text token; CLIP takes that one state "
            "alone": lambda: F.normalize(mean_upto @ projection.T, dim=-1),
            "you average the states over all positions; CLIP takes the end-of-text state "
            "alone": lambda: F.normalize(states.mean(1) @ projection.T, dim=-1),
            "your embeddings are not unit length: normalize after the projection": lambda: (
                pooled(first, normalize=False)
            ),
            "you normalize before the projection only: project the state, then normalize": (
                lambda: F.normalize(states[rows_index, first], dim=-1) @ projection.T
            ),
            "you multiply by the projection untransposed: it is stored as nn.Linear's weight, "
            "[D, width], so the embedding is state · projectionᵀ": lambda: pooled(
                first, weights=projection.T
            ),
        }
        with ctx.case(f"{label}: {rows} captions of {n} ids, states of width {width} → {dim}"):
            got = ctx.call(states, ids, eos, projection)
            ctx.expect_close(got, expected, what="the sentence embeddings", atol=1e-5,
                             mistakes=mistakes)


TASKS = [
    Task(
        "symmetric_infonce",
        "(image_embeddings, text_embeddings, logit_scale)",
        "CLIP's loss for a batch of N pairs: image_embeddings and text_embeddings are [N, D] "
        "(row i of each is a pair, not necessarily unit length), logit_scale a 0-dim tensor "
        "s = 1/T. Normalize both, form the [N, N] logits s·u·vᵀ, and return the mean of the two "
        "cross-entropies (images choosing captions, captions choosing images), a 0-dim tensor that "
        "gradients flow through.",
        check_infonce,
        "random batch sizes, embedding widths, logit scales from 5 to 100, unaligned and partly "
        "aligned pairs; the gradients with respect to both embeddings and the scale.",
    ),
    Task(
        "zero_shot_predict",
        "(image_embeddings, prompt_embeddings, prompt_class, num_classes)",
        "Zero-shot classification with prompt ensembles: image_embeddings [N, D] and "
        "prompt_embeddings [P, D] are unit vectors, prompt_class [P] says which of num_classes "
        "classes each prompt describes. Each class's embedding is the normalized sum of its "
        "prompts' embeddings; return the LongTensor [N] of the class whose embedding has the "
        "largest dot product with each image.",
        check_zero_shot,
        "random class counts (3 to 6), prompts per class equal and unequal, 40 to 80 images; "
        "predictions compared one by one.",
    ),
    Task(
        "eos_pooling",
        "(states, ids, eos_token_id, projection)",
        "The sentence embedding of a causal text encoder, as CLIP takes it: states [B, n, width] "
        "are the encoder's final hidden states for token ids [B, n] (BOS, caption, EOS, padding); "
        "projection [D, width] is stored as nn.Linear's weight (no bias). Take each row's state "
        "at its first eos_token_id, project it and return the [B, D] unit vectors.",
        check_eos_pooling,
        "OpenAI's ids padded with EOS (SD 1) and with 0 (SD 2), a vocabulary whose EOS is not "
        "its largest id, captions of random lengths (one filling the whole context), against "
        "minisd.contrastive's eos_positions.",
        forbidden=("minisd.contrastive.eos_positions",),
        allowed="torch.",
        level="warm-up",
        minutes=10,
    ),
]
