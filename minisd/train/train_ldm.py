"""Train the latent diffusion model — UNet and CLIP-architecture text encoder together, from
scratch, or the UNet alone on the tiny CLIP's frozen text tower (`--text-encoder tiny-clip`).

    python -m minisd train --vae runs/vae/vae.safetensors --out runs/ldm --steps 20000

One training step (Rombach et al. 2022, eq. 2), for a batch of (image, caption) pairs:

    z₀ = latent_scale · (μ + σ ⊙ n),  (μ, σ) = VAE encoder(image)    (VAE trained first, frozen)
    t ~ U{0, …, T−1},  ε ~ N(0, I),   z_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε          (schedule.q_sample)
    c = TextEncoder(tokens(caption)),  caption → "" with probability p_drop   (for CFG, guidance.py)
        (the text encoder is trained too, or pretrained and frozen: frozen_text.py)
    L = ‖ UNet(z_t, t, c) − target ‖²,  target = ε or v = √ᾱ_t · ε − √(1 − ᾱ_t) · z₀
                                                                        (schedule.training_target)

Dropping the caption teaches the same network the unconditional prediction that guidance
extrapolates away from. The weights that get saved are the exponential moving average
(training.EMA). Images come from a pool of rendered shapes (training.render_pool) encoded once by
the VAE; each step draws fresh posterior noise n, t and ε. Run it under `torchrun --nproc_per_node=N
-m minisd train ...` for N processes (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..attention import set_attention_backend
from ..config import PREDICTION_TYPES
from ..model import StableDiffusion
from ..pipeline import noise_schedule
from ..weights.minisd_file import save
from . import frozen_text
from . import training as T
from .scene_language import caption_vocabulary as scene_vocabulary
from .shapes_dataset import caption_vocabulary
from .train_vae import load_vae

MODEL_FILE = "model.safetensors"
RECIPE = (
    "batch_size",
    "lr",
    "warmup",
    "ema_decay",
    "cfg_dropout",
    "seed",
    "pool_size",
    "weight_decay",
    "snr_gamma",
    "dataset",
    "text_encoder",
    "text_layer",
)
SAMPLE_PROMPTS = (
    "a large red circle in the center",
    "a small blue square on the left",
    "a large green triangle at the top",
    "a small yellow circle at the bottom",
    "a large magenta square on the right",
    "a small cyan triangle in the center",
    "a large red square at the top and a small green circle at the bottom",
    "a small yellow triangle on the left and a large blue square on the right",
    # held-out colour-shape pairs (never in the training captions)
    "a large red triangle in the center",
    "a large blue circle on the left",
    "a small yellow square at the top",
    "a large magenta triangle on the right",
)
SAMPLE_PROMPTS_V2 = (  # --dataset scenes; the last four state held-out elements (scenes.py)
    "a green circle",
    "two red stars",
    "a large blue ring in the top left corner",
    "a small yellow square at the bottom on a black background",
    "a purple cross left of a cyan triangle",
    "an orange star above a pink circle on stripes",
    "three green squares on a gradient",
    "a red circle, a blue square and a yellow star",
    "a large red ring in the center",
    "three yellow stars",
    "a pink circle above a green square",
    "two blue rings on a white background",
)


class Denoiser(nn.Module):
    """The trainable part: ε_θ(z_t, t, caption ids) = UNet(z_t, t, TextEncoder(ids)), one module for
    DDP. With `frozen_text` the text encoder runs without gradients and stays in eval mode."""

    def __init__(self, sd: StableDiffusion, frozen_text: bool = False):
        super().__init__()
        self.unet = sd.unet
        self.text_encoder = sd.text_encoder
        self.frozen_text = frozen_text

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_text):
            context = self.text_encoder(ids)  # frozen: no graph through the tower, nothing to learn
        return self.unet(z_t, t, context)

    def train(self, mode: bool = True) -> "Denoiser":
        super().train(mode)
        if self.frozen_text:
            self.text_encoder.eval()
        return self


def diffusion_loss(
    model,
    schedule,
    z0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    ids: torch.Tensor,
    t_cpu: Optional[torch.Tensor] = None,
    snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """‖model(z_t, t, ids) − target‖² with z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε and target = ε or v (module
    docstring).

    With `snr_gamma` = γ each example's error is weighted by Min-SNR-γ (Hang et al. 2023, eq. 10 and
    its v form):
        w_t = min(SNR_t, γ) / SNR_t        for ε,        w_t = min(SNR_t, γ) / (SNR_t + 1)   for v,
    SNR_t = ᾱ_t / (1 − ᾱ_t). It stops the nearly clean timesteps (huge SNR, easy) from dominating
    the gradient, which makes short runs converge faster; None keeps the plain loss that Stable
    Diffusion was trained with. `t_cpu` (the same timesteps on the CPU) lets the schedule look ᾱ_t
    up without waiting for the GPU.
    """
    lookup = t if t_cpu is None else t_cpu
    z_t = schedule.q_sample(z0, lookup, eps)
    target = schedule.training_target(z0, eps, lookup)
    prediction = model(z_t, t, ids).float()
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    snr = schedule.snr(lookup)
    weight = snr.clamp(max=snr_gamma) / (snr if schedule.prediction_type == "epsilon" else snr + 1)
    per_example = (prediction - target).pow(2).flatten(1).mean(dim=1)
    return (weight.to(per_example.device) * per_example).mean()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument(
        "--out",
        required=True,
        help="folder for checkpoint.pt, model.safetensors, loss.jsonl, samples",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="vae.safetensors from `python -m minisd train-vae` (not with --resume)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="architecture preset (default: the one the VAE was trained for)",
    )
    p.add_argument(
        "--config", default=None, help="an SDConfig as a JSON file (instead of --preset)"
    )
    p.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="what the UNet learns to output (default: the config's)",
    )
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument(
        "--batch-size", type=int, default=64, help="global batch, split across processes"
    )
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--cfg-dropout",
        type=float,
        default=0.1,
        help="probability of training on the empty caption",
    )
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="weight the loss by Min-SNR-γ (e.g. 5; faster convergence); default: plain MSE",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-encoder",
        default="joint",
        help="joint: a text encoder trained with the UNet from scratch; tiny-clip: the tiny CLIP's "
        "pretrained text tower, frozen (frozen_text.py)",
    )
    p.add_argument(
        "--text-layer",
        default=None,
        help="with tiny-clip: the tower's 'final' layer (SD 1; the default) or 'penultimate' "
        "(SD 2), each followed by the final LayerNorm",
    )
    p.add_argument(
        "--clip",
        default=None,
        help="with tiny-clip: a tiny_clip.safetensors from `python -m minisd train-clip` "
        "(default: the bundled one; not with --resume: the checkpoint holds the tower)",
    )
    T.add_dataset_argument(p)
    p.add_argument(
        "--pool-size",
        type=int,
        default=20000,
        help="images rendered and encoded once, then drawn from",
    )
    T.add_resume_arguments(p)
    p.add_argument(
        "--sample-every",
        type=int,
        default=2000,
        help="steps between sample grids (EMA weights); 0: none",
    )
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids")
    p.add_argument(
        "--guidance", type=float, default=4.0, help="guidance scale for the sample grids"
    )
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--save-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of model.safetensors (float16 halves the file; loading casts back to float32)",
    )
    T.add_run_arguments(p)


def same_architecture(a, b) -> bool:
    return (a.unet, a.vae, a.text) == (b.unet, b.vae, b.text)


def setup(args, dist: T.Distributed):
    """Every check that can fail, before any work: returns (config, vae weights, checkpoint state or
    None, pretrained text tower weights or None)."""
    state, tower = None, None
    frozen_text.check_options(args.text_encoder, args.text_layer, args.clip)
    asked = T.resolve_config(args.preset, args.config) if (args.preset or args.config) else None
    if args.resume:
        state, config = T.resume_run(args, "ldm", RECIPE)  # sets --text-encoder/-layer as saved
        if "text_encoder" not in state["args"]:  # from before the option: always joint
            args.text_encoder, args.text_layer = "joint", None
        if asked is not None and args.text_encoder != "joint":
            asked = frozen_text.condition_on(asked, config.text)  # the tower comes from the run
        if asked is not None and not same_architecture(asked, config):
            raise T.UsageError(
                f"checkpoint {args.resume} was trained with a different architecture than "
                f"{args.config or args.preset!r}: resume with the checkpoint's own config"
            )
        if args.prediction_type and args.prediction_type != config.prediction_type:
            raise T.UsageError(
                f"checkpoint {args.resume} learns {config.prediction_type}; cannot resume as "
                f"{args.prediction_type}"
            )
        vae_weights = state["vae"]
    else:
        if not args.vae:
            raise T.UsageError(
                "pass --vae (a vae.safetensors from `python -m minisd train-vae`) or --resume"
            )
        vae_config, vae_weights = load_vae(args.vae)
        config = asked if asked is not None else vae_config
        if args.text_encoder != "joint":
            args.text_layer = args.text_layer or "final"
            tower_config, tower = frozen_text.load_tower(args.clip, args.text_layer)
            config = frozen_text.condition_on(config, tower_config)
        if config.vae != vae_config.vae:
            raise T.UsageError(
                f"the VAE in {args.vae} ({vae_config.vae}) does not fit the architecture asked for "
                f"({config.vae})"
            )
        config.latent_scale, config.image_size = vae_config.latent_scale, vae_config.image_size
        if args.prediction_type:
            config.prediction_type = args.prediction_type
    T.check_model_fits(config, config.image_size)
    T.check_dataset(args.dataset, config.image_size)
    # the saved model's card names the words of its captions (card.py: unknown words are reported)
    vocabulary = scene_vocabulary() if args.dataset == "scenes" else caption_vocabulary()
    config.card = dataclasses.replace(config.card, vocabulary=vocabulary)
    if not 0.0 <= args.cfg_dropout < 1.0:
        raise T.UsageError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise T.UsageError(f"--snr-gamma must be > 0, got {args.snr_gamma}")
    T.check_run_settings(args, dist)
    return config, vae_weights, state, tower


@torch.no_grad()
def encode_pool(sd: StableDiffusion, images_uint8: torch.Tensor, device, batch: int = 1024):
    """Posterior mean and std of every pool image, on `device` (a few MB for 10⁵ images of 8×8×4
    latents)."""
    means, stds = [], []
    for start in range(0, len(images_uint8), batch):
        posterior = sd.vae.encode(T.to_model_range(images_uint8[start : start + batch]).to(device))
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def main(args: argparse.Namespace) -> int:
    """`python -m minisd train ...` (minisd/__main__.py parses the arguments); UsageError exits with
    status 2."""
    return T.run_distributed(train, args)


def train(args, dist: T.Distributed, device: torch.device) -> int:
    config, vae_weights, state, tower = T.setup_on_every_rank(setup, args, dist)
    out = Path(args.out)
    frozen = args.text_encoder != "joint"

    torch.manual_seed(args.seed)
    sd = StableDiffusion(config)
    sd.vae.load_state_dict(vae_weights)
    if tower is not None:
        sd.text_encoder.load_state_dict(tower)  # on resume it comes with the checkpoint instead
    sd = sd.to(device)
    sd.vae.requires_grad_(False).eval()
    if frozen:
        frozen_text.freeze(sd.text_encoder)
    schedule = noise_schedule(sd)
    denoiser = Denoiser(sd, frozen_text=frozen)
    # The EMA also shadows a frozen tower: lerp(θ, θ, w) = θ exactly, so it is saved unchanged.
    ema = T.EMA(denoiser, args.ema_decay)
    optimizer = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad],
        lr=args.lr,
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )
    start = 0
    if state is not None:
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    model = denoiser
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            denoiser, device_ids=[device.index] if device.type == "cuda" else None
        )

    # The data: rendered once, encoded once. Captions become token ids once (a few hundred distinct
    # captions).
    began_setup = time.time()
    pool, captions = T.render_pool(
        config.image_size, args.pool_size, args.seed, "train", args.workers, dataset=args.dataset
    )
    pool_mean, pool_std = encode_pool(sd, pool, device)
    distinct = sorted(set(captions))
    position = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in captions], device=device)
    caption_ids = sd.tokenizer(distinct + [""]).to(device)  # the last row is the empty caption
    empty = len(distinct)
    if dist.is_main:
        text = f"frozen tiny CLIP, {args.text_layer} layer" if frozen else "trained"
        print(
            f"UNet {T.count_parameters(sd.unet):,} + text encoder "
            f"{T.count_parameters(sd.text_encoder):,} ({text}) "
            f"parameters, latents {tuple(pool_mean.shape[1:])}, {config.prediction_type}, pool "
            f"{len(pool)} images "
            f"({len(distinct)} captions, {time.time() - began_setup:.0f} s to prepare), device "
            f"{device}, "
            f"{dist.world_size} process(es), steps {start}->{args.steps}"
        )
    del pool
    log = T.LossLog(out / T.LOSS_LOG_NAME, resume_step=start) if dist.is_main else None

    def save_checkpoint(step):
        if dist.is_main:
            T.save_checkpoint(
                out / T.CHECKPOINT_NAME,
                T.checkpoint_state(
                    "ldm",
                    step,
                    config,
                    args,
                    RECIPE,
                    model=denoiser.state_dict(),
                    ema=ema.state_dict(),
                    optimizer=optimizer.state_dict(),
                    vae=sd.vae.state_dict(),
                ),
            )

    prompts = SAMPLE_PROMPTS_V2 if args.dataset == "scenes" else SAMPLE_PROMPTS

    def sample_grid(step):
        if dist.is_main and args.sample_every > 0:
            with ema.swapped_in(denoiser):
                denoiser.eval()
                images = sd.generate(
                    list(prompts),
                    steps=args.sample_steps,
                    guidance_scale=args.guidance,
                    seed=list(range(len(prompts))),
                    output_type="tensor",
                )
                denoiser.train()
            T.save_image_grid(
                images * 2 - 1, out / f"samples_{step:06d}.png", columns=len(prompts) // 2
            )

    progress = T.progress_bar(args, dist, start, "train")
    began, step = time.time(), start
    if device.type == "cuda":
        # the same softmax(QKᵀ/√d)V in one kernel: fewer launches per step
        set_attention_backend(sd, "fused")
    denoiser.train()
    latent_shape = pool_mean.shape[1:]
    while step < args.steps:
        if T.out_of_time(args.time_limit, began, dist):
            break
        # Every random number of this step, for the whole global batch, from the step's own stream.
        g, B = T.step_generator(args.seed, step), args.batch_size
        index = torch.randint(len(pool_mean), (B,), generator=g)
        posterior_noise = torch.randn((B, *latent_shape), generator=g)
        t = torch.randint(0, config.num_train_timesteps, (B,), generator=g)
        eps = torch.randn((B, *latent_shape), generator=g)
        drop = torch.rand(B, generator=g) < args.cfg_dropout
        index, posterior_noise, t_cpu, eps, drop = (
            T.rank_slice(x, dist) for x in (index, posterior_noise, t, eps, drop)
        )
        index, posterior_noise, t, eps, drop = (
            T.to_device(x, device) for x in (index, posterior_noise, t_cpu, eps, drop)
        )

        z0 = config.latent_scale * (pool_mean[index] + pool_std[index] * posterior_noise)
        ids = caption_ids[torch.where(drop, torch.full_like(index, empty), caption_index[index])]
        for group in optimizer.param_groups:
            group["lr"] = T.learning_rate(step, args.steps, args.lr, args.warmup)
        with T.autocast(device, args.precision):
            loss = diffusion_loss(model, schedule, z0, t, eps, ids, t_cpu, args.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        ema.update(denoiser, step)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = T.mean_over_ranks(loss, dist)  # a collective: every rank must take part
        if log is not None and (step % args.log_every == 0 or step == args.steps):
            log.write(
                step=step,
                loss=mean_loss,
                grad_norm=float(grad_norm),
                lr=optimizer.param_groups[0]["lr"],
                seconds=round(time.time() - began, 2),
            )
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
        T.save_on_schedule(step, args, save_checkpoint, sample_grid)
    if progress is not None:
        progress.close()

    save_checkpoint(step)
    if dist.is_main:
        sample_grid(step)
        with ema.swapped_in(denoiser):
            save(
                sd,
                out / MODEL_FILE,
                dtype=getattr(torch, args.save_dtype) if args.save_dtype != "float32" else None,
            )
        print(
            f"saved {out / MODEL_FILE} (EMA weights) at step {step}, {time.time() - began:.0f} s "
            "of training"
        )
    return 0
