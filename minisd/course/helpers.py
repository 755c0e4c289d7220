"""Small helpers shared by the notebooks: compare against a reference, draw images or maps.

`cmp` follows the "check against the reference" habit of Karpathy's makemore lectures: after
building a piece by hand, compare it with the package's version and read one line:

    cmp("attention", mine, reference)
    attention: exact                                  every element equal (and the same shape)
    attention: approximate (max diff 3.1e-08)         |mine − reference| ≤ atol + rtol·|ref|
    attention: WRONG (max diff 0.42 at index (0, 3))  some element is outside that tolerance

`show_images` and `show_maps` draw small matplotlib grids (figures stay small so the committed
notebooks stay small). `repo_root()` is the checkout holding this minisd:
`repo_root() / "tests" / "fixtures"` works from notebooks/ and from chapters/NN_name/ alike (a path
like Path("..") / "tests" only works from one of them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["cmp", "max_diff", "repo_root", "show_images", "show_maps"]


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def repo_root() -> Path:
    """The folder that holds the minisd package (the repository root in a checkout), whatever the
    working folder."""
    return Path(__file__).resolve().parents[2]


def max_diff(mine, reference) -> tuple[float, tuple[int, ...]]:
    """Largest |mine − reference| (in float64) and the index where it occurs. Shapes must
    broadcast-match exactly."""
    a = _as_tensor(mine).to(torch.float64)
    b = _as_tensor(reference).to(torch.float64)
    diff = (a - b).abs()
    if diff.numel() == 0:
        return 0.0, ()
    diff = torch.where(torch.isnan(a) != torch.isnan(b), torch.full_like(diff, math.inf), diff)
    diff = torch.nan_to_num(diff, nan=0.0)  # both NaN at the same place counts as equal
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(diff.shape))) if diff.dim() else ()
    return float(diff.reshape(-1)[flat]), index


def _compare(mine, reference, atol: float, rtol: float) -> tuple[str, str, float]:
    """-> (verdict in {'exact', 'approximate', 'WRONG'}, detail text, max abs difference)."""
    if isinstance(reference, (list, tuple)) and not _is_numeric_sequence(reference):
        if not isinstance(mine, (list, tuple)):
            expected = f"a {type(reference).__name__} of {len(reference)}"
            return "WRONG", f"expected {expected}, got {type(mine).__name__}", math.inf
        if len(mine) != len(reference):
            return "WRONG", f"expected {len(reference)} items, got {len(mine)}", math.inf
        worst = 0.0
        for i, (m, r) in enumerate(zip(mine, reference)):
            verdict, detail, diff = _compare(m, r, atol, rtol)
            if verdict == "WRONG":
                return "WRONG", f"item {i}: {detail}", diff
            worst = max(worst, diff)
        return (
            ("exact", "", 0.0) if worst == 0.0 else ("approximate", f"max diff {worst:.2g}", worst)
        )
    if isinstance(reference, str) or isinstance(mine, str):
        return (
            ("exact", "", 0.0)
            if mine == reference
            else ("WRONG", f"expected {reference!r}, got {mine!r}", math.inf)
        )
    try:
        a, b = _as_tensor(mine), _as_tensor(reference)
    except (TypeError, ValueError, RuntimeError) as error:
        return "WRONG", f"cannot read {type(mine).__name__} as numbers ({error})", math.inf
    if tuple(a.shape) != tuple(b.shape):
        return "WRONG", f"expected shape {tuple(b.shape)}, got {tuple(a.shape)}", math.inf
    if a.is_complex() or b.is_complex():
        a, b = (
            torch.view_as_real(a.to(torch.complex128)),
            torch.view_as_real(b.to(torch.complex128)),
        )
    diff, index = max_diff(a, b)
    if diff == 0.0:
        return "exact", "", 0.0
    if torch.allclose(
        a.to(torch.float64), b.to(torch.float64), atol=atol, rtol=rtol, equal_nan=True
    ):
        return "approximate", f"max diff {diff:.2g}", diff
    where = f" at index {index}" if index else ""
    return "WRONG", f"max diff {diff:.2g}{where}", diff


def _is_numeric_sequence(x) -> bool:
    return all(isinstance(v, (int, float, bool)) for v in x)


def cmp(name: str, mine, reference, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """Print how `mine` compares with `reference` and return True when it is exact or approximately
    equal.

    Tensors, numpy arrays, numbers, and lists/tuples of these (compared item by item) are accepted;
    strings and lists of strings must be equal. Shapes must match exactly (no broadcasting: a [4]
    result is not a [1, 4] one).
    """
    verdict, detail, _ = _compare(mine, reference, atol, rtol)
    if verdict == "exact":
        print(f"{name}: exact")
    else:
        print(f"{name}: {verdict} ({detail})")
    return verdict != "WRONG"


def _to_hwc_images(images) -> list[np.ndarray]:
    """[B,3,H,W] / [3,H,W] / [B,1,H,W] / [B,H,W] tensor in [0,1], or a list of PIL images or such
    tensors -> HWC arrays."""
    if isinstance(images, (list, tuple)):
        out = []
        for image in images:
            out.extend(
                _to_hwc_images(image) if not _is_pil(image) else [np.asarray(image.convert("RGB"))]
            )
        return out
    if _is_pil(images):
        return [np.asarray(images.convert("RGB"))]
    x = _as_tensor(images).float()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None] if x.shape[0] in (1, 3) else x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            "show_images expects [B, 3, H, W] (or [B, 1, H, W], [3, H, W]) values in [0, 1] or a "
            "list of "
            f"PIL images, got a tensor of shape {tuple(_as_tensor(images).shape)}"
        )
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [a[..., 0] if a.shape[-1] == 1 else a for a in x]


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _grid(count: int, cols: int | None, size: float, titles):
    import matplotlib.pyplot as plt

    if titles is not None and len(titles) != count:
        raise ValueError(f"got {count} images but {len(titles)} titles")
    cols = max(1, min(cols or min(count, 8), count))
    rows = math.ceil(count / cols)
    width, height = min(10.0, size * cols), min(10.0, size * rows)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, height + (0.3 * rows if titles else 0)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def _finish(fig, show: bool):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if show:
        plt.show()
        return None
    return fig


def show_images(
    images,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    size: float = 2.0,
    show: bool = True,
):
    """Draw images in a grid.

    images: a tensor [B, 3, H, W] (or [3, H, W], [B, 1, H, W]) with values in [0, 1] — values
    outside are clipped; for the VAE's [-1, 1] range pass `(x + 1) / 2` — or a list of PIL images
    (or of such tensors).
    titles: one per image. cols: images per row (default: all in one row, up to 8). size: inches per
    image (the figure is capped at 10 inches wide). show=False returns the matplotlib Figure instead
    of showing it.
    """
    arrays = _to_hwc_images(images)
    fig, axes = _grid(len(arrays), cols, size, titles)
    for i, (ax, image) in enumerate(zip(axes, arrays)):
        ax.imshow(
            image,
            cmap="gray" if image.ndim == 2 else None,
            vmin=0,
            vmax=1 if image.dtype != np.uint8 else 255,
            interpolation="nearest",
        )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    return _finish(fig, show)


def show_maps(
    maps,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    size: float = 2.0,
    cmap: str = "viridis",
    shared_scale: bool = False,
    show: bool = True,
):
    """Draw 2-D maps (attention maps, latent channels, matrices) as heat maps in a grid.

    maps: a tensor [B, H, W] or [H, W], or a list of 2-D tensors/arrays. Each map gets its own
    colour scale unless shared_scale=True. Other arguments as in `show_images`.
    """
    if isinstance(maps, (list, tuple)):
        arrays = [_as_tensor(m).float().numpy() for m in maps]
    else:
        x = _as_tensor(maps).float()
        arrays = [x.numpy()] if x.dim() == 2 else [m.numpy() for m in x.reshape(-1, *x.shape[-2:])]
    for a in arrays:
        if a.ndim != 2:
            raise ValueError(f"show_maps expects 2-D maps, got one of shape {a.shape}")
    low = min(float(a.min()) for a in arrays) if shared_scale else None
    high = max(float(a.max()) for a in arrays) if shared_scale else None
    fig, axes = _grid(len(arrays), cols, size, titles)
    for i, (ax, a) in enumerate(zip(axes, arrays)):
        ax.imshow(a, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    return _finish(fig, show)
