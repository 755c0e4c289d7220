"""Pieces every training script shares: checks, the command frame, checkpoints, EMA, loss logs,
sample grids, DDP.

Exponential moving average of the weights (the model we ship is the average, not the last iterate):

    θ_ema ← d · θ_ema + (1 − d) · θ,      d = min(decay, (1 + k) / (10 + k)) at step k

The warm-up term lets the average follow the fast early changes instead of remembering the random
init.

Learning rate: linear warm-up over `warmup` steps, then a cosine from `lr` down to `min_ratio · lr`
at the last step.

Randomness is drawn per step from a generator seeded with (seed, step) and split across processes by
rank, so a run resumed from a checkpoint at step k sees exactly the batches, noise and timesteps an
uninterrupted run sees, and P processes of batch B/P see together the batch one process of batch B
sees.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..config import PRESETS, SDConfig
from ..files import atomic_write
from ..model import StableDiffusion
from .shapes_dataset import ShapesConfig, ShapesDataset, caption

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_LOG_NAME = "loss.jsonl"


class UsageError(ValueError):
    """Bad input found before any work was done; `python -m minisd` prints it and exits with status
    2."""


# ---------------------------------------------------------------- checks before any work

def prepare_output_folder(path, resume: bool) -> Path:
    """Create the folder if needed and prove we can write there; refuse to overwrite an earlier
    run's checkpoint."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"cannot write to output folder {folder}: {error.strerror or error}"
        ) from None
    if (folder / CHECKPOINT_NAME).exists() and not resume:
        raise UsageError(
            f"{folder} already holds a training run ({CHECKPOINT_NAME}); pass --resume "
            f"{folder / CHECKPOINT_NAME} to continue it, or choose another folder"
        )
    return folder


def load_checkpoint(path, kind: str) -> dict:
    """Read a checkpoint written by `save_checkpoint`, or raise UsageError saying why it cannot be
    used."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, ...: torch raises many types
        raise UsageError(
            f"checkpoint {path} is corrupt or not a minisd checkpoint ({type(error).__name__}: "
            f"{str(error)[:200]}); nothing was written"
        ) from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"checkpoint {path} is not a {kind} training checkpoint (found {found!r})")
    return state


def save_checkpoint(path, state: dict) -> None:
    """torch.save through a temporary file and a rename: a crash mid-write leaves the previous
    checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def config_from_json_or_error(text: str, source: str):
    try:
        return SDConfig.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(f"{source}: {error}") from None


def check_model_fits(config, image_size: int) -> None:
    """Raise UsageError if the networks cannot be built or the images cannot pass through them."""
    if not isinstance(image_size, int) or image_size < 24:
        raise UsageError(
            f"image size must be an int >= 24 (the shapes dataset's smallest), got {image_size!r}"
        )
    vae_down = 2 ** (len(config.vae.channel_mult) - 1)
    unet_down = 2 ** (len(config.unet.channel_mult) - 1)
    if image_size % vae_down:
        raise UsageError(
            f"image size {image_size} is not divisible by the VAE's downscale factor {vae_down}"
        )
    latent = image_size // vae_down
    if latent % unet_down:
        raise UsageError(
            f"latent size {latent} (image {image_size} / {vae_down}) is not divisible by the "
            "UNet's "
            f"downscale factor {unet_down}"
        )
    for name, part in (("unet", config.unet), ("vae", config.vae)):
        widths = [part.channels * m for m in part.channel_mult]
        bad = [w for w in widths if w % part.groups]
        if bad:
            raise UsageError(
                f"{name} widths {bad} are not divisible by its GroupNorm groups={part.groups}"
            )
    if config.text.width % config.text.heads:
        raise UsageError(
            f"text width {config.text.width} is not divisible by heads={config.text.heads}"
        )
    try:
        StableDiffusion(config)
    except (ValueError, TypeError) as error:
        raise UsageError(f"the config does not describe a buildable model: {error}") from None


def resolve_config(preset: Optional[str], config_file: Optional[str]):
    """--config FILE.json (an SDConfig as JSON) wins over --preset NAME."""
    if config_file:
        try:
            text = Path(config_file).read_text()
        except OSError as error:
            raise UsageError(
                f"cannot read config file {config_file}: {error.strerror or error}"
            ) from None
        try:
            return config_from_json_or_error(text, f"config file {config_file}")
        except json.JSONDecodeError as error:
            raise UsageError(f"config file {config_file} is not JSON: {error}") from None
    from .presets_v2 import PRESETS_V2  # the v2 world's presets live in the training wing

    presets = {**PRESETS, **PRESETS_V2}
    if preset not in presets:
        raise UsageError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return presets[preset]()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on a GPU (weights and optimizer stay fp32); plain fp32 elsewhere."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------- distributed


@dataclass
class Distributed:
    """Who we are among the processes `torchrun` started (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun describes in the environment: NCCL on GPUs, gloo on
    CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def finish_distributed(dist: Distributed) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def agree(dist: Distributed, error: Optional[str]) -> None:
    """Every rank checked its inputs; if any rank found a problem, all of them stop with the first
    message."""
    if dist.enabled:
        errors = [None] * dist.world_size
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        if not dist.is_main:
            raise SystemExit(2)  # rank 0 says why; one message is enough
        raise UsageError(error)


def mean_over_ranks(value: torch.Tensor, dist: Distributed) -> float:
    """The average of a scalar over all processes (for the log: each rank only sees its share of the
    batch)."""
    if dist.enabled:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value /= dist.world_size
    return value.item()


def out_of_time(limit: Optional[float], began: float, dist: Distributed) -> bool:
    """True once `limit` seconds have passed since `began` (rank 0's clock decides, so all ranks
    stop together)."""
    if limit is None:
        return False
    over = time.time() - began > limit
    if dist.enabled:
        flag = [over]
        torch.distributed.broadcast_object_list(flag, src=0)
        over = flag[0]
    if over and dist.is_main:
        print(f"time limit of {limit:.0f} s reached: saving and stopping")
    return over


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The random stream of one training step (same on every rank and on resume); `stream` separates
    uses."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the GPU through pinned memory without waiting for the GPU to finish its queue (no-op
    on the CPU)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def rank_slice(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """This rank's equal share of a global batch (the batch size was checked to divide the world
    size)."""
    per_rank = tensor.shape[0] // dist.world_size
    return tensor[dist.rank * per_rank : (dist.rank + 1) * per_rank]


# ---------------------------------------------------------------- the frame of a command
# (train_vae, train_ldm)


def add_resume_arguments(p) -> None:
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from")
    p.add_argument(
        "--time-limit", type=float, default=None, help="seconds; stop cleanly (and save) after this"
    )


def add_run_arguments(p) -> None:
    """Where and how a run goes, not what it learns: device, autocast precision, render workers,
    progress bar."""
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype on GPU"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="processes that render the pool (0: this one)"
    )
    p.add_argument("--no-progress", action="store_true")


def run_distributed(train, args) -> int:
    """A command's main: join the processes torchrun started (if any), return train(args, dist,
    device), leave."""
    dist, device = init_distributed(args.device)
    try:
        return train(args, dist, device)
    finally:
        finish_distributed(dist)


def setup_on_every_rank(setup, args, dist: Distributed):
    """setup(args, dist) — every check that can fail, before any work — on every rank; all stop if
    any rank failed."""
    result, error = None, None
    try:
        result = setup(args, dist)
    except UsageError as e:
        error = str(e)
    agree(dist, error)
    return result


def resume_run(args, kind: str, recipe: tuple[str, ...]):
    """(checkpoint state, config) of --resume; the run's recipe arguments are taken from the
    checkpoint."""
    state = load_checkpoint(args.resume, kind)
    config = config_from_json_or_error(state["config"], f"checkpoint {args.resume}")
    for key in recipe:
        # a checkpoint from before a recipe option existed keeps that option's default
        if key in state["args"]:
            setattr(args, key, state["args"][key])
    return state, config


def checkpoint_state(
    kind: str, step: int, config, args, recipe: tuple[str, ...], **state_dicts
) -> dict:
    """What `resume_run` reads back: kind, step, config, the recipe arguments, and the given state
    dicts."""
    return {
        "kind": kind,
        "step": step,
        "config": config.to_json(),
        "args": {k: getattr(args, k) for k in recipe},
        **state_dicts,
    }


def check_run_settings(args, dist: Distributed) -> None:
    """Counts ≥ 1 and a batch that splits evenly over the processes; then rank 0 makes the output
    folder."""
    for name in ("steps", "batch_size", "pool_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % dist.world_size:
        raise UsageError(
            f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes"
        )
    if dist.is_main:
        prepare_output_folder(args.out, resume=bool(args.resume))


def progress_bar(args, dist: Distributed, start: int, desc: str):
    """A tqdm bar over the run's steps on rank 0; None on other ranks or with --no-progress."""
    if not dist.is_main or args.no_progress:
        return None
    return tqdm(total=args.steps, initial=start, desc=desc, unit="step")


def save_on_schedule(step: int, args, save_checkpoint, save_samples) -> None:
    """After a step: a checkpoint every --checkpoint-every steps, samples every --sample-every steps
    (0: never)."""
    if step % args.checkpoint_every == 0:
        save_checkpoint(step)
    if args.sample_every > 0 and step % args.sample_every == 0:
        save_samples(step)


# ---------------------------------------------------------------- schedule and EMA


def learning_rate(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Shadow copies of a module's floating-point parameters, updated as θ_ema ← d·θ_ema +
    (1−d)·θ."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        names = [name for name, _ in module.named_parameters()]
        live = [p.detach() for _, p in module.named_parameters()]
        # one fused kernel on a GPU
        torch._foreach_lerp_([self.shadow[n] for n in names], live, 1 - d)

    @contextmanager
    def swapped_in(self, module: nn.Module):
        """Run a block with the averaged weights in place of the live ones (sampling, saving)."""
        live = {name: p.detach().clone() for name, p in module.named_parameters()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(live[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)


# ---------------------------------------------------------------- logs and pictures


class LossLog:
    """One JSON object per line (step, losses, lr, seconds). On resume, lines past the resumed step
    are dropped."""

    def __init__(self, path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write(
                self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept))
            )
        elif self.path.exists():
            self.path.unlink()

    def write(self, **values) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(values) + "\n")


def read_loss_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_image_grid(images: torch.Tensor, path, columns: int = 8, scale: int = 2) -> None:
    """images [N, 3, H, W] in [-1, 1] -> one PNG, `columns` per row, each pixel drawn
    scale×scale."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.full((3, rows * (h + 2), columns * (w + 2)), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = (
            image
        )
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


# ---------------------------------------------------------------- data


DATASETS = ("shapes", "scenes")  # v1: one or two shapes on grey; v2: the scenes world


def add_dataset_argument(p) -> None:
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="shapes",
        help="shapes: v1 coloured shapes (32 px); scenes: the v2 world (64 px, train/scenes.py)",
    )


def open_dataset(kind: str, image_size: int, seed: int, length: int, split: str = "train"):
    """The training set `kind` of DATASETS; item i is a pure function of (seed, split, i)."""
    if kind == "scenes":
        from .scenes import ScenesConfig, ScenesDataset

        return ScenesDataset(ScenesConfig(image_size=image_size, seed=seed, length=length), split)
    if kind != "shapes":
        raise UsageError(f"unknown dataset {kind!r}; choose one of {DATASETS}")
    from .shapes_dataset import ShapesConfig, ShapesDataset

    return ShapesDataset(ShapesConfig(image_size=image_size, seed=seed, length=length), split)


def check_dataset(kind: str, image_size: int) -> None:
    """UsageError unless `kind` can be rendered at `image_size` (before any work is done)."""
    try:
        open_dataset(kind, image_size, seed=0, length=1)
    except ValueError as error:
        raise UsageError(f"--dataset {kind} at image size {image_size}: {error}") from None


def render_pool(
    image_size: int,
    count: int,
    seed: int,
    split: str = "train",
    workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    dataset: str = "shapes",
) -> tuple[torch.Tensor, list[str]]:
    """Items i ≡ shard[0] (mod shard[1]) of the first `count` of a dataset split: (uint8 [n, 3, H,
    W], captions).

    Rendering costs ~2 ms per image on one core, so training steps draw from this fixed pool instead
    of rendering on the fly; every item carries its own random jitter, so a pool of 10⁵ images holds
    little repetition.
    """
    indices = list(range(shard[0], count, shard[1]))
    dataset = open_dataset(dataset, image_size, seed, max(count, 1), split)
    if workers > 1 and len(indices) > 1000:
        chunks = [indices[i::workers] for i in range(workers)]
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(_render_items, [(dataset, chunk) for chunk in chunks])
        order = {}
        for chunk, (images, captions) in zip(chunks, parts):
            for j, index in enumerate(chunk):
                order[index] = (images[j], captions[j])
        images = np.stack([order[i][0] for i in indices])
        captions = [order[i][1] for i in indices]
    else:
        images, captions = _render_items(dataset, indices)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _render_items(dataset, indices):
    images, captions = [], []
    for index in indices:
        if hasattr(dataset, "image_and_caption"):  # the v2 scenes world
            image, text = dataset.image_and_caption(index)
        else:
            image, spec = dataset.image_at(index)
            text = caption(spec)
        images.append(image)
        captions.append(text)
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8), captions


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the VAE reads."""
    return images_uint8.float() / 127.5 - 1.0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
