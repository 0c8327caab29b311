"""Tiled VAE decoding and encoding: memory bounded by the tile, not by the image.

The SD decoder's peak memory grows with the image: about three maps of its widest full-resolution
level (256 channels) are alive at once, 3 GiB in fp32 at 1024x1024 and 12 GiB at 2048x2048
(bench/vae_tiling.py). Tiling, as diffusers' `AutoencoderKL.tiled_decode` / `tiled_encode` and
ComfyUI's `VAEDecodeTiled` do it: cut the latent into overlapping tiles, run the network on each,
and cross-fade neighbouring tiles linearly over their overlap, so that no seam is a hard edge. Each
tile's group norms and mid-block attention see only that tile, so a tiled image differs slightly
from the whole decode (tests/test_vae_tiling.py bounds the difference).

Unlike diffusers, the tiles are all of one size and as few as fit (`tile_spans`): no thin tile at
the right or bottom edge, whose group-norm statistics would come from a sliver of the image, and
no more overlap work than needed. Works on any autoencoder with ember's interface (`decode(z)`,
`encode(x)` returning a posterior with `moments`, `cfg.downsample`, `map_channels`): the KL VAE
and TAESD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# The largest tile and the least overlap, in latent pixels: 768 and 128 image pixels with SD's 8x
# VAE. diffusers tiles SD at 64 (512 pixels); 96 came out 1.8 dB closer to the whole decode
# (bench/vae_tiling.py, the bundled model's VAE) with less overlap work, and bounds SD's decoder
# at about 1.9 GiB in fp32 and 0.9 GiB in bf16 (`peak_bytes`).
TILE = 96
OVERLAP = 16
# Maps of the decoder's largest size alive at its peak (a ResnetBlock's input, its group norm and
# SiLU): measured 3.0 for SD's decoder in fp32, 3.3 in bf16, 3.1 for TAESD's (bench/vae_tiling.py).
LIVE_MAPS = 3.3


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the fewest equal tiles of at most `tile` that cover range(size) with
    neighbours sharing at least `overlap`; one span (the whole) when `size <= tile`."""
    assert tile >= 3 * overlap and tile > overlap >= 0, (tile, overlap)
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)  # <= tile
    starts = [i * (size - length) // (n - 1) for i in range(n)]  # spread evenly, last at the end
    spans = [(s, s + length) for s in starts]
    # each point in at most two tiles, so that two ramps make every blend (`_ramps`)
    assert all(spans[i][1] <= spans[i + 2][0] for i in range(n - 2)), (size, tile, overlap)
    return spans


def _ramps(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per span, the 1-D blending weight of its `scale`-times larger output: a linear ramp up over
    the overlap with the previous span, down over the one with the next, 1 elsewhere. Where two
    spans overlap their weights sum to 1, so the blended image needs no normalising."""
    out = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale)
        if i > 0:
            n = (spans[i - 1][1] - start) * scale
            w[:n] = (torch.arange(n) + 0.5) / n
        if i < len(spans) - 1:
            n = (end - spans[i + 1][0]) * scale
            w[len(w) - n :] *= (n - 0.5 - torch.arange(n)) / n
        out.append(w)
    return out


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: tuple[int, int],
    scale_in: int,
    scale_out: int,
    tile: int,
    overlap: int,
) -> torch.Tensor:
    """`fn` over overlapping tiles of `x`, blended -> float32.

    `grid` is the (h, w) latent grid the tiles are cut on, `tile` and `overlap` are in its units;
    `x` is `scale_in` times and `fn`'s output `scale_out` times that size (decoding: 1 and the
    VAE's factor; encoding: the reverse).
    """
    h, w = grid
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    row_w, col_w = _ramps(rows, scale_out), _ramps(cols, scale_out)
    out = None
    for (y0, y1), wy in zip(rows, row_w, strict=True):
        for (x0, x1), wx in zip(cols, col_w, strict=True):
            piece = fn(x[..., y0 * scale_in : y1 * scale_in, x0 * scale_in : x1 * scale_in])
            if out is None:  # (B, C, h * scale_out, w * scale_out)
                out = torch.zeros(*piece.shape[:2], h * scale_out, w * scale_out)
            region = out[..., y0 * scale_out : y1 * scale_out, x0 * scale_out : x1 * scale_out]
            region += piece.float() * (wy[:, None] * wx[None, :])
    assert out is not None
    return out


def decode_tiled(
    vae: nn.Module, z: torch.Tensor, tile: int | None = None, overlap: int | None = None
) -> torch.Tensor:
    """`vae.decode(z)` in tiles of at most `tile` latent pixels (default `TILE`) overlapping by at
    least `overlap` (default `OVERLAP`) -> float32 pixels in about [-1, 1]."""
    tile, overlap = _sizes(tile, overlap)
    return run_tiled(vae.decode, z, z.shape[-2:], 1, vae.cfg.downsample, tile, overlap)


def encode_tiled(
    vae: nn.Module, x: torch.Tensor, tile: int | None = None, overlap: int | None = None
):
    """`vae.encode(x)` in tiles as `decode_tiled` cuts them: the posterior of the blended moments
    (the KL VAE's mean and log variance, TAESD's latents), in `x`'s dtype."""
    f = vae.cfg.downsample
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"VAE input size {tuple(x.shape[-2:])} must be a multiple of {f}")
    posterior = None

    def moments(piece: torch.Tensor) -> torch.Tensor:
        nonlocal posterior
        posterior = vae.encode(piece)
        return posterior.moments

    grid = (x.shape[-2] // f, x.shape[-1] // f)
    blended = run_tiled(moments, x, grid, f, 1, *_sizes(tile, overlap))
    return type(posterior)(blended.to(x.dtype))


def _sizes(tile: int | None, overlap: int | None) -> tuple[int, int]:
    # read at call time, so that tests can make the tiles small
    return TILE if tile is None else tile, OVERLAP if overlap is None else overlap


def peak_bytes(vae: nn.Module, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated activation memory of decoding one `height` x `width` image whole: `LIVE_MAPS`
    maps of the decoder's largest size (`vae.map_channels`). Encoding takes no more (measured:
    2/3 of it for SD's VAE, as much for TAESD's)."""
    return int(LIVE_MAPS * vae.map_channels * height * width * torch.finfo(dtype).bits // 8)
