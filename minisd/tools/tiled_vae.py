"""Tiled VAE decoding: decode big images in overlapping pieces, so their activations never all sit
in memory at once.

Decoding a 1024² image runs the decoder's last levels on [B, 128, 1024, 1024] tensors (256 MiB each
in float16, several alive at a time). Tiling splits the latents into tiles of `tile_size`² latent
pixels that overlap their neighbours by `overlap`, decodes each tile, and blends the decoded tiles
where they overlap:

    image(p) = Σ_k w_k(p) · tile_k(p) / Σ_k w_k(p)

with w_k a product of two 1-D ramps that climb linearly from 0 to 1 across the middle half of the
overlap with each neighbour (and are 1 at the image border): the seams fade from one tile into the
next instead of showing an edge, and the pixels nearest a tile's edge, which its convolutions
computed from zero padding, get no weight at all.

Three things in the decoder look beyond a pixel's neighbourhood, and each is handled:
  - the middle block's attention (every pixel attends to every pixel): it runs at latent resolution,
    where it is small (128² × 512 channels for a 1024² image), so the middle block runs once on the
    whole latent, untiled;
  - 3×3 convolutions see only neighbours: the overlap gives each tile's centre the context it needs;
  - GroupNorm normalises with the mean and variance of the *whole* image. A tile alone would use its
    own, and that difference moves the output by several percent. So the tiles are swept `sweeps`
    times: every sweep measures each GroupNorm's statistics over all tiles (each tile counting only
    the pixels it owns), and the next sweep normalises every tile with those whole-image statistics;
    the last sweep draws the image. Sweep k gets the statistics of the first k GroupNorms exactly
    right, so the result is exact only after (number of GroupNorms + 1) sweeps; the default 2
    roughly halves the error of 1 at twice the compute. It stays an approximation, as every tiled
    decoder is: on random-weight test models the tiles differ from the plain decode by a few
    percent.
Given the exact whole-image statistics, tiles with enough overlap reproduce the plain decode to
float rounding (the tests check this), and a single tile that covers the image runs exactly the
plain decode's operations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_number, check_tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours sharing at least
    `overlap`."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    # the last tile ends at the border (it may overlap its neighbour more)
    return starts + [size - tile]


def ramp(length: int, overlap_before: int, overlap_after: int, device=None) -> torch.Tensor:
    """1-D blending weights over one tile: 0 → 1 across the middle half of the overlap with the
    previous tile, 1 → 0 across the middle half of the overlap with the next. The pixels nearest the
    tile's edges, which a convolution computed from zero padding instead of the neighbouring pixels,
    get no weight at all."""
    p = torch.arange(length, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(length, dtype=torch.float32, device=device)
    if overlap_before:
        w = w * ((p - overlap_before / 4) / (overlap_before / 2)).clamp(0.0, 1.0)
    if overlap_after:
        w = w * ((length - overlap_after / 4 - p) / (overlap_after / 2)).clamp(0.0, 1.0)
    return w


def _axis_tiles(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, own_start, own_end) per tile along one axis; the owned ranges split the overlaps
    at their middle."""
    starts = tile_starts(size, tile, overlap)
    ends = [min(s + tile, size) for s in starts]
    cuts = [0] + [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)] + [size]
    return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


class WholeImageGroupNorm:
    """Forward hooks that make the GroupNorms of tiled layers normalise with whole-image statistics.

    While a tile runs, `owned` holds the window (in latent pixels, relative to the tile) of the
    pixels that this tile owns, and `tile_hw` the tile's latent size; a layer at k× latent
    resolution scales both by k. Each hooked GroupNorm adds the sum and sum of squares of its owned
    input pixels, per (image, group), to `sums`; and once `finish_sweep` has turned the sums into
    means and variances, it normalises with those instead of its own.
    """

    def __init__(self, modules):
        self.norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
        self.sums: dict = {}
        self.stats: dict = {}
        self.owned = self.tile_hw = None
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self.hook) for m in self.norms]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def hook(self, norm: nn.GroupNorm, inputs, output):
        x = inputs[0]
        b, c, height, width = x.shape
        # this layer's resolution, in multiples of the latent's
        k = height // self.tile_hw[0]
        y0, y1, x0, x1 = (v * k for v in self.owned)
        own = x[:, :, y0:y1, x0:x1].float().reshape(b, norm.num_groups, -1)
        total = self.sums.setdefault(norm, [0.0, 0.0, 0])
        total[0] = total[0] + own.sum(-1)
        total[1] = total[1] + own.square().sum(-1)
        total[2] += own.shape[-1]
        if norm not in self.stats:
            # first sweep: keep the tile's own normalisation
            return None
        mean, var = self.stats[norm]
        groups = x.float().reshape(b, norm.num_groups, -1)
        normalised = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(
            x.shape
        )
        if norm.affine:
            normalised = normalised * norm.weight[:, None, None] + norm.bias[:, None, None]
        return normalised.to(output.dtype)

    def finish_sweep(self):
        for norm, (s, sq, n) in self.sums.items():
            mean = s / n
            self.stats[norm] = (mean, (sq / n - mean.square()).clamp(min=0.0))
        self.sums = {}


def decode_tiles(decoder, h, tiles, scale, norms: Optional[WholeImageGroupNorm]):
    """Run the decoder's levels and output layers on every tile of h; blend the tiles into one
    image."""
    image = None
    total_weight = torch.zeros(h.shape[-2] * scale, h.shape[-1] * scale, device=h.device)
    for ys, ye, y_own0, y_own1 in tiles[0]:
        for xs, xe, x_own0, x_own1 in tiles[1]:
            if norms is not None:
                norms.owned = (y_own0 - ys, y_own1 - ys, x_own0 - xs, x_own1 - xs)
                norms.tile_hw = (ye - ys, xe - xs)
            tile = h[:, :, ys:ye, xs:xe]
            for level in decoder.levels:  # the rest of Decoder.forward, on one tile
                tile = level(tile)
            tile = decoder.conv_out(F.silu(decoder.norm_out(tile)))
            if image is None:
                image = torch.zeros(h.shape[0], tile.shape[1], *total_weight.shape, device=h.device)
            wy = ramp(tile.shape[-2], *_blend_overlaps(tiles[0], ys, scale), device=h.device)
            wx = ramp(tile.shape[-1], *_blend_overlaps(tiles[1], xs, scale), device=h.device)
            w = wy[:, None] * wx[None, :]
            window = (slice(ys * scale, ye * scale), slice(xs * scale, xe * scale))
            image[(..., *window)] += tile.float() * w
            total_weight[window] += w
    return image / total_weight


def _blend_overlaps(axis_tiles, start: int, scale: int) -> tuple[int, int]:
    """Image pixels this tile shares with its previous and next neighbour (0 at the border)."""
    i = [t[0] for t in axis_tiles].index(start)
    before = (axis_tiles[i - 1][1] - start) * scale if i > 0 else 0
    after = (axis_tiles[i][1] - axis_tiles[i + 1][0]) * scale if i + 1 < len(axis_tiles) else 0
    return before, after


@torch.no_grad()
def tiled_decode(
    vae, latents: torch.Tensor, tile_size: int = 64, overlap: int = 32, sweeps: int = 2
) -> torch.Tensor:
    """Like `vae.decode(latents)` (unscaled latents [B, 4, h, w] -> images [B, 3, f·h, f·w]), one
    tile at a time.

    tile_size, overlap: in latent pixels (×8 for image pixels with the SD VAE); 64 and 32 decode a
    1024² image as 3 × 3 tiles of 512² pixels, each blended pixel at least 8 latents (64 pixels)
    from its tile's edge. sweeps ≥ 1: passes over the tiles (see the module docstring); 1 =
    tile-local GroupNorm statistics, the fastest and least exact.
    """
    check_tensor(
        "VAE decode latents", latents, 4, "[B, latent_channels, h, w]", vae.cfg.latent_channels
    )
    check_number("tile_size", tile_size, 1, integer=True)
    check_number("overlap", overlap, 0, integer=True)
    check_number("sweeps", sweeps, 1, integer=True)
    if overlap >= tile_size:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile_size ({tile_size})")
    decoder, scale = vae.decoder, vae.downscale
    # Whole latent, exactly as Decoder.forward begins: small at latent resolution, and global
    # (attention).
    h = decoder.middle(decoder.conv_in(vae.post_quant_conv(latents)))
    tiles = [_axis_tiles(size, tile_size, overlap) for size in latents.shape[-2:]]
    if len(tiles[0]) * len(tiles[1]) == 1:
        return decode_tiles(decoder, h, tiles, scale, None).to(latents.dtype)
    tiled_layers = [m for level in decoder.levels for m in level.modules()] + [decoder.norm_out]
    with WholeImageGroupNorm(tiled_layers) as norms:
        for _ in range(sweeps - 1):
            decode_tiles(decoder, h, tiles, scale, norms)
            norms.finish_sweep()
        return decode_tiles(decoder, h, tiles, scale, norms).to(latents.dtype)
