"""The minisd file format, and the one place where weights go into a model.

A minisd file is a safetensors file with the weights under `text_encoder.`, `unet.` and `vae.` and
the `SDConfig` as JSON in the file's metadata (under FORMAT_KEY), so loading needs nothing but the
file. Tensors that the official checkpoints carry but minisd does not use (OpenCLIP's text
projection, the stored schedule buffers, ...) live under `extra.` so that converting back gives the
original file bit for bit.

`from_state_dict` is the only function that puts a state dict into a StableDiffusion, and
`check_fits` the only check of its keys (missing, unexpected, wrong shape), reported by
`errors.check_keys`: the minisd loader, the official and diffusers converters and the trainers all
go through them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from safetensors.torch import save_file

from ..config import SDConfig
from ..files import atomic_write
from ..model import StableDiffusion
from .errors import check_keys

FORMAT_KEY = "minisd_config"  # the metadata entry holding the SDConfig as JSON
PARTS = ("text_encoder", "unet", "vae")
EXTRA = "extra."


@contextlib.contextmanager
def shapes_only():
    """Build modules on the meta device (shapes, no memory) and skip their random init:
    nn.Embedding's normal_ on meta tensors makes torch import torch._dynamo, seconds spent for
    values that are replaced anyway."""
    reset = torch.nn.Embedding.reset_parameters
    torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.Embedding.reset_parameters = reset


def shapes_of(model: StableDiffusion) -> dict[str, tuple]:
    """{minisd key: shape} of every tensor `model` holds."""
    return {
        f"{part}.{k}": tuple(v.shape)
        for part in PARTS
        for k, v in getattr(model, part).state_dict().items()
    }


def expected_shapes(config: SDConfig) -> dict[str, tuple]:
    """{minisd key: shape} of every tensor a model of `config` holds (built on the meta device)."""
    with shapes_only():
        return shapes_of(StableDiffusion(config))


def check_fits(
    source: str,
    expected: dict[str, tuple],
    tensors: dict[str, torch.Tensor],
    unexpected: Iterable[str] = (),
    display: Optional[Callable[[str], str]] = None,
) -> None:
    """Raise a ConversionError unless `tensors` (extras aside) has exactly the keys and shapes of
    `expected`. `unexpected`: keys already found not to belong (a converter's unmapped names);
    `display` names keys as the user's file does (the official names, for a checkpoint)."""
    display = display or (lambda key: key)
    given = {k for k in tensors if not k.startswith(EXTRA)}
    mismatched = [
        (display(k), expected[k], tuple(tensors[k].shape))
        for k in sorted(given & set(expected))
        if tuple(tensors[k].shape) != expected[k]
    ]
    check_keys(
        source,
        sorted({display(k) for k in set(expected) - given}),
        sorted(set(unexpected) | {display(k) for k in given - set(expected)}),
        mismatched,
    )


def from_state_dict(
    config: SDConfig, tensors: dict[str, torch.Tensor], source: str = "weights"
) -> StableDiffusion:
    """Build a float32 model from minisd-named tensors (`unet.…`, `vae.…`, `text_encoder.…`, and
    `extra.…` kept aside), with one clear error listing missing/unexpected/mis-shaped keys."""
    with shapes_only():  # no random init of weights that are about to be replaced
        sd = StableDiffusion(config)
    check_fits(source, shapes_of(sd), tensors)
    for part in PARTS:
        prefix = f"{part}."
        getattr(sd, part).load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)},
            assign=True,
        )
    sd.extras = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return sd.eval()


def state_dict_for_file(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    """The tensors of a minisd file: every part's state dict under its prefix, and the extras."""
    tensors = {
        f"{part}.{k}": v for part in PARTS for k, v in getattr(sd, part).state_dict().items()
    }
    tensors.update({f"{EXTRA}{k}": v for k, v in sd.extras.items()})
    return {k: _own_memory(v.detach().contiguous().cpu()) for k, v in tensors.items()}


def _own_memory(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it if t is a view into a larger tensor (the fast path's fused attention
    projections are): safetensors writes each tensor's own memory and refuses shared storage."""
    own_bytes = t.numel() * t.element_size()
    return t if t.untyped_storage().nbytes() == own_bytes else t.clone()


def write_file(path: Union[str, Path], tensors: dict[str, torch.Tensor], config: SDConfig) -> None:
    """Write minisd-named tensors and their config as a minisd file (atomically)."""
    metadata = {FORMAT_KEY: config.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save(sd: StableDiffusion, path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> None:
    """Write `sd` as a minisd safetensors file (optionally cast to `dtype`, e.g. torch.float16)."""
    tensors = state_dict_for_file(sd)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    write_file(path, tensors, sd.config)
