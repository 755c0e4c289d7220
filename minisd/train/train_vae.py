"""Train the autoencoder of a latent diffusion model from scratch on the coloured-shapes dataset.

    python -m minisd train-vae --out runs/vae --preset bundled --steps 4000

Loss per image x (pixels in [-1, 1], x̂ = D(z), z ~ q(z|x) = N(μ, σ²)):

    L = mean|x̂ − x|                            reconstruction (L1: sharper than L2 on flat colours)
      + w_mse  · mean (x̂ − x)²
      + w_edge · mean |∇x̂ − ∇x|                finite differences along x and y: crisp shape edges
      + w_kl   · KL(q(z|x) ‖ N(0, I)) / (3·H·W)  a weak pull towards N(0, I), per pixel as above

SD's autoencoder adds a perceptual (LPIPS) and an adversarial term; flat-coloured shapes do not need
them. At the end the latent scale is measured, latent_scale = 1 / std(z) over a few thousand
training images, so the diffusion model sees latents of unit variance (SD's 0.18215 was found the
same way), and written into the config stored in `vae.safetensors`, which `python -m minisd train
--vae` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..attention import set_attention_backend
from ..files import atomic_write
from ..vae import AutoencoderKL
from ..weights.minisd_file import FORMAT_KEY
from . import training as T

VAE_FILE = "vae.safetensors"
# Values of these arguments define the run; a resumed run takes them from its checkpoint.
RECIPE = (
    "batch_size",
    "lr",
    "kl_weight",
    "mse_weight",
    "edge_weight",
    "seed",
    "pool_size",
    "warmup",
    "image_size",
    "dataset",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument(
        "--out",
        required=True,
        help="folder for checkpoint.pt, vae.safetensors, loss.jsonl, samples",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="architecture preset (default: bundled, or bundled-v2 with --dataset scenes)",
    )
    p.add_argument(
        "--config", default=None, help="an SDConfig as a JSON file (instead of --preset)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="training resolution (default: the config's)"
    )
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument(
        "--batch-size", type=int, default=64, help="global batch, split across processes"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--mse-weight", type=float, default=1.0)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    T.add_dataset_argument(p)
    p.add_argument(
        "--pool-size", type=int, default=20000, help="images rendered once and drawn from"
    )
    T.add_resume_arguments(p)
    p.add_argument(
        "--sample-every", type=int, default=1000, help="steps between reconstruction grids; 0: none"
    )
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    T.add_run_arguments(p)


class Reconstruct(nn.Module):
    """x -> (x̂, μ, log σ²) with z = μ + σ·noise: encode, sample and decode in one forward, so DDP
    sees it all."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(images)
        return (
            self.vae.decode(posterior.mean + posterior.std * noise),
            posterior.mean,
            posterior.logvar,
        )


def vae_loss(
    model: nn.Module, images: torch.Tensor, noise: torch.Tensor, args
) -> tuple[torch.Tensor, dict]:
    """The loss of the module docstring on one batch; returns (loss, {term: value}) for the log."""
    reconstruction, mean, logvar = model(images, noise)
    diff = reconstruction.float() - images
    l1, mse = diff.abs().mean(), diff.pow(2).mean()
    # |∇x̂ − ∇x| = |∇(x̂ − x)|
    edge = diff.diff(dim=-1).abs().mean() + diff.diff(dim=-2).abs().mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / images[0].numel()
    loss = l1 + args.mse_weight * mse + args.edge_weight * edge + args.kl_weight * kl
    return loss, {
        "loss": loss.item(),
        "l1": l1.item(),
        "mse": mse.item(),
        "edge": edge.item(),
        "kl": kl.item(),
    }


@torch.no_grad()
def measure_latent_scale(
    vae: AutoencoderKL, images_uint8: torch.Tensor, device, batch: int = 512
) -> float:
    """1 / std of sampled latents z over the given images (the factor that gives the diffusion model
    unit variance)."""
    samples = []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(images_uint8), batch):
        posterior = vae.encode(T.to_model_range(images_uint8[start : start + batch]).to(device))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        samples.append((posterior.mean + posterior.std * noise).float().cpu())
    return float(1.0 / torch.cat(samples).std())


def save_vae(vae: AutoencoderKL, config, path) -> None:
    """vae.* tensors plus the full SDConfig (latent_scale measured) as metadata: the input of
    `train`."""
    tensors = {
        f"vae.{k}": v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()
    }
    atomic_write(
        path,
        lambda tmp: save_file(
            tensors, tmp, metadata={FORMAT_KEY: config.to_json(), "minisd_part": "vae"}
        ),
    )


def load_vae(path):
    """(config, vae state dict) from a file written by `save_vae`; UsageError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise T.UsageError(f"no VAE file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k[len("vae.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}
    except Exception as error:
        raise T.UsageError(f"{path} is not a readable safetensors file ({error})") from None
    if FORMAT_KEY not in metadata or not tensors:
        raise T.UsageError(
            f"{path} is not a VAE written by `python -m minisd train-vae` (no config or no vae.* "
            "tensors)"
        )
    return T.config_from_json_or_error(metadata[FORMAT_KEY], str(path)), tensors


def main(args: argparse.Namespace) -> int:
    """`python -m minisd train-vae ...` (minisd/__main__.py parses the arguments); UsageError exits
    with status 2."""
    return T.run_distributed(train, args)


def setup(args, dist):
    """Every check that can fail, before any work: returns (config, checkpoint state or None)."""
    state = None
    if args.resume:
        state, config = T.resume_run(args, "vae", RECIPE)
        if args.preset or args.config:
            asked = T.resolve_config(args.preset, args.config)
            if asked.vae != config.vae:
                raise T.UsageError(
                    f"checkpoint {args.resume} holds a VAE of a different architecture "
                    f"({config.vae}) than the one asked for ({asked.vae})"
                )
    else:
        default = "bundled-v2" if args.dataset == "scenes" else "bundled"
        config = T.resolve_config(args.preset or default, args.config)
    args.image_size = args.image_size or config.image_size
    T.check_model_fits(config, args.image_size)
    T.check_dataset(args.dataset, args.image_size)
    T.check_run_settings(args, dist)
    return config, state


def train(args, dist: T.Distributed, device: torch.device) -> int:
    config, state = T.setup_on_every_rank(setup, args, dist)
    out = Path(args.out)

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(config.vae).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    model = Reconstruct(vae)
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    pool, _ = T.render_pool(
        args.image_size, args.pool_size, args.seed, "train", args.workers, dataset=args.dataset
    )
    pool = pool.to(device)
    preview = T.to_model_range(pool[:16])
    latent_size = args.image_size // vae.downscale
    log = T.LossLog(out / T.LOSS_LOG_NAME, resume_step=start) if dist.is_main else None
    if dist.is_main:
        print(
            f"VAE {T.count_parameters(vae):,} parameters, downscale {vae.downscale}, "
            f"{args.image_size}px, "
            f"pool {len(pool)} images, device {device}, {dist.world_size} process(es), steps "
            f"{start}->{args.steps}"
        )

    def save(step):
        if dist.is_main:
            T.save_checkpoint(
                out / T.CHECKPOINT_NAME,
                T.checkpoint_state(
                    "vae",
                    step,
                    config,
                    args,
                    RECIPE,
                    model=vae.state_dict(),
                    optimizer=optimizer.state_dict(),
                ),
            )

    def sample(step):
        if dist.is_main and args.sample_every > 0:
            vae.eval()
            with torch.no_grad(), T.autocast(device, args.precision):
                reconstruction = vae.decode(vae.encode(preview).mode()).float()
            vae.train()
            T.save_image_grid(
                torch.cat([preview, reconstruction]), out / f"reconstructions_{step:06d}.png"
            )

    progress = T.progress_bar(args, dist, start, "train-vae")
    began, step = time.time(), start
    if device.type == "cuda":
        # the same softmax(QKᵀ/√d)V in one kernel: fewer launches per step
        set_attention_backend(vae, "fused")
    vae.train()
    while step < args.steps:
        if T.out_of_time(args.time_limit, began, dist):
            break
        g = T.step_generator(args.seed, step)
        index = torch.randint(len(pool), (args.batch_size,), generator=g)
        noise = torch.randn(
            (args.batch_size, config.vae.latent_channels, latent_size, latent_size), generator=g
        )
        images = T.to_model_range(pool[T.rank_slice(index, dist).to(device)])
        for group in optimizer.param_groups:
            group["lr"] = T.learning_rate(step, args.steps, args.lr, args.warmup)
        with T.autocast(device, args.precision):
            loss, parts = vae_loss(model, images, T.rank_slice(noise, dist).to(device), args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            parts["loss"] = T.mean_over_ranks(loss, dist)  # a collective: every rank must take part
        if log is not None and (step % args.log_every == 0 or step == args.steps):
            log.write(
                step=step,
                lr=optimizer.param_groups[0]["lr"],
                seconds=round(time.time() - began, 2),
                **parts,
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{parts['loss']:.4f}")
        T.save_on_schedule(step, args, save, sample)
    if progress is not None:
        progress.close()

    save(step)
    if dist.is_main:
        sample(step)
        vae.eval()
        config.latent_scale = measure_latent_scale(vae, pool[:4096], device)
        config.image_size = args.image_size
        save_vae(vae, config, out / VAE_FILE)
        print(
            f"saved {out / VAE_FILE} at step {step} (latent_scale {config.latent_scale:.4f}, "
            f"{time.time() - began:.0f} s)"
        )
    return 0
