"""Images in and out of the pipeline: PIL <-> tensors, init images and masks with clear errors, PNGs
with settings.

Conventions (the same as diffusers' VaeImageProcessor, so the pipelines agree pixel for pixel):
    PIL RGB, uint8 0…255   <->   tensor [B, 3, H, W] in [0, 1]   (x / 255 in; round(x · 255) out)
    the VAE reads and writes [-1, 1]:  v = 2x − 1,  x = clamp((v + 1) / 2, 0, 1)
    masks are greyscale and binarised: m = 1 where the pixel value ≥ 0.5 ("repaint"), 0 where it is
    kept.
A PNG written here carries the generation settings as JSON in a text chunk (`minisd`), and the
prompt on its own (`prompt`) for image viewers, so an image can be regenerated from its own file
(`read_png_settings`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .files import atomic_write

SETTINGS_KEY = "minisd"
ImageLike = Union[str, Path, Image.Image, torch.Tensor]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> list of B RGB PIL images."""
    array = (
        (images.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in array]


def _open(source: Union[str, Path], what: str) -> Image.Image:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        # A file that claims more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS, ~89 M) is refused
        # before it is decoded: a few kB of PNG can otherwise ask for gigabytes (a decompression
        # bomb). PIL only warns between 1× and 2× the limit: an error here too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"{what} {str(path)!r} is refused: {error} (raise PIL.Image.MAX_IMAGE_PIXELS in Python "
            "to read it anyway)"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable image file ({error})") from None


def load_image(
    source: ImageLike, size: tuple[int, int] | None = None, what: str = "init image"
) -> torch.Tensor:
    """A path, PIL image or tensor ([3, H, W] or [B, 3, H, W], values in [0, 1]) -> [B, 3, H, W]
    float32 in [0, 1].

    `size` = (height, width): resize to it (Lanczos, as diffusers does) when the image has another
    size.
    """
    if isinstance(source, (str, Path)):
        source = _open(source, what)
    if isinstance(source, Image.Image):
        if size is not None and (source.height, source.width) != tuple(size):
            source = source.convert("RGB").resize((size[1], size[0]), Image.LANCZOS)
        return pil_to_tensor(source)
    if not isinstance(source, torch.Tensor):
        raise TypeError(
            f"{what} must be a file path, a PIL image or a tensor, got {type(source).__name__}"
        )
    image = source.detach().float().cpu()
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(
            f"{what} tensor must have shape [3, H, W] or [B, 3, H, W], got {tuple(source.shape)}"
        )
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise ValueError(
            f"{what} tensor values must lie in [0, 1], got "
            f"{image.min().item():.3g} … {image.max().item():.3g}"
        )
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        image = torch.nn.functional.interpolate(
            image, size=tuple(size), mode="bicubic", antialias=True
        ).clamp(0, 1)
    return image


def load_mask(
    source: ImageLike, size: tuple[int, int] | None = None, what: str = "mask"
) -> torch.Tensor:
    """A path, PIL image or tensor ([H, W], [1, H, W] or [B, 1, H, W]) -> binary [B, 1, H, W]: 1 =
    repaint.

    A colour image is read as greyscale (PIL's 'L'). `size` resizes it first, like `load_image`.
    """
    if isinstance(source, (str, Path)):
        source = _open(source, what)
    if isinstance(source, Image.Image):
        grey = source.convert("L")
        if size is not None and (grey.height, grey.width) != tuple(size):
            grey = grey.resize((size[1], size[0]), Image.LANCZOS)
        mask = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    elif isinstance(source, torch.Tensor):
        mask = source.detach().float().cpu()
        mask = {2: mask[None, None], 3: mask[None], 4: mask}.get(mask.ndim)
        if mask is None or mask.shape[1] != 1:
            raise ValueError(
                f"{what} tensor must have shape [H, W], [1, H, W] or [B, 1, H, W], "
                f"got {tuple(source.shape)}"
            )
        if mask.numel() and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(
                f"{what} values must lie in [0, 1], got "
                f"{mask.min().item():.3g} … {mask.max().item():.3g}"
            )
        if size is not None and tuple(mask.shape[-2:]) != tuple(size):
            mask = torch.nn.functional.interpolate(
                mask, size=tuple(size), mode="bilinear", antialias=True
            )
    else:
        raise TypeError(
            f"{what} must be a file path, a PIL image or a tensor, got {type(source).__name__}"
        )
    return (mask >= 0.5).float()


def save_png(image: Image.Image, path: Union[str, Path], settings: dict) -> None:
    """Write `image` as a PNG with `settings` (JSON) and the prompt in its text chunks; atomic (tmp
    file + rename)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    if "prompt" in settings:
        info.add_text("prompt", str(settings["prompt"]))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_settings(path: Union[str, Path]) -> dict:
    """The settings `save_png` stored in a PNG (ValueError if the file has none)."""
    image = _open(path, "PNG file")
    text = getattr(image, "text", {}) or image.info
    if SETTINGS_KEY not in text:
        raise ValueError(
            f"{path} carries no minisd settings (it was not written by `python -m minisd generate`)"
        )
    try:
        return json.loads(text[SETTINGS_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(
            f"the minisd settings stored in {path} are not valid JSON ({error})"
        ) from None
