"""`python -m minisd bench`: minisd and diffusers timed side by side, in one process, on the same
weights.

For every model and image size, each variant below is measured for:
    UNet ms, it/s   one UNet call on the guided batch (2 × images: unconditional + prompt rows),
                    median of --iters; it/s = calls per second, the rate of the denoising loop's
                    dominant work
    s/image         text to image end to end: encode the prompts, --steps DDIM steps with guidance,
                    decode (median)
    first image     the same for the variant's first image: compilation and CUDA-graph recording
                    included
    peak GiB        (CUDA) the variant's weights + the most memory it held above them while making
                    an image (after its first image: what that left allocated counts, its one-time
                    scratch does not)
    reserved GiB    the same counted as memory reserved from the card: a CUDA graph's replay
                    does not go through the allocator, so its pool shows here, not in peak GiB

Variants (the same weights in each):
    minisd-math         the readable path: attention written out as einsum, softmax, einsum; eager
    minisd              eager, fused attention (torch's scaled_dot_product_attention, which
                        diffusers uses too)
    minisd-cl           the same, channels_last weights
    minisd-fast         the fast path (fastpath.py) as the command line uses it: fused attention
                        and fused q/k/v projections; on a GPU also channels_last, torch.compile of
                        the UNet and VAE decoder and CUDA graphs of both (--no-compile,
                        --no-cuda-graphs)
    diffusers, diffusers-cl    diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
                               CLIPTextModel, eager
    diffusers-compiled  torch.compile(unet, fullgraph=True) + channels_last, no CUDA graphs (a
                        weaker baseline, kept for comparison with earlier figures)
    diffusers-compiled+cudnn   the same, re-timed with cudnn.benchmark on (which the minisd fast
                               path turns on)
    diffusers-recipe    diffusers' documented speed-up recipe, the strongest baseline and
                        minisd-fast's counterpart: fuse_qkv_projections, channels_last UNet and VAE,
                        Inductor's conv_1x1_as_mm and epilogue_fusion=False, and
                        torch.compile(fullgraph=True) with CUDA graphs (mode "reduce-overhead") of
                        the UNet and of vae.decode

The diffusers variants run diffusers' modules holding the minisd model's own tensors (bench_cases.py
builds them and times one variant; this file reads the settings, runs every case and prints the
table). diffusers and transformers are needed only for the diffusers variants. Settings that cannot
work are refused before anything runs (exit status 2); running out of GPU memory is reported with
the options that need less (exit status 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
from pathlib import Path

import torch

from ..config import PRESETS
from .bench_cases import BUNDLED, Case, build_minisd, run_variant, warm_up
from .fastpath import slow_down

ORDER = (
    "minisd-math",
    "minisd",
    "minisd-cl",
    "diffusers",
    "diffusers-cl",
    "diffusers-compiled",
    "minisd-fast",
    "diffusers-compiled+cudnn",
    "diffusers-recipe",
)
DEFAULT_VARIANTS = {"cuda": ORDER, "cpu": ("minisd-math", "minisd", "minisd-fast", "diffusers")}
COUNTERPART = {
    "minisd-math": "diffusers",
    "minisd": "diffusers",
    "minisd-cl": "diffusers-cl",
    "minisd-fast": "diffusers-recipe",
}
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
MEMORY_HELP = (
    "Options that need less GPU memory: fused attention (the default; never builds the tokens × "
    "tokens "
    "matrix), --attention-slicing N (math attention, N batch·head rows at a time), --tiled-decode "
    "(decode "
    "the latents in overlapping tiles), --dtype float16, a smaller --size or --batch, and one "
    "variant at a "
    "time (--variants minisd) so that only one copy of the weights is on the GPU."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--device", help="cpu, cuda, cuda:1, … (default: cuda if there is one, else cpu)")
    a(
        "--dtype",
        help="float32 / float16 / bfloat16 (default: float16 on a GPU, float32 on the CPU)",
    )
    a(
        "--preset",
        nargs="+",
        help="model sizes: sd1 sd2 sd2-base sd1-inpainting tiny bundled (default: sd1 on a GPU; "
        "tiny, and the bundled model if present, on the CPU). Presets get random weights; "
        "bundled is the trained model that ships with minisd.",
    )
    a(
        "--model",
        help="a model file to time instead of a preset (minisd file or official checkpoint)",
    )
    a("--size", nargs="+", type=int, help="image sizes (square; default: each model's native size)")
    a(
        "--batch",
        type=int,
        default=1,
        help="images per prompt (the UNet batch is twice this, with guidance)",
    )
    a("--steps", type=int, default=50, help="DDIM steps per image (default 50)")
    a("--iters", type=int, help="timed UNet calls per variant (default 20 on a GPU, 3 on the CPU)")
    a(
        "--images",
        type=int,
        help="timed images per variant after the first (default 3 on a GPU, 2 on the CPU)",
    )
    a("--only", choices=("unet", "image"), help="time only the UNet, or only whole images")
    a(
        "--variants",
        help=f"comma-separated, from {','.join(ORDER)} (default: all on a GPU; "
        f"{','.join(DEFAULT_VARIANTS['cpu'])} on the CPU)",
    )
    a(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="minisd-fast: torch.compile (default: on a GPU)",
    )
    a(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="minisd-fast: CUDA graphs (default: on a GPU)",
    )
    a(
        "--compile-mode",
        help="torch.compile mode for the compiled variants (default: torch's default)",
    )
    a(
        "--compile-options",
        help="minisd-fast: Inductor options to switch on instead of a mode, comma-separated "
        "(e.g. conv_1x1_as_mm,coordinate_descent_tuning)",
    )
    a(
        "--attention-slicing",
        type=int,
        help="minisd variants: math attention, N batch·head rows at a time",
    )
    a(
        "--tiled-decode",
        action="store_true",
        help="minisd variants: decode the image in 512-pixel tiles",
    )
    a(
        "--max-memory",
        type=float,
        help="(CUDA) cap the memory torch may use, in GiB, to try a smaller card's budget",
    )
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    a("--json", help="also write every result to this JSON file (rewritten after each variant)")


# ---------------------------------------------------------------- settings: refuse what cannot
# work, clearly
def check_settings(args) -> dict:

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(
            f"--device {device_name!r} is not a device name (try cpu, cuda, cuda:0)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {device_name}: the benchmark runs on cpu or cuda devices, not {device.type}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device_name}: CUDA is not available here (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU found'})"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device_name}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype {dtype_name!r} is not one of float32, float16, bfloat16")
    dtype_name = DTYPES[dtype_name]
    if device.type == "cpu" and dtype_name == "float16":
        raise ValueError(
            "--dtype float16 needs a GPU: the CPU has no fast float16 arithmetic (use float32 or "
            "bfloat16)"
        )
    if device.type == "cuda" and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
            "(use float16)"
        )

    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both")
    if args.model:
        if not Path(args.model).exists():
            raise FileNotFoundError(f"--model {args.model}: no such file or folder")
        models = [args.model]
    else:
        models = args.preset or (
            ["sd1"]
            if device.type == "cuda"
            else ["tiny"] + (["bundled"] if BUNDLED.exists() else [])
        )
        for name in models:
            if name == "bundled" and not BUNDLED.exists():
                raise ValueError(
                    f"--preset bundled: the bundled model is not there ({BUNDLED}); use --preset "
                    "tiny"
                )
            if name != "bundled" and name not in PRESETS:
                raise ValueError(f"--preset {name!r} is not one of {', '.join(PRESETS)}, bundled")

    for name, value, low in (
        ("--batch", args.batch, 1),
        ("--steps", args.steps, 1),
        ("--iters", args.iters, 1),
        ("--images", args.images, 0),
        ("--threads", args.threads, 1),
        ("--attention-slicing", args.attention_slicing, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for size in args.size or []:
        if size < 8 or size % 8:
            raise ValueError(
                f"--size {size}: image sizes must be positive multiples of 8 (the VAE's downscale)"
            )
    for name in models:  # presets: check the sizes before building anything
        if name in PRESETS:
            _check_sizes(name, PRESETS[name](), args.size or [])
    variants = (
        DEFAULT_VARIANTS[device.type]
        if args.variants is None
        else [v.strip() for v in args.variants.split(",")]
    )
    unknown = [v for v in variants if v not in ORDER]
    if unknown:
        raise ValueError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(ORDER)}"
        )
    on_gpu = device.type == "cuda"
    if args.max_memory is not None:
        if not on_gpu:
            raise ValueError("--max-memory applies to CUDA devices only")
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        if not 0 < args.max_memory <= total:
            raise ValueError(
                f"--max-memory must be in (0, {total:.1f}] GiB for this card, got {args.max_memory}"
            )
    compile_ = on_gpu if args.compile is None else args.compile
    graphs = on_gpu if args.cuda_graphs is None else args.cuda_graphs
    if graphs and not on_gpu:
        raise ValueError("--cuda-graphs needs a CUDA device (--device cuda)")
    if graphs and compile_ and args.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(
            f"--compile-mode {args.compile_mode} records CUDA graphs itself: add --no-cuda-graphs"
        )
    return dict(
        device=device,
        dtype=getattr(torch, dtype_name),
        models=models,
        sizes=args.size,
        variants=[v for v in ORDER if v in variants],
        compile=compile_,
        cuda_graphs=graphs,
        iters=args.iters or (20 if on_gpu else 3),
        images=args.images if args.images is not None else (3 if on_gpu else 2),
        unet=args.only != "image",
        image=args.only != "unet",
    )


def _check_sizes(name, config, sizes) -> None:
    multiple = 2 ** (len(config.vae.channel_mult) - 1) * 2 ** (len(config.unet.channel_mult) - 1)
    for size in sizes:
        if size % multiple:
            raise ValueError(
                f"--size {size}: {name} needs image sizes that are multiples of {multiple} "
                f"(VAE downscale × UNet downsamplings)"
            )


# ---------------------------------------------------------------- report
def _fmt(value, spec):
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| model | size | dtype | variant | UNet ms | UNet it/s | × counterpart | s/image | first "
        "image s | peak GiB | reserved GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = _ratio(rows, r)
        its = r.get("unet_its")
        lines.append(
            f"| {r['model']} | {r['size']}² | {r['dtype']} | {r['variant']} | "
            f"{_fmt(r.get('unet_ms'), '.2f')} "
            f"| {_fmt(its, '.1f' if its and its >= 10 else '.2f')} | {ratio} | "
            f"{_fmt(r.get('image_s'), '.3f')} "
            f"| {_fmt(r.get('first_image_s'), '.2f')} | {_fmt(r.get('peak_gib'), '.2f')} "
            f"| {_fmt(r.get('reserved_gib'), '.2f')} |"
            + (f" {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


def _find(rows, r, variant):
    return next(
        (
            o
            for o in rows
            if o["variant"] == variant
            and o["model"] == r["model"]
            and o["size"] == r["size"]
            and o["dtype"] == r["dtype"]
        ),
        None,
    )


def _counterpart(rows, r):
    """The diffusers row a minisd row is compared with (diffusers eager where nothing was compiled,
    as on the CPU)."""
    name = COUNTERPART.get(r["variant"], "")
    return _find(rows, r, name) or (
        _find(rows, r, "diffusers") if name in ("diffusers-compiled", "diffusers-recipe") else None
    )


def _ratio(rows, r) -> str:
    other = _counterpart(rows, r)
    if other is None or not r.get("unet_its") or not other.get("unet_its"):
        return "—"
    return f"{r['unet_its'] / other['unet_its']:.2f}× {other['variant']}"


def ratios(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        others = [_counterpart(rows, r)] + (
            [_find(rows, r, "diffusers-compiled"), _find(rows, r, "diffusers-compiled+cudnn")]
            if r["variant"] == "minisd-fast"
            else []
        )
        for other in others:
            if other is None or r.get("error") or other.get("error"):
                continue
            theirs = other["variant"]
            parts = []
            for key, label, higher_better in (
                ("unet_its", "UNet it/s", True),
                ("image_s", "s/image", False),
                ("peak_gib", "peak memory", False),
                ("reserved_gib", "reserved memory", False),
            ):
                if r.get(key) and other.get(key):
                    parts.append(f"{label} {r[key] / other[key]:.2f}×")
            lines.append(
                f"{r['model']} {r['size']}² {r['dtype']}: {r['variant']} / {theirs}: "
                + ", ".join(parts)
            )
    return lines


def header(settings) -> str:

    device = settings["device"]
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}"
    else:
        where = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    try:
        import diffusers  # here, not at the top: optional, only for the comparison

        versions = f"diffusers {diffusers.__version__}"
    except ImportError:
        versions = "diffusers not installed"
    cap = f"; memory capped at {settings['max_memory']:g} GiB" if settings.get("max_memory") else ""
    return (
        f"minisd bench on {where}; torch {torch.__version__}, {versions}; {settings['steps']} DDIM "
        "steps, "
        f"guidance 7.5, batch {settings['batch']} (UNet batch {2 * settings['batch']}); presets "
        "have random weights"
        + cap
    )


def main(args) -> int:
    settings = check_settings(args)
    options = (
        {name.strip(): True for name in args.compile_options.split(",")}
        if args.compile_options
        else None
    )
    settings.update(
        batch=args.batch,
        steps=args.steps,
        compile_mode=args.compile_mode,
        compile_options=options,
        max_memory=args.max_memory,
        attention_slicing=args.attention_slicing,
        tiled_decode=args.tiled_decode,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    wants_diffusers = any(v.startswith("diffusers") for v in settings["variants"])
    if wants_diffusers:
        try:
            # optional dependencies, needed only for the comparison: imported where used
            import diffusers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print(
                "diffusers/transformers are not installed: timing minisd only (pip install "
                "diffusers transformers)"
            )
            settings["variants"] = [
                v for v in settings["variants"] if not v.startswith("diffusers")
            ]
    device, dtype = settings["device"], settings["dtype"]
    if args.max_memory:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(
            args.max_memory * 2**30 / torch.cuda.get_device_properties(index).total_memory, index
        )
    print(header(settings), flush=True)
    warm_up(device, dtype)
    rows, failed = [], False
    for model_name in settings["models"]:
        try:
            sd = build_minisd(model_name, device, dtype)
        except torch.OutOfMemoryError:
            print(f"out of GPU memory while loading {model_name}. {MEMORY_HELP}", flush=True)
            return 1
        _check_sizes(model_name, sd.config, settings["sizes"] or [])
        for size in settings["sizes"] or [sd.config.image_size]:
            case = Case(
                Path(model_name).stem if Path(model_name).exists() else model_name,
                size,
                settings,
                sd,
            )
            for variant in settings["variants"]:
                if (
                    variant == "diffusers-compiled+cudnn"
                    and "diffusers-compiled" not in settings["variants"]
                ):
                    continue
                try:
                    row = run_variant(case, variant)
                except torch.OutOfMemoryError:
                    failed = True
                    row = dict(
                        model=case.name,
                        size=size,
                        dtype=str(dtype).replace("torch.", ""),
                        device=str(device),
                        variant=variant,
                        error="out of memory",
                    )
                    print(
                        f"{case.name} {size}² {variant}: out of GPU memory. {MEMORY_HELP}",
                        flush=True,
                    )
                    gc.collect()
                    torch.cuda.empty_cache()
                # one variant failing (a compiler error, say) must not lose the rest
                except Exception as error:
                    if os.environ.get("MINISD_TRACEBACK"):
                        raise
                    failed = True
                    first_line = (str(error).strip().splitlines() or [""])[0]
                    message = f"{type(error).__name__}: {first_line}"
                    row = dict(
                        model=case.name,
                        size=size,
                        dtype=str(dtype).replace("torch.", ""),
                        device=str(device),
                        variant=variant,
                        error=message[:300],
                    )
                rows.append(row)
                print(_progress(row), flush=True)
                if args.json:
                    Path(args.json).write_text(
                        json.dumps(dict(header=header(settings), rows=rows), indent=1)
                    )
            slow_down(sd)
            del case
            gc.collect()
        del sd
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(rows))
    print()
    print("\n".join(ratios(rows)))
    return 1 if failed else 0


def _progress(r: dict) -> str:
    if r.get("error"):
        return f"  {r['model']} {r['size']}² {r['variant']}: {r['error']}"
    checks = ", ".join(f"{k} {v:.2e}" for k, v in r.items() if "diff" in k or "err" in k)
    return (
        f"  {r['model']} {r['size']}² {r['dtype']} {r['variant']}: UNet "
        f"{_fmt(r.get('unet_ms'), '.2f')} ms, "
        f"{_fmt(r.get('image_s'), '.3f')} s/image, first {_fmt(r.get('first_image_s'), '.2f')} s, "
        f"peak {_fmt(r.get('peak_gib'), '.2f')} GiB" + (f" ({checks})" if checks else "")
    )
