"""Pretrain a tiny CLIP (minisd/contrastive.py) on captioned images with the symmetric InfoNCE loss.

    python -m minisd train-clip --out runs/clip --steps 3000

One training step, for a batch of N (image, caption) pairs whose captions are all different:

    u = encode_image(images), v = encode_text(captions)      [N, D] each, unit vectors
    logits = s · u vᵀ                                        [N, N], the pairs on the diagonal
    L = ½ [CE(logits, diagonal) + CE(logitsᵀ, diagonal)]     contrastive.contrastive_loss
    AdamW step, then τ = ln s clamped at ln 100

Why all different: two images with the same caption would each be pushed away from the other's
caption, i.e. from their own (the shapes world has only 140 single-object captions, so a batch of
128 drawn at random would hold many twins). Each step therefore takes the first N distinct captions
of a random order of the pool.

Under torchrun the P processes each encode N/P pairs, gather every process's u and v (with their
gradients) and compute the loss of the whole batch, so P processes take the same step as one
process with batch N. Images come from a pool rendered once (training.render_pool); `--dataset`
picks the world they come from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from . import training as T
from ..contrastive import TinyCLIP, TinyCLIPConfig, contrastive_loss, save_tiny_clip

MODEL_FILE = "tiny_clip.safetensors"
KIND = "clip"
RECIPE = ("batch_size", "lr", "warmup", "weight_decay", "seed", "pool_size", "dataset")


def render_shapes(image_size: int, count: int, seed: int, split: str, workers: int = 0):
    """The 32×32 coloured shapes (shapes_dataset.py): (uint8 [n, 3, H, W], captions)."""
    return T.render_pool(image_size, count, seed, split, workers)


# name -> function(image_size, count, seed, split, workers) -> (uint8 images, captions)
DATASETS = {"shapes": render_shapes}


class Towers(nn.Module):
    """The trainable part as one module for DDP: (images, ids) -> (u, v, s)."""

    def __init__(self, clip: TinyCLIP):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        return self.clip.encode_image(images), self.clip.encode_text(ids), self.clip.logit_scale


def gather_batch(x: torch.Tensor, dist: T.Distributed) -> torch.Tensor:
    """Every process's rows, in rank order, with gradients flowing back to each process's own rows.

    The backward of all_gather sums the gradient over processes; DDP then averages over processes:
    P · (1/P) = the gradient one process would get for the whole batch.
    """
    if not dist.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def distinct_caption_batch(
    caption_index: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Pool indices of `size` items with pairwise different captions: the first item of each of the
    first `size` captions met in a random order of the pool."""
    order = torch.randperm(len(caption_index), generator=generator)
    captions = caption_index[order]
    place = torch.arange(len(order))
    first = torch.full((int(caption_index.max()) + 1,), len(order))
    first = first.scatter_reduce(0, captions, place, reduce="amin")  # first place of each caption
    first = first[first < len(order)].sort().values
    return order[first[:size]]


def parameter_groups(clip: TinyCLIP, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (CLIP/OpenCLIP): not on gains, biases or the logit scale."""
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    plain = [p for p in clip.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument(
        "--out", required=True, help="folder for checkpoint.pt, tiny_clip.safetensors, loss.jsonl"
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    p.add_argument(
        "--config", default=None, help="a TinyCLIPConfig as a JSON file (default: TinyCLIPConfig())"
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument(
        "--batch-size", type=int, default=128, help="global batch, split across processes"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pool-size", type=int, default=20000, help="images rendered once, then drawn from"
    )
    T.add_resume_arguments(p)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--save-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of tiny_clip.safetensors (loading casts back to float32)",
    )
    T.add_run_arguments(p)


def read_config(path) -> TinyCLIPConfig:
    try:
        return TinyCLIPConfig.from_json(Path(path).read_text())
    except OSError as error:
        raise T.UsageError(f"cannot read config file {path}: {error.strerror or error}") from None
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise T.UsageError(f"config file {path} is not a TinyCLIPConfig: {error}") from None


def setup(args, dist: T.Distributed):
    """Every check that can fail, before any work: returns (config, checkpoint state or None)."""
    state = None
    if args.resume:
        if args.config:
            raise T.UsageError("--resume continues with the checkpoint's own config: drop --config")
        state = T.load_checkpoint(args.resume, KIND)
        config = TinyCLIPConfig.from_json(state["config"])
        for key in RECIPE:
            setattr(args, key, state["args"][key])
    else:
        config = read_config(args.config) if args.config else TinyCLIPConfig()
    try:
        TinyCLIP(config)
    except (ValueError, TypeError) as error:
        raise T.UsageError(f"the config does not describe a buildable model: {error}") from None
    if args.batch_size < 2:
        raise T.UsageError(
            f"--batch-size must be >= 2 (a contrastive batch needs negatives), got "
            f"{args.batch_size}"
        )
    T.check_run_settings(args, dist)
    return config, state


def main(args: argparse.Namespace) -> int:
    """`python -m minisd train-clip ...`; UsageError exits with status 2."""
    return T.run_distributed(train, args)


def train(args, dist: T.Distributed, device: torch.device) -> int:
    config, state = T.setup_on_every_rank(setup, args, dist)
    out = Path(args.out)

    torch.manual_seed(args.seed)
    clip = TinyCLIP(config).to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(clip, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type == "cuda",
    )
    start = 0
    if state is not None:
        clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    towers = Towers(clip)
    model = towers
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            towers, device_ids=[device.index] if device.type == "cuda" else None
        )

    began_setup = time.time()
    render = DATASETS[args.dataset]
    pool, captions = render(
        config.image.image_size, args.pool_size, args.seed, "train", args.workers
    )
    distinct = sorted(set(captions))
    position = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in captions])
    caption_ids = clip.tokenizer(distinct)
    error = None
    if len(distinct) < args.batch_size:
        error = (
            f"the pool holds {len(distinct)} distinct captions, fewer than --batch-size "
            f"{args.batch_size}: raise --pool-size or lower --batch-size"
        )
    T.agree(dist, error)
    if dist.is_main:
        print(
            f"image tower {T.count_parameters(clip.image_tower):,} + text tower "
            f"{T.count_parameters(clip.text_tower):,} parameters, pool {len(pool)} images "
            f"({len(distinct)} captions, {time.time() - began_setup:.0f} s to prepare), device "
            f"{device}, {dist.world_size} process(es), steps {start}->{args.steps}"
        )
    log = T.LossLog(out / T.LOSS_LOG_NAME, resume_step=start) if dist.is_main else None

    def save_checkpoint(step):
        if dist.is_main:
            T.save_checkpoint(
                out / T.CHECKPOINT_NAME,
                {
                    "kind": KIND,
                    "step": step,
                    "config": config.to_json(),
                    "args": {k: getattr(args, k) for k in RECIPE},
                    "model": clip.state_dict(),
                    "optimizer": optimizer.state_dict(),
                },
            )

    progress = T.progress_bar(args, dist, start, "train-clip")
    began, step = time.time(), start
    clip.train()
    while step < args.steps:
        if T.out_of_time(args.time_limit, began, dist):
            break
        g = T.step_generator(args.seed, step)
        index = T.rank_slice(distinct_caption_batch(caption_index, args.batch_size, g), dist)
        images = T.to_device(T.to_model_range(pool[index]), device)
        ids = T.to_device(caption_ids[caption_index[index]], device)
        for group in optimizer.param_groups:
            group["lr"] = T.learning_rate(step, args.steps, args.lr, args.warmup)
        with T.autocast(device, args.precision):
            u, v, scale = model(images, ids)
            logits = scale * gather_batch(u, dist).float() @ gather_batch(v, dist).float().T
            loss = contrastive_loss(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        clip.clamp_logit_scale_()
        step += 1
        if log is not None and (step % args.log_every == 0 or step == args.steps):
            with torch.no_grad():  # batch accuracy of picking the own caption (image -> text)
                hits = (logits.argmax(dim=1) == torch.arange(len(logits), device=device)).float()
            log.write(
                step=step,
                loss=loss.item(),
                accuracy=hits.mean().item(),
                logit_scale=scale.item(),
                grad_norm=float(grad_norm),
                lr=optimizer.param_groups[0]["lr"],
                seconds=round(time.time() - began, 2),
            )
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}", s=f"{scale.item():.1f}")
        if step % args.checkpoint_every == 0:
            save_checkpoint(step)
    if progress is not None:
        progress.close()

    save_checkpoint(step)
    if dist.is_main:
        dtype = torch.float16 if args.save_dtype == "float16" else None
        save_tiny_clip(clip, out / MODEL_FILE, dtype=dtype)
        print(f"saved {out / MODEL_FILE} at step {step}, {time.time() - began:.0f} s of training")
    return 0
