"""The machinery of `python -m minisd bench` (bench.py): the models, the inputs, and one variant
timed.

The diffusers twin: diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel are built on the meta device from the minisd config and filled with the minisd model's
own tensors through minisd's key map read backwards (keymap.from_diffusers maps every reference name
to a minisd name), so both libraries run the same weights.

One variant of one Case (a model at one image size), all timings wall clock between device
synchronisations:
    first image     one text-to-image run (compilation and CUDA-graph recording included)
    s/image         median over --images further runs
    UNet ms         median over --iters calls on the guided batch x [2B, C, h, h], t = 500, random
                    context [2B, 77, d]
    peak GiB        (CUDA) bytes of the variant's parameters + max allocated − allocated before the
                    variant started, the max counted from after the first image when more images
                    follow
    reserved GiB    the same with memory reserved (held from the card by torch's allocator,
                    CUDA-graph pools included) instead of allocated
and its outputs are compared with minisd's eager ones: UNet max|a − b| / max|b|, image max and mean
|a − b|.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ..model import StableDiffusion
from ..weights.convert import load
from ..attention import set_attention_backend
from ..config import BUNDLED_MODEL, PRESETS
from ..weights.keymap import from_diffusers
from .fastpath import speed_up

PROMPT = "a red circle on the left and a blue square at the top"
BUNDLED = BUNDLED_MODEL


# ---------------------------------------------------------------- the models: minisd, and diffusers
# on its weights
def build_minisd(name: str, device, dtype):

    if name == "bundled" or Path(name).exists():
        return load(BUNDLED if name == "bundled" else name, device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    # random initialisation right where the weights will live
    with torch.device(device):
        sd = StableDiffusion(PRESETS[name]())
    return sd.to(dtype).eval()


def _fill(module, part: str, sd, device) -> None:
    """Load minisd's `part` tensors into a reference module built on the meta device (names through
    keymap)."""

    # minisd name -> reference name
    names = from_diffusers(**{part: {k: k for k in module.state_dict()}})
    own = getattr(sd, part).state_dict()
    tensors = {ref: own[mine[len(part) + 1 :]].detach().clone() for mine, ref in names.items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise RuntimeError(
            f"{part}: the key map left {missing[:3]} unfilled and {unexpected[:3]} unused"
        )
    for name, buffer in list(module.named_buffers()):
        # position ids: a buffer the reference rebuilds, never stored
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            ids = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
            module.get_submodule(owner).register_buffer(leaf, ids, persistent=False)


def diffusers_twin(sd, with_pipeline: bool):
    """(unet, pipeline or None, text model or None) from diffusers/transformers, holding sd's
    weights."""
    from diffusers import UNet2DConditionModel  # optional dependency: imported where used

    cfg, device = sd.config, sd.device
    u = cfg.unet
    widths = [u.channels * m for m in u.channel_mult]
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // sd.vae.downscale,
            in_channels=u.in_channels,
            out_channels=u.out_channels,
            down_block_types=tuple(
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels
            ),
            up_block_types=tuple(
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)
            ),
            block_out_channels=tuple(widths),
            layers_per_block=u.num_res_blocks,
            cross_attention_dim=u.context_dim,
            # diffusers' name for the head *count*
            attention_head_dim=tuple(u.heads_at(w)[0] for w in widths),
            use_linear_projection=u.linear_projection,
            norm_num_groups=u.groups,
            transformer_layers_per_block=u.transformer_depth,
        )
    _fill(unet, "unet", sd, device)
    if not with_pipeline:
        return unet.eval(), None, None
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    v, t = cfg.vae, cfg.text
    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=v.in_channels,
            out_channels=v.out_channels,
            latent_channels=v.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(v.channel_mult),
            up_block_types=("UpDecoderBlock2D",) * len(v.channel_mult),
            block_out_channels=tuple(v.channels * m for m in v.channel_mult),
            layers_per_block=v.num_res_blocks,
            norm_num_groups=v.groups,
            scaling_factor=cfg.latent_scale,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.width,
                intermediate_size=t.mlp_ratio * t.width,
                num_hidden_layers=t.use_layers or t.layers,
                num_attention_heads=t.heads,
                max_position_embeddings=t.max_length,
                hidden_act=t.activation,
                layer_norm_eps=1e-5,
            )
        )
    _fill(vae, "vae", sd, device)
    _fill(text, "text_encoder", sd, device)
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=cfg.prediction_type,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=None,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return unet, pipe, text


# ---------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _params_bytes(*modules) -> int:
    return sum(
        p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters()
    )


class Case:
    """One model at one size: the models, the inputs, and the outputs that later variants are
    compared with."""

    def __init__(self, model_name, size, settings, sd):
        self.name, self.size, self.s, self.sd = model_name, size, settings, sd
        self.device, self.dtype = settings["device"], settings["dtype"]
        cfg = sd.config
        rows = 2 * settings["batch"]
        h = size // sd.vae.downscale
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(rows, cfg.unet.in_channels, h, h, generator=g).to(
            self.device, self.dtype
        )
        self.context = torch.randn(rows, 77, cfg.unet.context_dim, generator=g).to(
            self.device, self.dtype
        )
        # as the minisd pipeline passes it
        self.t_minisd = torch.tensor([500], device=self.device)
        # as diffusers' pipeline passes it
        self.t_diffusers = torch.tensor(500, device=self.device)
        self.noise = torch.randn(settings["batch"], cfg.vae.latent_channels, h, h, generator=g)
        self.unet_d = self.pipe = self.text_d = None
        # variant -> (UNet output, image)
        self.reference: dict = {}

    def ensure_diffusers(self):
        if self.unet_d is None:
            self.unet_d, self.pipe, self.text_d = diffusers_twin(
                self.sd, with_pipeline=self.s["image"]
            )
        return self.unet_d

    # one image, end to end
    def minisd_image(self):
        return self.sd.generate(
            [PROMPT] * self.s["batch"],
            steps=self.s["steps"],
            guidance_scale=7.5,
            latents=self.noise,
            height=self.size,
            width=self.size,
            output_type="tensor",
        )

    def diffusers_image(self):
        b = self.s["batch"]
        with torch.no_grad():
            ids = self.sd.tokenizer([""] * b + [PROMPT] * b).to(self.device)
            embeddings = self.text_d(ids)[0]
        out = self.pipe(
            prompt_embeds=embeddings[b:],
            negative_prompt_embeds=embeddings[:b],
            latents=self.noise.to(self.device, self.dtype),
            num_inference_steps=self.s["steps"],
            guidance_scale=7.5,
            height=self.size,
            width=self.size,
            output_type="pt",
        )
        return out.images.float().cpu()

    def unet_call(self, library):
        if library == "minisd":
            return lambda: self.sd.unet(self.x, self.t_minisd, self.context)
        unet = self.pipe.unet if self.pipe is not None else self.unet_d
        return lambda: unet(
            self.x, self.t_diffusers, encoder_hidden_states=self.context, return_dict=False
        )[0]


def prepare(case: Case, variant: str) -> str:
    """Put the model(s) in the variant's state; returns the library that runs it."""

    s = case.s
    torch.backends.cudnn.benchmark = variant == "diffusers-compiled+cudnn"
    if variant.startswith("minisd"):
        math_path = variant == "minisd-math" or s["attention_slicing"]
        set_attention_backend(case.sd, "math" if math_path else "fused", s["attention_slicing"])
        if variant == "minisd-cl":
            speed_up(
                case.sd,
                attention="fused",
                channels_last=True,
                attention_slicing=s["attention_slicing"],
                tiled_decode=s["tiled_decode"],
                fuse_projections=False,  # "the same, channels_last weights": nothing else
                cudnn_benchmark=False,
            )
        elif variant == "minisd-fast":
            speed_up(
                case.sd,
                attention="math" if s["attention_slicing"] else "fused",
                # as the command line does: channels_last only where the tensor cores want it
                channels_last=case.device.type == "cuda",
                attention_slicing=s["attention_slicing"],
                compile=s["compile"],
                compile_mode=s["compile_mode"],
                compile_options=s["compile_options"],
                cuda_graphs=s["cuda_graphs"],
                tiled_decode=s["tiled_decode"],
            )
        elif s["tiled_decode"]:
            speed_up(
                case.sd,
                attention="math" if variant == "minisd-math" or s["attention_slicing"] else "fused",
                channels_last=False,
                attention_slicing=s["attention_slicing"],
                tiled_decode=True,
                fuse_projections=False,  # the readable reference stays readable
                cudnn_benchmark=False,
            )
        return "minisd"
    unet = case.ensure_diffusers()
    if variant == "diffusers-recipe":
        apply_diffusers_recipe(case, unet)
        return "diffusers"
    if variant in ("diffusers-cl", "diffusers-compiled"):
        unet.to(memory_format=torch.channels_last)
    if variant == "diffusers-compiled":
        compiled = torch.compile(unet, mode=s["compile_mode"], fullgraph=True)
        if case.pipe is not None:
            case.pipe.unet = compiled
        else:
            case.unet_d = compiled
    return "diffusers"


# Inductor options of diffusers' documented speed-up recipe ("Accelerate inference of text-to-image
# diffusion models"): 1×1 convolutions as matrix products, no epilogue fusion, and CUDA graphs
# (mode="reduce-overhead" is exactly triton.cudagraphs=True). coordinate_descent_tuning is left out:
# it compiles for many minutes. Passed per compile, so they never leak into the minisd variants.
DIFFUSERS_RECIPE_OPTIONS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "triton.cudagraphs": True,
}


def apply_diffusers_recipe(case: Case, unet) -> None:
    """diffusers' documented recipe: fused QKV projections, channels_last UNet and VAE, and
    torch.compile(fullgraph=True) of the UNet and of the VAE's decode with the options above."""
    import torch

    pipe = case.pipe
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(unet, fullgraph=True, options=DIFFUSERS_RECIPE_OPTIONS)
    if pipe is None:
        case.unet_d = compiled
        return
    pipe.vae.fuse_qkv_projections()
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = compiled
    pipe.vae.decode = torch.compile(
        pipe.vae.decode, fullgraph=True, options=DIFFUSERS_RECIPE_OPTIONS
    )


def run_variant(case: Case, variant: str) -> dict:
    s, device = case.s, case.device
    row = dict(
        model=case.name,
        size=case.size,
        dtype=str(case.dtype).replace("torch.", ""),
        device=str(device),
        variant=variant,
    )
    library = prepare(case, variant)
    models = (
        (case.sd,)
        if library == "minisd"
        else (case.unet_d, case.pipe.vae if case.pipe else None, case.text_d)
    )
    if device.type == "cuda":
        gc.collect()  # garbage of earlier variants must not be freed during this one
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    image_fn = case.minisd_image if library == "minisd" else case.diffusers_image
    image = unet_out = None
    with torch.no_grad():
        if s["image"]:
            row["first_image_s"], image = _timed(image_fn, device)
            if device.type == "cuda" and s["images"]:
                # The peak counts from here: what the first image left allocated (CUDA graphs,
                # caches) stays counted, its one-time scratch memory (compilation, autotuning) does
                # not. So the allocator's cache of freed one-time blocks is handed back too (a
                # recording's pool is in use, so it stays reserved and counted).
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = [_timed(image_fn, device)[0] for _ in range(s["images"])]
            row["image_s"] = statistics.median(times) if times else row["first_image_s"]
        if s["unet"]:
            call = case.unet_call(library)
            first, unet_out = _timed(call, device)
            # to the CPU now: a CUDA-graph replay reuses its output memory, so the next call would
            # overwrite this tensor (torch refuses to read it then)
            unet_out = unet_out.float().cpu()
            row.setdefault("first_image_s", None)
            # on the CPU the first call is warm-up enough
            for _ in range(2 if device.type == "cuda" else 0):
                call()
            times = [_timed(call, device)[0] for _ in range(s["iters"])]
            row["unet_ms"] = 1e3 * statistics.median(times)
            row["unet_its"] = 1e3 / row["unet_ms"]
    if device.type == "cuda":
        weights = _params_bytes(*models)
        row["peak_gib"] = (weights + torch.cuda.max_memory_allocated(device) - base) / 2**30
        # What the card gives the variant: CUDA-graph memory pools are reserved, not allocated (a
        # replay does not go through the allocator), so only this figure sees them.
        row["reserved_gib"] = (
            weights + torch.cuda.max_memory_reserved(device) - base_reserved
        ) / 2**30
    case.reference[variant] = (unet_out, image)
    row.update(compare(case, variant))
    return row


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(case: Case, variant: str) -> dict:
    """How far this variant's outputs are from minisd's eager ones (and minisd's eager from
    diffusers' eager)."""
    out = {}
    pairs = {
        "diffusers": "minisd",
        "minisd-fast": "minisd",
        "minisd-math": "minisd",
        "minisd-cl": "minisd",
        "diffusers-recipe": "minisd",
    }
    other = case.reference.get(pairs.get(variant))
    mine = case.reference[variant]
    if other is None:
        return out
    if mine[0] is not None and other[0] is not None:
        out["unet_rel_err_vs_minisd"] = _rel(mine[0], other[0])
    if mine[1] is not None and other[1] is not None:
        out["image_max_abs_diff_vs_minisd"] = (mine[1] - other[1]).abs().max().item()
        out["image_mean_abs_diff_vs_minisd"] = (mine[1] - other[1]).abs().mean().item()
    return out


def warm_up(device, dtype) -> None:
    """Load the math libraries' kernels once, so that the first variant does not pay for
    everyone."""

    x = torch.randn(2, 64, 32, 32, device=device, dtype=dtype)
    F.conv2d(x, torch.randn(64, 64, 3, 3, device=device, dtype=dtype), padding=1)
    # cuBLAS and its workspace
    F.linear(x.flatten(2), torch.randn(64, 1024, device=device, dtype=dtype))
    torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2))
    q = torch.randn(2, 8, 64, 40, device=device, dtype=dtype)
    F.scaled_dot_product_attention(q, q, q)
    _sync(device)
