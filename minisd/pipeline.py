"""Text to image, image to image and inpainting: the sampling loop that ties the model together.

Text to image (Rombach et al. 2022): start from pure noise in latent space and denoise step by step,
    x_T ~ N(0, I)  [B, 4, H/f, W/f]           f = the VAE's downscale (8 for SD)
    for t in τ_N > … > τ_1:   ε̂ = guided UNet prediction (guidance.py);   x ← sampler.step(ε̂, t, x)   (ddim.py, ddpm.py)
    image = VAE.decode(x / latent_scale)

Image to image (SDEdit, Meng et al. 2022): encode the image, z₀ = latent_scale · sample of q(z|x),
jump to the noise level of the first timestep kept by `strength`, x = √ᾱ_t z₀ + √(1−ᾱ_t) ε, and run
only the remaining steps.

Inpainting (mask m = 1 where the image is repainted):
  - 9-channel inpainting models read [x, m↓, z(masked image)] at every step, the masked image being
    image · (m < 0.5) and m↓ the mask resized to the latents by nearest neighbour (as the model was
    trained).
  - ordinary models: after every step the known region is put back at the matching noise level,
        x ← m↓ · x + (1 − m↓) · q_sample(z₀, t_prev, ε)     (z₀ itself after the last step; ε = the starting noise)
  With paste_back (default) the decoded image keeps the original pixels exactly where m = 0.

Matching diffusers: the choices below follow StableDiffusion{,Img2Img,Inpaint}Pipeline so the parity
tests agree to float precision: the VAE posterior is *sampled* with the same generator (not its
mean), random numbers are drawn in the same order (image latents, then the starting noise, then the
masked-image latents), an inpainting run at strength 1 starts from pure noise while img2img at
strength 1 still adds noise to the image. Random numbers are drawn on the CPU in float32, so a seed
gives the same image on any device; the sampler works in float32 and only the networks run in the
model's dtype.

Default size: `config.image_size` (512 SD 1, 768 SD 2-v, 32 tiny), or the init image's size. Height
and width must be multiples of (VAE downscale) · 2^(UNet levels − 1): 64 for SD, 8 for tiny, so the
UNet's skips line up.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch.nn import functional as F

# (record_cross_attention: API)
from .attention_maps import active_recorder, record_cross_attention  # noqa: F401
from .guidance import build_conditioning, ensemble_members, guided_prediction
from .images import load_image, load_mask, tensor_to_pil
from .prompts import apply_template, split_composition

from .samplers import SAMPLER_NAMES as SAMPLERS
OUTPUT_TYPES = ("pil", "tensor", "latent")

# Up to this many latent positions (images × height × width) the CPU runs convolutions with
# PyTorch's own kernels.
SMALL_LATENT_POSITIONS = 512


@contextlib.contextmanager
def plain_convolutions_for_small_latents(latents: torch.Tensor):
    """On the CPU, run the denoising loop's convolutions with PyTorch's plain kernels when the
    latents are tiny.

    oneDNN, PyTorch's default CPU convolution, spends ~0.1 ms setting up each call: on the bundled
    model's 8×8 latents that is most of the work, and the plain kernels make a 50-step image about a
    quarter faster. Larger latents (SD's 64×64, or big batches) keep oneDNN, which is faster there.
    Same convolution, same result up to float rounding; nothing changes on a GPU.
    """
    positions = latents.shape[0] * latents.shape[-2] * latents.shape[-1]
    small = latents.device.type == "cpu" and positions <= SMALL_LATENT_POSITIONS
    previous = torch.backends.mkldnn.enabled
    if small:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def size_multiple(sd) -> int:
    """Image sizes must be multiples of this: the VAE's downscale times the UNet's total
    downsampling."""
    return sd.vae.downscale * 2 ** (len(sd.config.unet.channel_mult) - 1)


def noise_schedule(sd):
    from .schedule import NoiseSchedule, ScheduleConfig

    c = sd.config
    return NoiseSchedule(
        ScheduleConfig(
            beta_schedule=c.beta_schedule,
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            prediction_type=c.prediction_type,
        )
    )


def make_sampler(sd, name: str, steps: int, eta: float, karras: bool = False):
    from .samplers import make_sampler as make_named_sampler

    return make_named_sampler(name, noise_schedule(sd), steps, karras=karras, eta=eta)


def _number(name, value, low=None, high=None, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _prompt_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")


def _generators(seed, generator, batch: int):
    """A torch.Generator, a list of B generators (one per image), or None (torch's global RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        seeds = seed if isinstance(seed, (list, tuple)) else None
        for s in seeds or [seed]:
            _number("seed", s, 0, 2**63 - 1, integer=True)
        if seeds is None:
            return torch.Generator().manual_seed(seed)
        generator = [torch.Generator().manual_seed(s) for s in seeds]
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(
            f"got {len(generator)} seeds/generators for {batch} images: give one, or one per image"
        )
    return generator


def _randn(shape, generators) -> torch.Tensor:
    """Standard normal noise, float32 on the CPU (moved later): one stream, or one stream per
    image."""
    if isinstance(generators, list):
        return torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu() for g in generators]
        )
    device = generators.device if generators is not None else "cpu"
    return torch.randn(shape, generator=generators, device=device).cpu()


@torch.no_grad()
def _encode(sd, images: torch.Tensor, batch: int, generators) -> torch.Tensor:
    """images [1 or B, 3, H, W] in [-1, 1] -> latent_scale · z, z sampled from q(z|x) (as
    diffusers), [B, 4, h, w]."""
    posterior = sd.vae.encode(images.to(sd.device, sd.dtype))
    mean, std = posterior.mean.float(), posterior.std.float()
    # one stream per image: sample each image's latents from its own stream
    if isinstance(generators, list):
        mean, std = mean.expand(batch, -1, -1, -1), std.expand(batch, -1, -1, -1)
    z = mean + std * _randn(mean.shape, generators).to(mean.device)
    return sd.config.latent_scale * z.expand(batch, -1, -1, -1)


def _check_arguments(
    cfg,
    prompts,
    negatives,
    num_images,
    steps,
    guidance_scale,
    sampler,
    eta,
    strength,
    output_type,
    callback,
    init_image,
    mask,
    karras=False,
) -> None:
    if len(negatives) not in (1, len(prompts)):
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: "
            "give one negative prompt, or one per prompt"
        )
    _number("num_images", num_images, 1, integer=True)
    _number("steps", steps, 1, cfg.num_train_timesteps - 1, integer=True)
    _number("guidance_scale", guidance_scale, 0)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    _number("eta", eta, 0, 1)
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"eta applies to the DDIM sampler only, not {sampler!r}")
    if karras and sampler in ("ddim", "ddpm"):
        raise ValueError(f"karras sigmas apply to the σ-based samplers, not {sampler!r}")
    if strength is not None:
        _number("strength", strength, 0, 1)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")
    if mask is not None and init_image is None:
        raise ValueError("a mask needs the image it applies to: pass init_image too")


def _images_and_size(sd, init_image, mask, height, width, batch):
    """-> (image [1|B, 3, H, W] in [0, 1] or None, mask [1|B, 1, H, W] or None, height, width), all
    checked."""
    image = mask_full = None
    if init_image is not None:
        image = load_image(init_image)
        if mask is not None:
            mask_full = load_mask(mask)
            if mask_full.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"mask is {mask_full.shape[-1]}x{mask_full.shape[-2]} (width x height) but the init "
                    f"image is {image.shape[-1]}x{image.shape[-2]}: they must have the same size"
                )
        if image.shape[0] not in (1, batch):
            raise ValueError(
                f"init_image holds {image.shape[0]} images for {batch} prompts: give 1 or {batch}"
            )
    default = (
        tuple(image.shape[-2:])
        if image is not None
        else (sd.config.image_size, sd.config.image_size)
    )
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    multiple = size_multiple(sd)
    for name, value in (("height", height), ("width", width)):
        _number(name, value, 1, integer=True)
        if value % multiple:
            raise ValueError(
                f"{name} must be a multiple of {multiple} for this model (VAE downscale "
                f"{sd.vae.downscale} x 2^{len(sd.config.unet.channel_mult) - 1} UNet downsamplings), "
                f"got {value}"
            )
    # resized as diffusers does
    if image is not None and tuple(image.shape[-2:]) != (height, width):
        image = load_image(init_image, size=(height, width))
        mask_full = None if mask is None else load_mask(mask, size=(height, width))
    return image, mask_full, height, width


def generate(
    sd,
    prompt: Union[str, Sequence[str]],
    negative_prompt: Union[str, Sequence[str]] = "",
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    eta: float = 0.0,
    karras: bool = False,
    seed=None,
    latents: Optional[torch.Tensor] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    init_image=None,
    strength: Optional[float] = None,
    mask=None,
    output_type: str = "pil",
    callback: Optional[Callable] = None,
    template: Optional[str] = None,
    num_images: int = 1,
    prompt_weighting: bool = True,
    paste_back: bool = True,
    generator=None,
    progress: bool = False,
):
    """Generate images from text (and an init image / mask). `sd` is a StableDiffusion or a
    guidance.ModelEnsemble.

    prompt: str or list (one image per prompt, × num_images); "A AND B :0.5" composes, "(word:1.3)"
    emphasises
        (prompt_weighting=False reads brackets literally). template="a photo of {}" wraps each
        prompt (part).
    negative_prompt: str or a list as long as prompt. guidance_scale ≥ 0 (0: unconditional, 1: no
    guidance). sampler: 'ddim' (eta in [0, 1]) or 'ddpm' (eta must stay 0). seed: an int (one random
    stream for the batch, as diffusers), a list of one int per image (each image its own
        stream: image i is the same whatever the batch), or None; or pass `generator` (a
        torch.Generator or a list).
    latents: the starting noise ε [B, 4, H/f, W/f] (replaces the random draw; with an init image it
    is the noise
        added to it). strength in [0, 1]: the fraction of the steps run from a noised init image;
        default 0.8 for img2img, 1.0 when inpainting; 0 returns the encoded image.
    mask: 1 (white) = repaint; the same size as init_image. paste_back: keep the unmasked pixels
    exactly. output_type: 'pil' (list of images), 'tensor' ([B, 3, H, W] in [0, 1]) or 'latent'
    (final x in UNet space). callback(step_index, timestep, latents, pred_x0) after every step.
    progress: show a tqdm bar.
    """
    members = ensemble_members(sd)
    sd, cfg = members[0][0], members[0][0].config
    prompts, negatives = (
        _prompt_list("prompt", prompt),
        _prompt_list("negative_prompt", negative_prompt),
    )
    _check_arguments(
        cfg,
        prompts,
        negatives,
        num_images,
        steps,
        guidance_scale,
        sampler,
        eta,
        strength,
        output_type,
        callback,
        init_image,
        mask,
        karras,
    )
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    # num_images of each prompt, side by side
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = [n for n in negatives for _ in range(num_images)]
    batch = len(prompts)
    parts = [
        [(apply_template(text, template), w) for text, w in split_composition(p)] for p in prompts
    ]
    image, mask_full, height, width = _images_and_size(sd, init_image, mask, height, width, batch)
    latent_shape = (
        batch,
        cfg.vae.latent_channels,
        height // sd.vae.downscale,
        width // sd.vae.downscale,
    )
    if latents is not None and (
        not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape
    ):
        raise ValueError(
            f"latents must be a tensor of shape {list(latent_shape)} (batch, channels, height/"
            f"{sd.vae.downscale}, width/{sd.vae.downscale}), got {getattr(latents, 'shape', latents)}"
        )

    inpainting = mask_full is not None
    strength = (1.0 if inpainting else 0.8) if strength is None else strength
    scheduler = make_sampler(sd, sampler, steps, eta, karras)
    timesteps = (
        scheduler.timesteps_for_strength(strength) if image is not None else scheduler.timesteps
    )
    conds = [
        build_conditioning(model, parts, negatives, guidance_scale, prompt_weighting)
        for model, _ in members
    ]
    generators = _generators(seed, generator, batch)
    device = sd.device

    # ---- the starting point; random numbers drawn in diffusers' order ----
    image_vae = None if image is None else image * 2 - 1
    # z₀ of the init image (img2img, and the known region)
    x0_known = None
    if image is not None and (not cfg.is_inpainting or not inpainting or strength < 1):
        x0_known = _encode(sd, image_vae, batch, generators)
    noise = (latents.float().cpu() if latents is not None else _randn(latent_shape, generators)).to(
        device
    )
    if image is None or (inpainting and strength == 1):
        x = noise * scheduler.init_noise_sigma
    elif len(timesteps):
        x = scheduler.add_noise(x0_known, noise, timesteps[0])
    else:
        x = x0_known  # strength 0: nothing to denoise
    # nearest
    mask_latent = (
        None if mask_full is None else F.interpolate(mask_full, size=latent_shape[-2:]).to(device)
    )
    extra = None
    # the UNet also reads [m↓, z(masked image)]; without a mask: repaint all, empty image
    if cfg.is_inpainting:
        keep = torch.zeros(1, 1, height, width) if mask_full is None else (mask_full < 0.5).float()
        masked = (image_vae if image_vae is not None else torch.zeros(1, 3, height, width)) * keep
        masked_latents = _encode(sd, masked, batch, generators)
        m = (
            mask_latent
            if mask_latent is not None
            else torch.ones(1, 1, *latent_shape[-2:], device=device)
        )
        extra = torch.cat([m.expand(batch, -1, -1, -1), masked_latents], dim=1)

    for model, cond in zip((model for model, _ in members), conds):
        recorder = active_recorder(model)
        if recorder is not None:
            owner = cond.row_image.tolist()
            rows = [[r for r in cond.part_rows.tolist() if owner[r] == b] for b in range(batch)]
            recorder.begin(rows, cond.ids, latent_shape[-2:])

    # ---- the denoising loop ----
    steps_iter = timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="sampling", unit="step")
    with torch.no_grad(), plain_convolutions_for_small_latents(x):
        for i, t in enumerate(steps_iter):
            x_in = scheduler.scale_model_input(x, t)  # σ-based samplers rescale the UNet input
            prediction = sum(
                weight * guided_prediction(model, x_in, t, cond, guidance_scale, extra)
                for (model, weight), cond in zip(members, conds)
            )
            if isinstance(generators, list):  # one stream per image
                out = scheduler.step(
                    prediction, t, x, variance_noise=_randn(x.shape, generators).to(device)
                )
            else:
                out = scheduler.step(prediction, t, x, generator=generators)
            x = out.prev_sample
            # put the known region back, at the noise level of t_prev
            if inpainting and not cfg.is_inpainting:
                known = (
                    x0_known
                    if i == len(timesteps) - 1
                    else scheduler.add_noise(x0_known, noise, timesteps[i + 1])
                )
                x = mask_latent * x + (1 - mask_latent) * known
            if callback is not None:
                callback(i, t, x, out.pred_x0)

        if output_type == "latent":
            return x
        decoded = sd.vae.decode((x / cfg.latent_scale).to(sd.dtype)).float()
    images = (decoded / 2 + 0.5).clamp(0, 1).cpu()
    if inpainting and paste_back:
        images = mask_full * images + (1 - mask_full) * image
    return images if output_type == "tensor" else tensor_to_pil(images)
