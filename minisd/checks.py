"""Input checks shared by every module: fail early, at the module's entry, with the shape we
expected and the one we got.

A wrong shape deep inside torch gives an error about matrix sizes that no reader can trace back to
their mistake; these checks name the module, the argument, the expected layout and what actually
arrived.
"""
from __future__ import annotations

import torch


def check_tensor(
    name: str, x, ndim: int, layout: str, channels: int | None = None, channel_dim: int = 1
) -> None:
    """Raise a ValueError unless `x` is a tensor with `ndim` dims (and `channels` along
    `channel_dim`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(
            f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(
            f"{name} must have {channels} channels in dim {channel_dim} ({layout}), got shape {tuple(x.shape)}"
        )


def check_divisible(name: str, x: torch.Tensor, factor: int) -> None:
    """Spatial sizes must survive `factor`-fold downsampling and come back to the same size for the
    skip connections."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{name} height and width must be multiples of {factor}, got {h}x{w}")
