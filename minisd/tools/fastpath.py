"""The fast path: switches that make the same modules compute the same function faster, or in less
memory.

Nothing here changes the mathematics of a module; each switch changes *how* the GPU (or CPU) is
asked to do it:

    attention="fused"    softmax(QKᵀ/√d)V in one kernel (torch's scaled_dot_product_attention, flash
                         attention on recent GPUs): the [tokens × tokens] matrix is never stored.
    channels_last        convolution weights and activations stored as [B, H, W, C] (NHWC), the
                         layout the tensor cores read; the transformer's "b c h w -> b (h w) c" then
                         becomes a view, not a copy.
    dtype                float16 / bfloat16: half the bytes per number, and the tensor cores' fast
                         arithmetic.
    compile              torch.compile the UNet's and the VAE decoder's forward: GroupNorm + SiLU,
                         the GEGLU gate, the residual adds ... become a few generated kernels
                         instead of one pass over memory each.
    cuda_graphs          record the UNet's kernel launches once per input shape and replay the
                         recording: one launch per denoising step instead of hundreds. The loop
                         calls the UNet with the same shapes every step, which is what makes a
                         recording reusable.
                         The VAE decoder's call is recorded too (with compile), in the same
                         memory pool: the decoder's activations reuse the memory the UNet's
                         recording used, so the card holds max(UNet, decoder) scratch, not the sum.
    fuse_projections     attention's W_q, W_k, W_v become row blocks of one matrix (views: the
                         same memory), so x [W_q; W_k; W_v]ᵀ is one matrix product, not three
                         (cross-attention: c [W_k; W_v]ᵀ). Same numbers up to summation order.
    cudnn_benchmark      let cuDNN time its convolution algorithms once per shape and keep the
                         fastest.
    attention_slicing    (memory) the math path builds the score matrix for a few (batch, head) rows
                         at a time.
    tiled_decode         (memory) decode the latents in overlapping tiles (tiled_vae.py): the VAE's
                         big activations are made one tile at a time (SD 1, 1024², float16: peak 4.4
                         → 3.4 GiB on an H100).

How the switches are applied without forking a module: `speed_up` sets the *instance* attribute
`forward` of `sd.unet` (and `sd.vae.decoder`, `sd.vae.decode`) to a compiled / graph-replaying
version of the same method. The classes stay as they are, the state dict and parameter names do not
change, and `slow_down(sd)` removes the instance attributes so the readable methods run again. Apply
it after moving the model to its device and dtype (`speed_up` can do the move): a CUDA graph records
the addresses of the weights it reads.

    sd = minisd.load("model.safetensors", device="cuda", dtype=torch.float16)
    speed_up(sd, compile=True, cuda_graphs=True)       # then sd.generate(...) as usual
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .tiled_vae import tiled_decode
from ..attention import attention_layers, set_attention_backend
from ..checks import check_number

# recordings kept per model (one per input shape); each holds its own activation memory
CUDA_GRAPH_CACHE = 4


@dataclass
class FastPath:
    """The switches, as applied to one model by `speed_up` (kept on the model as `sd.fast_path`)."""

    attention: str = "fused"  # "fused" or "math" (the readable einsum/softmax path)
    channels_last: bool = True
    dtype: Optional[torch.dtype] = None  # None: keep the model's dtype
    device: Optional[str] = None  # None: keep the model's device
    compile: bool = False
    # torch.compile mode: None (default), "max-autotune", ...
    compile_mode: Optional[str] = None
    # or Inductor options instead of a mode, e.g. {"conv_1x1_as_mm": True}
    compile_options: Optional[dict] = None
    compile_decoder: bool = True  # with compile=True, also compile the VAE decoder
    cuda_graphs: bool = False
    fuse_projections: bool = True
    cudnn_benchmark: bool = True
    # (batch·head) rows at a time on the math path; None: all at once
    attention_slicing: Optional[int] = None
    tiled_decode: bool = False
    # latent pixels per tile side (64 latents = 512 image pixels for SD)
    tile_size: int = 64
    # latent pixels shared by neighbouring tiles (tiled_vae.py)
    tile_overlap: int = 32
    # passes over the tiles for whole-image GroupNorm statistics
    tile_sweeps: int = 2

    def describe(self) -> str:
        """A short label of the switches that are on, e.g.
        'fused+channels_last+compile+cuda_graphs'."""
        on = [self.attention]
        if self.attention_slicing:
            on.append(f"slicing{self.attention_slicing}")
        on += [
            name
            for name in (
                "fuse_projections", "channels_last", "compile", "cuda_graphs", "tiled_decode"
            )
            if getattr(self, name)
        ]
        return "+".join(on)


class GraphPool:
    """The memory pool that a model's recordings share (torch.cuda.graph's `pool`). Sharing is safe
    here because the recordings never run at the same time and each call copies its output out
    before the next replay can overwrite it."""

    def __init__(self):
        self.handle = None


class CUDAGraphCall:
    """Replays one recorded call of `function(*inputs)` (tensors) for inputs of the recorded
    shapes.

    A CUDA graph is a recording of kernel launches with fixed memory addresses. So the inputs are
    copied into buffers that the recording reads (`static_inputs`), the recording is replayed, and
    the output buffer it wrote is copied out. Inputs of another shape or dtype get a recording of
    their own (up to CUDA_GRAPH_CACHE of them).
    """

    def __init__(self, function: Callable, weights_probe: torch.Tensor, pool: GraphPool = None):
        self.function = function
        # a parameter: if its storage moves, the recordings are stale
        self.weights_probe = weights_probe
        self.probe_address = weights_probe.data_ptr()
        self.recordings: dict = {}
        # one memory pool shared by all recordings of this model
        self.pool = pool if pool is not None else GraphPool()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if (
            torch.is_grad_enabled()
            or x.device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()
        ):
            # training, CPU, or inside someone else's capture
            return self.function(*inputs)
        if self.weights_probe.data_ptr() != self.probe_address:
            self.recordings.clear()  # the model was moved: record again
            self.probe_address = self.weights_probe.data_ptr()
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self.recordings:
            if len(self.recordings) >= CUDA_GRAPH_CACHE:
                self.recordings.pop(next(iter(self.recordings)))
            self.recordings[key] = self._record(inputs)
        static_inputs, graph, static_output = self.recordings[key]
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return static_output.clone()  # the next replay (of any recording) overwrites static_output

    def _record(self, inputs):
        static_inputs = tuple(t.clone() for t in inputs)
        # Warm up on a side stream first: torch.compile, cuDNN's algorithm search and the allocator
        # must have done their one-time work before recording (none of it may happen inside a
        # capture).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.function(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle):
            static_output = self.function(*static_inputs)
        self.pool.handle = graph.pool()
        return static_inputs, graph, static_output


class UNetGraphCall(CUDAGraphCall):
    """CUDAGraphCall for the UNet's (x, timesteps, context): timesteps may come as a number."""

    def __call__(self, x: torch.Tensor, timesteps, context: torch.Tensor) -> torch.Tensor:
        return super().__call__(x, torch.as_tensor(timesteps, device=x.device), context)


def fuse_projections(modules) -> None:
    """Fuse every attention layer's projections (Attention.fuse_projections): x [W_q; W_k; W_v]ᵀ
    as one matrix product, the parameters views of the fused matrix."""
    for layer in attention_layers(modules):
        if layer.fused_weight is None:
            layer.fuse_projections()


def unfuse_projections(modules) -> None:
    """Undo fuse_projections: each projection gets its own memory again."""
    for layer in attention_layers(modules):
        layer.unfuse_projections()


def _check_switches(fast: FastPath, sd) -> None:
    if fast.attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {fast.attention!r}")
    if fast.dtype is not None and fast.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {fast.dtype}"
        )
    options = fast.compile_options or {}
    if fast.cuda_graphs and (
        fast.compile_mode in ("reduce-overhead", "max-autotune") or options.get("triton.cudagraphs")
    ):
        raise ValueError(
            f"compile mode {fast.compile_mode or options!r} records CUDA graphs itself: give "
            "cuda_graphs=False with it (two recordings of one call cannot nest)"
        )
    device = torch.device(fast.device) if fast.device is not None else sd.device
    if fast.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}")
    check_number("tile_size", fast.tile_size, 1, integer=True)
    check_number("tile_overlap", fast.tile_overlap, 0, integer=True)
    if fast.compile_mode is not None and fast.compile_options:
        raise ValueError(
            "give compile_mode or compile_options, not both (torch.compile takes one of them)"
        )
    if fast.tile_overlap >= fast.tile_size:
        raise ValueError(
            f"tile_overlap ({fast.tile_overlap}) must be smaller than tile_size ({fast.tile_size})"
        )


def speed_up(sd, fast: Optional[FastPath] = None, **switches) -> FastPath:
    """Apply the fast-path switches to `sd` (a StableDiffusion) in place; returns the FastPath
    applied.

        speed_up(sd)                                            # fused attention + channels_last
        speed_up(sd, dtype=torch.float16, compile=True, cuda_graphs=True)
        speed_up(sd, attention="math", attention_slicing=4, tiled_decode=True)   # small GPUs

    Everything but cudnn.benchmark (a switch of torch itself, process-wide) belongs to `sd`: the
    attention backend and slicing are set on its own Attention layers, so other models keep theirs.
    """
    if fast is None:
        fast = FastPath(**switches)
    elif switches:
        fast = dataclasses.replace(fast, **switches)
    _check_switches(fast, sd)
    slow_down(sd)

    if fast.device is not None or fast.dtype is not None:
        sd.to(device=fast.device, dtype=fast.dtype)
    set_attention_backend(sd, fast.attention, fast.attention_slicing)
    if sd.device.type == "cuda" and fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if fast.channels_last:
        # Only the convolutional networks: the text encoder has no images. `.to(memory_format=...)`
        # restrides the 4-D weights; the activations follow, since a convolution returns the layout
        # of its weight.
        sd.unet.to(memory_format=torch.channels_last)
        sd.vae.to(memory_format=torch.channels_last)

    if fast.fuse_projections:
        fuse_projections(sd)

    unet_forward = sd.unet.forward  # the readable method, bound to this instance
    decoder_forward = None
    if fast.compile:
        settings = dict(mode=fast.compile_mode, options=fast.compile_options)
        unet_forward = torch.compile(unet_forward, **settings)
        if fast.compile_decoder:
            decoder_forward = torch.compile(sd.vae.decoder.forward, **settings)
    if fast.cuda_graphs:
        pool = GraphPool()  # the UNet's and the decoder's recordings share one pool
        unet_forward = UNetGraphCall(unet_forward, next(sd.unet.parameters()), pool)
        if decoder_forward is not None:
            decoder_forward = CUDAGraphCall(decoder_forward, sd.vae.decoder.conv_in.weight, pool)
    if fast.compile or fast.cuda_graphs:
        sd.unet.forward = unet_forward
    if decoder_forward is not None:
        sd.vae.decoder.forward = decoder_forward
    if fast.tiled_decode:
        sd.vae.decode = functools.partial(
            tiled_decode,
            sd.vae,
            tile_size=fast.tile_size,
            overlap=fast.tile_overlap,
            sweeps=fast.tile_sweeps,
        )
    sd.fast_path = fast
    return fast


def slow_down(sd) -> None:
    """Undo `speed_up`: the readable methods, the math attention path, contiguous weights
    (dtype/device stay)."""
    for module in (sd.unet, sd.vae.decoder, sd.vae):
        for name in ("forward", "decode"):
            # instance attributes only: the class methods come back
            module.__dict__.pop(name, None)
    if getattr(sd, "fast_path", None) is not None:
        set_attention_backend(sd, "math", None)
        unfuse_projections(sd)
        if sd.fast_path.channels_last:
            sd.unet.to(memory_format=torch.contiguous_format)
            sd.vae.to(memory_format=torch.contiguous_format)
    sd.fast_path = None
