"""Teach a trained model a new word — the colour "orange" — from a few dozen pictures, with LoRA, on
a CPU in minutes.

    python -m minisd finetune --out runs/orange   # bundled model -> runs/orange/orange.safetensors

What is trained (everything else stays frozen):
  - LoRA adapters (lora.py) on to_q, to_k, to_v, to_out of every attention layer of the UNet and the
  text encoder:
        W x  ->  W x + (α/r) · B A x
  - the token-embedding row of the new word (textual inversion, Gal et al. 2022): the base text
    encoder never saw "orange" (its row is still the random init), so the word first needs a vector
    of its own.
The loss is the base model's own (train_ldm.py): ‖UNet(z_t, t, c) − target‖², with the caption
dropped 10% of the time.

Data: `--images` (default 48) pictures of orange shapes (hue 30°, half-way between red and yellow)
of every shape, size and position, mixed 1:1 with pictures of the base training distribution ("prior
preservation", as in DreamBooth) so the adapter does not bend the old words.

Why a colour and not a new shape: only what the frozen autoencoder can draw can be taught through
the UNet. The bundled VAE saw circles, squares and triangles; it decodes a star as a pentagon and a
small diamond as a dot, but it reproduces any hue. The shapes dataset and the fidelity detector know
six colours; `extra_colour` adds one more to both (renderer, caption parser, nearest-hue classifier)
for the duration of a block.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..config import BUNDLED_MODEL
from ..weights.convert import load
from ..pipeline import noise_schedule
from . import shapes_dataset
from . import training as T
from .evaluate import fidelity, prompts_of
from .lora import add_lora, lora_parameters, save_adapter
from .shapes_dataset import (
    POSITIONS,
    SHAPES,
    SIZES,
    SceneObject,
    SceneSpec,
    caption,
    render,
)
from .train_ldm import Denoiser, diffusion_loss, encode_pool

NEW_WORD = "orange"
NEW_HUE = 30.0  # degrees; red is 0, yellow 60: the detector's nearest-hue rule then accepts 15°–45°


@contextmanager
def extra_colour(name: str = NEW_WORD, hue: float = NEW_HUE):
    """Within the block the dataset's renderer and parser and the fidelity detector know one more
    colour.

    The palette is the dict shapes_dataset.COLOUR_HUES, which fidelity shares, plus the tuple
    shapes_dataset.COLOURS that the parser checks words against; both are extended on entry and
    restored on exit. Sampling of the *training* split is not meant to run inside (it would draw the
    new colour too).
    """
    if name in shapes_dataset.COLOUR_HUES:  # already inside such a block
        yield
        return
    saved = shapes_dataset.COLOURS
    shapes_dataset.COLOUR_HUES[name] = hue
    shapes_dataset.COLOURS = saved + (name,)
    try:
        yield
    finally:
        shapes_dataset.COLOURS = saved
        del shapes_dataset.COLOUR_HUES[name]


def new_concept_scenes(count: int, seed: int, colour: str = NEW_WORD):
    """`count` one-object scenes of the new colour, with random shapes, sizes and positions."""
    rng = np.random.default_rng(seed)
    with extra_colour():
        return [
            SceneSpec(
                [
                    SceneObject(
                        colour,
                        SHAPES[rng.integers(len(SHAPES))],
                        SIZES[rng.integers(len(SIZES))],
                        POSITIONS[rng.integers(len(POSITIONS))],
                    )
                ]
            )
            for _ in range(count)
        ]


def render_new_concept(
    count: int, seed: int, image_size: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """(uint8 [count, 3, H, W], captions) of jittered pictures of the new colour."""
    rng = np.random.default_rng([seed, 1])
    with extra_colour():
        scenes = new_concept_scenes(count, seed)
        images = np.stack([render(spec, image_size, rng) for spec in scenes])
        captions = [caption(spec) for spec in scenes]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def new_concept_prompts(count: int, seed: int) -> list[str]:
    with extra_colour():
        return [caption(spec) for spec in new_concept_scenes(count, seed)]


def finetune(
    sd,
    out: Path,
    images: int = 48,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 2e-3,
    rank: int = 4,
    seed: int = 0,
    cfg_dropout: float = 0.1,
    log=print,
) -> dict:
    """Add LoRA + a trainable word row to `sd` (in place), train, save out/orange.safetensors;
    returns a summary."""
    torch.manual_seed(seed)
    sd.requires_grad_(False)
    add_lora(sd.unet, rank=rank)
    add_lora(sd.text_encoder, rank=rank)
    word_ids = sd.tokenizer.encode(NEW_WORD)
    embedding = sd.text_encoder.token_embedding.weight
    word_rows = torch.nn.Parameter(embedding.detach()[word_ids].clone())
    parameters = lora_parameters(sd.unet) + lora_parameters(sd.text_encoder)
    optimizer = torch.optim.AdamW(
        [{"params": parameters}, {"params": [word_rows], "weight_decay": 0.0}],
        lr=lr,
        weight_decay=0.0,
    )

    # Data: the new concept, and ten times as many base pictures (prior preservation), encoded once
    # by the VAE.
    new_images, new_captions = render_new_concept(images, seed, sd.config.image_size)
    base_images, base_captions = T.render_pool(sd.config.image_size, images * 10, seed + 1, "val")
    pool = torch.cat([new_images, base_images])
    captions = new_captions + base_captions
    mean, std = encode_pool(sd, pool, sd.device)
    distinct = sorted(set(captions))
    position = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in captions])
    caption_ids = sd.tokenizer(distinct + [""])
    schedule = noise_schedule(sd)
    denoiser = Denoiser(sd).train()
    log(
        f"fine-tuning on {images} pictures of '{NEW_WORD}' + {len(base_images)} base pictures: "
        f"{sum(p.numel() for p in parameters):,} LoRA parameters + {word_rows.numel()} embedding "
        f"values, {steps} steps"
    )

    losses, began = [], time.time()
    for step in range(steps):
        g = T.step_generator(seed, step)
        # half of every batch shows the new concept, half the base distribution
        half = batch_size // 2
        index = torch.cat(
            [
                torch.randint(images, (half,), generator=g),
                images + torch.randint(len(base_images), (batch_size - half,), generator=g),
            ]
        )
        z0 = sd.config.latent_scale * (
            mean[index] + std[index] * torch.randn(mean[index].shape, generator=g)
        )
        t = torch.randint(0, sd.config.num_train_timesteps, (batch_size,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        drop = torch.rand(batch_size, generator=g) < cfg_dropout
        ids = caption_ids[
            torch.where(drop, torch.full_like(index, len(distinct)), caption_index[index])
        ]
        # The embedding table is frozen; the word's rows enter through a differentiable
        # substitution.
        loss = diffusion_loss(
            lambda z_t, t, ids: _forward_with_word(denoiser, z_t, t, ids, word_ids, word_rows),
            schedule,
            z0,
            t,
            eps,
            ids,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(
                f"  step {step + 1}: loss {np.mean(losses[-50:]):.4f} ({time.time() - began:.0f} s)"
            )
    with torch.no_grad():
        # the learned vector goes into the table (and the adapter file)
        embedding[word_ids] = word_rows.detach()
    denoiser.eval()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NEW_WORD}.safetensors"
    save_adapter(
        sd,
        path,
        token_ids=word_ids,
        info={
            "word": NEW_WORD,
            "steps": steps,
            "images": images,
            "seed": seed,
            "rank": rank,
            "lr": lr,
        },
    )
    return {
        "adapter": str(path),
        "seconds": round(time.time() - began, 1),
        "first_loss": float(np.mean(losses[:20])),
        "last_loss": float(np.mean(losses[-50:])),
        "bytes": path.stat().st_size,
    }


def _forward_with_word(denoiser, z_t, t, ids, word_ids, word_rows):
    """UNet(z_t, t, TextEncoder(ids)) with the word's embedding rows taken from the trainable
    `word_rows`.

    A forward hook on the embedding replaces the looked-up vectors at the word's positions, so the
    gradient reaches word_rows and no other row of the 49,408-row table changes.
    """
    embedding = denoiser.text_encoder.token_embedding

    def substitute(module, inputs, output):
        (token_ids,) = inputs
        for row, word_id in zip(word_rows, word_ids):
            output = torch.where((token_ids == word_id)[..., None], row, output)
        return output

    handle = embedding.register_forward_hook(substitute)
    try:
        return denoiser(z_t, t, ids)
    finally:
        handle.remove()


def measure(
    sd,
    new_prompts: int = 50,
    base_prompts: int = 100,
    guidance_scale: float = 3.0,
    seed: int = 100,
    steps: int = 50,
) -> dict:
    """Fidelity on prompts of the new concept (the detector knows the new colour) and on seen base
    prompts (0: skip)."""
    result = {"guidance_scale": guidance_scale, "prompt_seed": seed, "image_seed": seed}
    if new_prompts:
        with extra_colour():
            result["new"] = fidelity(
                sd, new_concept_prompts(new_prompts, seed), guidance_scale, seed, steps
            )
    if base_prompts:
        result["base"] = fidelity(
            sd, prompts_of("val", base_prompts, seed), guidance_scale, seed, steps
        )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument(
        "--model", default=str(BUNDLED_MODEL), help="the base model (default: the bundled one)"
    )
    p.add_argument("--out", required=True, help="folder for orange.safetensors (the adapter alone)")
    p.add_argument("--images", type=int, default=48, help="pictures of the new concept")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale for the measurement")
    p.add_argument(
        "--measure",
        type=int,
        default=50,
        help="prompts of the new concept to score before and after (and twice as many base "
        "prompts after; 0: skip)",
    )
    p.add_argument("--json", default=None, help="also write the summary and measurements here")


def main(args: argparse.Namespace) -> int:
    for name in ("images", "steps", "batch_size", "rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = T.prepare_output_folder(args.out, resume=True)
    sd = load(args.model)
    before = measure(sd, args.measure, 0, args.guidance) if args.measure else None
    summary = finetune(
        sd, out, args.images, args.steps, args.batch_size, args.lr, args.rank, args.seed
    )
    print(
        f"adapter {summary['adapter']} ({summary['bytes'] / 1e3:.0f} kB), loss "
        f"{summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}, {summary['seconds']} s"
    )
    if args.measure:
        after = measure(sd, args.measure, 2 * args.measure, args.guidance)
        print(
            f"'{NEW_WORD}' prompts ({args.measure}, seeds {after['prompt_seed']}+): colour+shape "
            f"{before['new']['colour_shape']:.1%} before, {after['new']['colour_shape']:.1%} after "
            f"(full {after['new']['full']:.1%}); base prompts ({2 * args.measure}) colour+shape "
            f"{after['base']['colour_shape']:.1%}, full {after['base']['full']:.1%} with the "
            "adapter"
        )
        summary.update(before=before, after=after)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0
