"""Text to image, image to image and inpainting: the sampling loop that ties the model together.

Text to image (Rombach et al. 2022), in four steps, each a function below:

    1. encode the prompts      context = text_encoder(tokens)  (+ the negative prompt's, for CFG)
    2. the starting latents    x_T ~ N(0, I)  [B, 4, H/f, W/f]    f = the VAE's downscale (8 in SD)
    3. the denoising loop      for t in τ_N > … > τ_1:
                                   ε̂ = guided UNet prediction         (guidance.py)
                                   x ← sampler.step(ε̂, t, x)          (ddim.py, ddpm.py)
    4. decode                  image = VAE.decode(x / latent_scale)

Everything else is a layer around these steps, never a branch inside the loop:
  - Image to image (SDEdit, Meng et al. 2022) changes step 2: encode the image, z₀ = latent_scale ·
    a sample of q(z|x), jump to the noise level of the first timestep kept by `strength`,
    x = √ᾱ_t z₀ + √(1−ᾱ_t) ε, and run only the remaining steps.
  - Inpainting (mask m = 1 where the image is repainted) changes the prediction or the sampler:
      9-channel inpainting models read [x, m↓, z(masked image)] at every step (the masked image is
      image · (m < 0.5), m↓ the mask resized to the latents by nearest neighbour, as trained);
      ordinary models get a sampler that puts the known region back after every step,
          x ← m↓ · x + (1 − m↓) · q_sample(z₀, t_prev, ε)    (z₀ itself after the last step)
      With paste_back (default) the decoded image keeps the original pixels exactly where m = 0.
  - Ensembles and composition change the prediction (guidance.py, ensemble.py); attention maps
    listen to the UNet (attention_maps.py).

`denoise_steps` offers the loop as a generator that yields every step's latents and x̂₀, so a
notebook or a widget can watch it; `generate` runs it to the end and decodes.

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
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .attention_maps import announce_batch
from .card import sampling_defaults
from .checks import check_choice, check_number
from . import samplers
from .guidance import Conditioning, build_conditioning, guided_prediction
from .images import load_image, load_mask, tensor_to_pil
from .prompts import apply_template, split_composition
from .samplers import SAMPLER_NAMES as SAMPLERS
from .schedule import NoiseSchedule, ScheduleConfig, StepOutput

# The samplers `generate` knows are the registry's (minisd/samplers/__init__.py: a new sampler is
# one more line there).
OUTPUT_TYPES = ("pil", "tensor", "latent")

# Up to this many latent positions (images × height × width) the CPU runs convolutions with
# PyTorch's own kernels.
SMALL_LATENT_POSITIONS = 512


def noise_schedule(sd) -> NoiseSchedule:
    """The β / ᾱ schedule a model was trained with (chapter 07), from its config."""
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


def make_sampler(sd, name: str, steps: int, eta: float = 0.0, karras: bool = False):
    """A fresh sampler `name` (one of SAMPLERS: samplers/__init__.py) over `steps` steps of `sd`'s
    schedule."""
    check_choice("sampler", name, SAMPLERS)
    return samplers.make_sampler(name, noise_schedule(sd), steps, karras=karras, eta=eta)


@dataclass
class SamplingSettings:
    """Everything `generate` takes besides the model and the prompts; each is also a keyword of
    `generate`: `sd.generate("a cat", steps=20)` is `sd.generate("a cat", settings=s)` with
    `s = SamplingSettings(steps=20)`.

    steps, sampler (one of SAMPLERS), eta (DDIM only, in [0, 1]), karras (σ-based samplers);
    guidance_scale ≥ 0 (0: unconditional, 1: no guidance); guidance_rescale φ in [0, 1] (Lin et
    al. 2024 eq. 15-16, guidance.py; 0.7 suggested with zero-terminal-SNR models, 0: plain CFG).
    sampler may also be a sampler object (samplers/__init__.py), built with the options a name
    cannot carry: DDIMSampler(NoiseSchedule(ScheduleConfig(..., rescale_betas_zero_snr=True)), 10,
    spacing="trailing", limits=X0Limits(clip_sample=True), set_alpha_to_one=True) or custom
    `timesteps=[...]`; its schedule must be the model's (prediction type, T), steps, eta and
    karras are then its own (leave them out), and each run uses a fresh copy of it.
    seed: an int (one random stream for the batch, as diffusers), a list of one int per image
    (each image its own stream: image i is the same whatever the batch), or None; or `generator`
    (a torch.Generator or a list).
    latents: the starting noise ε [B, 4, H/f, W/f] (with an init image: the noise added to it).
    init_image, strength in [0, 1] (the fraction of the steps run from the noised image; default
    0.8, 1.0 when inpainting; 0 returns the encoded image), mask (1 / white = repaint;
    init_image's size), paste_back (keep the unmasked pixels exactly). template="a photo of {}"
    wraps each prompt (part); prompt_weighting reads "(word:1.3)" as emphasis. output_type:
    'pil' (list of images), 'tensor' ([B, 3, H, W] in [0, 1]) or 'latent' (final x).
    callback(step_index, timestep, latents, pred_x0) after every step; progress shows a tqdm
    bar.
    """

    # None: the model card's (`sd.config.card`, card.py): SD's usual 50 DDIM steps at 7.5, or a
    # model's own (the bundled model: 1.5)
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    guidance_rescale: float = 0.0
    sampler: Union[str, object, None] = None  # a name, or a sampler object
    eta: float = 0.0
    karras: bool = False
    seed: Union[int, Sequence[int], None] = None
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None
    latents: Optional[torch.Tensor] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_images: int = 1
    init_image: object = None
    strength: Optional[float] = None
    mask: object = None
    paste_back: bool = True
    template: Optional[str] = None
    prompt_weighting: bool = True
    output_type: str = "pil"
    callback: Optional[Callable] = None
    progress: bool = False

    def check(self, num_train_timesteps: int) -> None:
        """Raise ValueError for a setting that cannot work (the ones needing the model or the
        images are checked where those are read)."""
        check_number("num_images", self.num_images, 1, integer=True)
        check_number("guidance_scale", self.guidance_scale, 0)
        check_number("guidance_rescale", self.guidance_rescale, 0, 1, message="0: plain guidance")
        if isinstance(self.sampler, str):
            check_number("steps", self.steps, 1, num_train_timesteps - 1, integer=True)
            if self.sampler not in SAMPLERS:
                raise ValueError(
                    f"unknown sampler {self.sampler!r}; choose one of {tuple(SAMPLERS)}"
                )
            check_number("eta", self.eta, 0, 1)
            if self.sampler != "ddim" and self.eta != 0:
                raise ValueError(f"eta applies to the DDIM sampler only, not {self.sampler!r}")
            if self.karras and self.sampler in ("ddim", "ddpm"):
                raise ValueError(
                    f"karras sigmas apply to the σ-based samplers, not {self.sampler!r}"
                )
        else:
            check_sampler_object(self.sampler, self.eta, self.karras)
        if self.strength is not None:
            check_number("strength", self.strength, 0, 1)
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"unknown output_type {self.output_type!r}; choose one of {OUTPUT_TYPES}"
            )
        if self.callback is not None and not callable(self.callback):
            raise ValueError(f"callback must be callable, got {type(self.callback).__name__}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs the image it applies to: pass init_image too")


def check_sampler_object(sampler, eta, karras) -> None:
    """A sampler object has the samplers' interface and carries its own η and spacing."""
    needed = ("timesteps", "step", "scale_model_input", "add_noise", "timesteps_for_strength")
    if not all(hasattr(sampler, name) for name in needed):
        raise ValueError(
            f"sampler must be one of {tuple(SAMPLERS)} or a sampler object (minisd.samplers), "
            f"got {sampler!r:.80}"
        )
    if eta != 0 or karras:
        raise ValueError("eta and karras belong to the sampler object: set them when building it")


def fresh_sampler(sd, s: SamplingSettings, steps_given: bool):
    """The sampler of a run: made from its name, or a copy of the given object (σ-based samplers
    keep state between steps, and the caller's object stays as it was for the next run)."""
    if isinstance(s.sampler, str):
        return make_sampler(sd, s.sampler, s.steps, s.eta, s.karras)
    if steps_given:
        raise ValueError("steps belong to the sampler object: leave steps out beside it")
    schedule, config = getattr(s.sampler, "schedule", None), sd.config
    if schedule is not None and (
        schedule.prediction_type != config.prediction_type
        or schedule.num_train_timesteps != config.num_train_timesteps
    ):
        raise ValueError(
            f"the sampler's schedule (prediction_type {schedule.prediction_type!r}, "
            f"{schedule.num_train_timesteps} timesteps) is not the model's "
            f"({config.prediction_type!r}, {config.num_train_timesteps})"
        )
    return copy.deepcopy(s.sampler)


def settings_from(settings: Optional[SamplingSettings], options: dict) -> SamplingSettings:
    """`settings` (or the defaults) with keyword options replacing fields; an unknown keyword is
    a TypeError, as for any function."""
    if settings is not None and not isinstance(settings, SamplingSettings):
        raise TypeError(
            f"settings must be a SamplingSettings, got {type(settings).__name__}: give steps, "
            "guidance_scale, ... as keywords (generate(sd, prompt, negative_prompt, steps=20))"
        )
    names = {f.name for f in dataclasses.fields(SamplingSettings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
    return dataclasses.replace(settings or SamplingSettings(), **options)


# ── random numbers ─────────────────────────────────────────────────────────────────────────────


class RandomStreams:
    """Where the random numbers come from: one torch.Generator for the batch, one per image, or
    torch's global generator (None). Noise is drawn on the CPU in float32, then moved."""

    def __init__(self, seed, generator, batch: int):
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:
            seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
            for s in seeds:
                check_number("seed", s, 0, 2**63 - 1, integer=True)
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            generator = generators if isinstance(seed, (list, tuple)) else generators[0]
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(
                    f"got {len(generator)} seeds/generators for {batch} images: give one, "
                    "or one per image"
                )
            generator = list(generator)
        self.generator = generator
        self.per_image = isinstance(generator, list)

    def randn(self, shape) -> torch.Tensor:
        """Standard normal noise [B, …], float32 on the CPU: one stream, or one per image."""
        if self.per_image:
            return torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu()
                 for g in self.generator]
            )
        device = self.generator.device if self.generator is not None else "cpu"
        return torch.randn(shape, generator=self.generator, device=device).cpu()

    def for_step(self, x: torch.Tensor) -> dict:
        """The noise argument of `sampler.step`: per-image streams give the noise itself, one
        stream is handed to the sampler (which draws only if it needs noise)."""
        if self.per_image:
            return {"variance_noise": self.randn(x.shape).to(x.device)}
        return {"generator": self.generator}


# ── 1. the prompts ─────────────────────────────────────────────────────────────────────────────


def prompt_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")


def encode_prompts(
    sd, prompt, negative_prompt, settings: SamplingSettings
) -> tuple[list[list[tuple[str, float]]], list[str]]:
    """The prompts as text parts per image ([(text, weight), …], composition split, template
    applied; `num_images` copies of each) and one negative prompt per image."""
    prompts = prompt_list("prompt", prompt)
    negatives = prompt_list("negative_prompt", negative_prompt)
    if len(negatives) not in (1, len(prompts)):
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: "
            "give one negative prompt, or one per prompt"
        )
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    n = settings.num_images  # num_images of each prompt, side by side
    parts = [
        [(apply_template(text, settings.template), w) for text, w in split_composition(p)]
        for p in prompts
        for _ in range(n)
    ]
    return parts, [neg for neg in negatives for _ in range(n)]


# ── 2. the starting latents ────────────────────────────────────────────────────────────────────


def size_multiple(sd) -> int:
    """Image sizes must be multiples of this: the VAE's downscale times the UNet's total
    downsampling."""
    return sd.vae.downscale * 2 ** (len(sd.config.unet.channel_mult) - 1)


def images_and_size(sd, settings: SamplingSettings, batch: int):
    """-> (image [1|B, 3, H, W] in [0, 1] or None, mask [1|B, 1, H, W] or None, height, width),
    all checked."""
    s = settings
    image = mask = None
    if s.init_image is not None:
        image = load_image(s.init_image)
        if s.mask is not None:
            mask = load_mask(s.mask)
            if mask.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"mask is {mask.shape[-1]}x{mask.shape[-2]} (width x height) but the init "
                    f"image is {image.shape[-1]}x{image.shape[-2]}: they must have the same size"
                )
        if image.shape[0] not in (1, batch):
            raise ValueError(
                f"init_image holds {image.shape[0]} images for {batch} prompts: give 1 or {batch}"
            )
    size = sd.config.image_size
    default = tuple(image.shape[-2:]) if image is not None else (size, size)
    height = default[0] if s.height is None else s.height
    width = default[1] if s.width is None else s.width
    multiple = size_multiple(sd)
    for name, value in (("height", height), ("width", width)):
        check_number(name, value, 1, integer=True)
        if value % multiple:
            raise ValueError(
                f"{name} must be a multiple of {multiple} for this model (VAE downscale "
                f"{sd.vae.downscale} x 2^{len(sd.config.unet.channel_mult) - 1} UNet "
                f"downsamplings), got {value}"
            )
    if image is not None and tuple(image.shape[-2:]) != (height, width):  # as diffusers resizes
        image = load_image(s.init_image, size=(height, width))
        mask = None if s.mask is None else load_mask(s.mask, size=(height, width))
    return image, mask, height, width


@torch.no_grad()
def encode_image(sd, images: torch.Tensor, batch: int, streams: RandomStreams) -> torch.Tensor:
    """images [1 or B, 3, H, W] in [-1, 1] -> latent_scale · z, z sampled from q(z|x) (as
    diffusers), [B, 4, h, w]."""
    posterior = sd.vae.encode(images.to(sd.device, sd.dtype))
    mean, std = posterior.mean.float(), posterior.std.float()
    if streams.per_image:  # sample each image's latents from its own stream
        mean, std = mean.expand(batch, -1, -1, -1), std.expand(batch, -1, -1, -1)
    z = mean + std * streams.randn(mean.shape).to(mean.device)
    return sd.config.latent_scale * z.expand(batch, -1, -1, -1)


def starting_noise(settings: SamplingSettings, shape, streams: RandomStreams, device):
    """ε of the start x_T: the given `latents`, or drawn."""
    latents = settings.latents
    if latents is None:
        return streams.randn(shape).to(device)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise ValueError(
            f"latents must be a tensor of shape {list(shape)} (batch, channels, height/f, "
            f"width/f), got {getattr(latents, 'shape', latents)}"
        )
    return latents.float().cpu().to(device)


# ── 3. the denoising loop ──────────────────────────────────────────────────────────────────────


@dataclass
class Step:
    """One step of the loop, as `denoise_steps` yields it."""

    index: int  # 0 … N−1
    timestep: int  # t of this step (the noise level it started from)
    latents: torch.Tensor  # x after the step, [B, 4, h, w] float32
    pred_x0: torch.Tensor  # the sampler's x̂₀ at this step


def denoising_loop(
    predict: Callable, sampler, x: torch.Tensor, timesteps, streams: RandomStreams
) -> Iterator[Step]:
    """Sampling (chapters 08, 12): for t = τ_N … τ_1, predict and step.

    predict(x, t) -> the guided prediction ε̂ (or v̂) [B, 4, h, w];  sampler.step(ε̂, t, x) ->
    x at the previous timestep and x̂₀.
    """
    for i, t in enumerate(timesteps):
        x_in = sampler.scale_model_input(x, t)  # σ-based samplers feed the UNet x/√(σ²+1)
        prediction = predict(x_in, t)  # ε̂ = ε_u + s · (ε_c − ε_u)       (guidance.py)
        out = sampler.step(prediction, t, x, **streams.for_step(x))  # x_t -> x_prev, x̂₀
        x = out.prev_sample
        yield Step(i, t, x, out.pred_x0)


# ── the layers around the loop ─────────────────────────────────────────────────────────────────


def ensemble_of(sd_or_ensemble) -> list[tuple]:
    """[(model, weight), …]: a ModelEnsemble's members, or one model of weight 1."""
    members = getattr(sd_or_ensemble, "members", None)
    if members is not None:
        return members
    if not hasattr(sd_or_ensemble, "unet") or not hasattr(sd_or_ensemble, "config"):
        raise TypeError(
            "expected a StableDiffusion model or a ModelEnsemble, got "
            f"{type(sd_or_ensemble).__name__}"
        )
    return [(sd_or_ensemble, 1.0)]


def make_predictor(
    members: list[tuple],
    conditionings: list[Conditioning],
    guidance_scale: float,
    extra_channels: Optional[torch.Tensor] = None,
    guidance_rescale: float = 0.0,
) -> Callable:
    """predict(x, t) = Σₖ λₖ · guided ε̂⁽ᵏ⁾(x, t): classifier-free guidance (and composition,
    and rescale φ) per model, mixed over the ensemble; `extra_channels` are what inpainting models
    read beside x."""

    @torch.no_grad()
    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        with plain_convolutions_for_small_latents(x):
            return sum(
                weight
                * guided_prediction(
                    model, x, t, cond, guidance_scale, extra_channels, guidance_rescale
                )
                for (model, weight), cond in zip(members, conditionings)
            )

    return predict


class KeepKnownRegion:
    """Inpainting with an ordinary model, as a sampler around any sampler: after each step put the
    known region (m↓ = 0) back at the noise level of the next timestep,
        x ← m↓ · x + (1 − m↓) · q_sample(z₀, t_prev, ε)        (z₀ itself after the last step)."""

    def __init__(self, sampler, timesteps: list, mask, x0_known, noise: torch.Tensor):
        self.sampler, self.mask, self.x0_known, self.noise = sampler, mask, x0_known, noise
        self.timesteps, self.index = timesteps, 0  # which step comes next (Heun repeats t)

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.sampler.scale_model_input(x, t)

    def step(self, prediction, t, x, **noise) -> StepOutput:
        out = self.sampler.step(prediction, t, x, **noise)
        self.index += 1
        known = self.x0_known
        if self.index < len(self.timesteps):
            known = self.sampler.add_noise(self.x0_known, self.noise, self.timesteps[self.index])
        x = self.mask * out.prev_sample + (1 - self.mask) * known
        return StepOutput(prev_sample=x, pred_x0=out.pred_x0)


@contextlib.contextmanager
def plain_convolutions_for_small_latents(latents: torch.Tensor):
    """On the CPU, run the denoising loop's convolutions with PyTorch's plain kernels when the
    latents are tiny.

    oneDNN, PyTorch's default CPU convolution, spends ~0.1 ms setting up each call: on the bundled
    model's 8×8 latents that is most of the work, and the plain kernels make a 50-step image about a
    quarter faster. Larger latents (SD's 64×64, or big batches) keep oneDNN, which is faster there.
    Same convolution, same result up to float rounding; nothing changes on a GPU. (The switch is
    torch's own and process-wide, so it is set for one prediction at a time and always restored.)
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


# ── putting it together ────────────────────────────────────────────────────────────────────────


@dataclass
class Run:
    """A checked, prepared request: what the loop starts from and what decoding needs."""

    sd: object  # the model whose VAE encodes and decodes (an ensemble's first member)
    settings: SamplingSettings
    predict: Callable
    sampler: object
    timesteps: list
    start: torch.Tensor  # x at the first timestep (or the result, if there are no steps)
    streams: RandomStreams
    image: Optional[torch.Tensor]  # the init image in [0, 1]
    mask: Optional[torch.Tensor]  # the full-size mask, 1 = repaint

    def steps(self) -> Iterator[Step]:
        timesteps = self.timesteps
        if self.settings.progress:
            timesteps = tqdm(timesteps, desc="sampling", unit="step")
        return denoising_loop(self.predict, self.sampler, self.start, timesteps, self.streams)


def prepare(sd_or_ensemble, prompt, negative_prompt="", settings=None, **options) -> Run:
    """Check every argument, encode the prompts, and make the starting latents (random numbers
    drawn in diffusers' order: image latents, starting noise, masked-image latents)."""
    s = settings_from(settings, options)
    members = ensemble_of(sd_or_ensemble)
    sd, cfg = members[0][0], members[0][0].config
    steps_given = s.steps is not None
    s.steps, s.guidance_scale, s.sampler = sampling_defaults(
        cfg.card, s.steps, s.guidance_scale, s.sampler
    )
    parts, negatives = encode_prompts(sd, prompt, negative_prompt, s)
    s.check(cfg.num_train_timesteps)
    batch, device = len(parts), sd.device
    image, mask, height, width = images_and_size(sd, s, batch)
    f = sd.vae.downscale
    shape = (batch, cfg.vae.latent_channels, height // f, width // f)
    inpainting = mask is not None
    strength = (1.0 if inpainting else 0.8) if s.strength is None else s.strength
    sampler = fresh_sampler(sd, s, steps_given)
    timesteps = sampler.timesteps if image is None else sampler.timesteps_for_strength(strength)
    conditionings = [
        build_conditioning(model, parts, negatives, s.guidance_scale, s.prompt_weighting)
        for model, _ in members
    ]
    announce_batch(members, conditionings, shape[-2:])  # for attention maps, if recorded
    streams = RandomStreams(s.seed, s.generator, batch)

    # 2. the start: noise, or (img2img) the noised image, or (strength 0) the image itself
    image_vae = None if image is None else image * 2 - 1
    x0_known = None  # z₀ of the init image (img2img, and the known region when inpainting)
    if image is not None and not (cfg.is_inpainting and inpainting and strength == 1):
        x0_known = encode_image(sd, image_vae, batch, streams)
    noise = starting_noise(s, shape, streams, device)
    if image is None or (inpainting and strength == 1):
        start = noise * sampler.init_noise_sigma  # σ-based samplers start at x_T = σ_max · ε
    elif len(timesteps):
        start = sampler.add_noise(x0_known, noise, timesteps[0])
    else:
        start = x0_known
    mask_latent = None if mask is None else F.interpolate(mask, size=shape[-2:]).to(device)

    # inpainting: the model reads [m↓, z(masked image)] (repaint all, empty image, without a
    # mask), or an ordinary model gets the known region put back after every step
    extra = None
    if cfg.is_inpainting:
        keep = torch.zeros(1, 1, height, width) if mask is None else (mask < 0.5).float()
        known = image_vae if image is not None else torch.zeros(1, 3, height, width)
        masked = encode_image(sd, known * keep, batch, streams)
        m = mask_latent if mask is not None else torch.ones(1, 1, *shape[-2:], device=device)
        extra = torch.cat([m.expand(batch, -1, -1, -1), masked], dim=1)
    elif inpainting:
        sampler = KeepKnownRegion(sampler, timesteps.tolist(), mask_latent, x0_known, noise)
    predict = make_predictor(members, conditionings, s.guidance_scale, extra, s.guidance_rescale)
    return Run(sd, s, predict, sampler, timesteps.tolist(), start, streams, image, mask)


def denoise_steps(sd, prompt, negative_prompt="", settings=None, **options) -> Iterator[Step]:
    """The denoising loop one step at a time: yields a `Step` (index, timestep, latents, pred_x0)
    after every sampler step. Takes the arguments of `generate` (output_type, callback and
    paste_back aside: nothing is decoded).

        for step in denoise_steps(sd, "a red circle", steps=20, seed=0):
            show(step.pred_x0)
    """
    return prepare(sd, prompt, negative_prompt, settings, **options).steps()


@torch.no_grad()
def decode(sd, latents: torch.Tensor) -> torch.Tensor:
    """Latents in UNet space [B, 4, h, w] -> images [B, 3, H, W] in [0, 1], float32 on the CPU."""
    with plain_convolutions_for_small_latents(latents):
        decoded = sd.vae.decode((latents / sd.config.latent_scale).to(sd.dtype)).float()
    return (decoded / 2 + 0.5).clamp(0, 1).cpu()


def generate(sd, prompt, negative_prompt="", settings=None, **options):
    """Generate images from text (and an init image / mask). `sd` is a StableDiffusion or a
    ModelEnsemble.

    prompt: str or list (one image per prompt, × num_images); "A AND B :0.5" composes, "(word:1.3)"
    emphasises. negative_prompt: str or a list as long as prompt. Every other argument is a field
    of `SamplingSettings` (steps, guidance_scale, sampler, eta, seed, latents, height, width,
    init_image, strength, mask, output_type, callback, ...), given as keywords or as `settings`.
    """
    run = prepare(sd, prompt, negative_prompt, settings, **options)
    x, callback = run.start, run.settings.callback
    for step in run.steps():
        x = step.latents
        if callback is not None:
            callback(step.index, step.timestep, step.latents, step.pred_x0)
    if run.settings.output_type == "latent":
        return x
    images = decode(run.sd, x)
    if run.mask is not None and run.settings.paste_back:
        images = run.mask * images + (1 - run.mask) * run.image
    return images if run.settings.output_type == "tensor" else tensor_to_pil(images)
