"""Input checks shared by every module: fail early, at the module's entry, with what we expected
and what we got.

A wrong shape deep inside torch gives an error about matrix sizes that no reader can trace back to
their mistake; these checks name the argument, the expected layout or range and what actually
arrived. The one idiom for arguments: `check_number` (numbers and ranges), `check_choice` (one of
a few names), `check_tensor` / `check_divisible` (tensors). Each raises ValueError (TypeError for a
tensor argument that is not a tensor) with one line that the command line prints as is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_number(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    integer: bool = False,
    message: str = "",
) -> None:
    """Raise a ValueError unless `value` is a finite number (an int if `integer`) in [low, high].
    `message` is appended (e.g. what the bounds mean)."""
    kinds = (int,) if integer else (int, float)
    extra = f" ({message})" if message else ""
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        what = "an integer" if integer else "a number"
        bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
        raise ValueError(f"{name} must be {what}{bounds}{extra}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bounds = f">= {low}"
        elif low is None:
            bounds = f"<= {high}"
        else:
            bounds = f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}{extra}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )


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
            f"{name} must have {channels} channels in dim {channel_dim} ({layout}), "
            f"got shape {tuple(x.shape)}"
        )


def check_divisible(name: str, x: torch.Tensor, factor: int) -> None:
    """Spatial sizes must survive `factor`-fold downsampling and come back to the same size for the
    skip connections."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{name} height and width must be multiples of {factor}, got {h}x{w}")
