"""Tiled VAE decoding and encoding (issue 37): memory bounded by the tile at any image size.

What a user relies on: a tiled image is the whole decode up to each tile's group norms and
attention (the seams are blended, not cut); `--vae-tiling off` and `auto` below its threshold give
exactly the pixels of the untiled decode; `auto` tiles where memory is short and the record says
so, so that `--from` makes the same pixels on a machine with more memory; and tiling does bound
the decoder's activations (checked on the maps it makes, so it cannot pass by falling back).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ember import pipeline
from ember.checkpoints import load_model
from ember.cli import main
from ember.config import TINY_VAE
from ember.errors import EmberError
from ember.models import vae_tiling
from ember.models.taesd import TAESDConfig, TinyAutoencoder
from ember.models.vae import AutoencoderKL
from ember.settings import GenerationParams

GRID = (37, 53)  # latent (h, w): non-square, not a multiple of the tile, 2 x 3 tiles of 24
TILE, OVERLAP = 24, 8


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB over images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


def snr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB of `b`'s variance over the error of `a`: for latents, which have no fixed range."""
    return float(10 * torch.log10(b.var() / (a - b).pow(2).mean()))


def tiny_vaes() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    taesd = TAESDConfig(encoder_channels=(8,) * 4, decoder_channels=(8,) * 4)
    return {"kl": AutoencoderKL(TINY_VAE).eval(), "taesd": TinyAutoencoder(taesd).eval()}


def test_tiles_cover_the_grid_and_blend_to_exactly_one():
    """With a function that sees no context (nearest upsampling, average pooling), the tiled
    result is the whole one: every pixel covered, every tile in place, the weights summing to 1."""

    def up(t):  # like decoding: 8x larger
        return F.interpolate(t, scale_factor=8.0) * 3 - 1

    def down(t):  # like encoding: 8x smaller
        return F.avg_pool2d(t, 8)

    z = torch.randn(2, 4, *GRID)
    assert torch.allclose(vae_tiling.run_tiled(up, z, GRID, 1, 8, TILE, OVERLAP), up(z), atol=1e-5)
    x = torch.randn(1, 3, GRID[0] * 8, GRID[1] * 8)
    assert torch.allclose(vae_tiling.run_tiled(down, x, GRID, 8, 1, TILE, OVERLAP), down(x))
    spans = vae_tiling.tile_spans(GRID[1], TILE, OVERLAP)
    assert len(spans) == 3 and len({b - a for a, b in spans}) == 1  # equal tiles, none thin
    assert all(a[1] - b[0] >= OVERLAP for a, b in zip(spans, spans[1:], strict=False))


# The tiny random VAEs' tiled decode, measured over seeds 0-2: the KL VAE 31-34 dB (each tile's
# group norms see only the tile), TAESD 72-88 dB (no norms: only zero padding at tile edges);
# the same tiles without overlap (hard seams) 23 dB and 50-69 dB. The floors sit between.
DECODE_FLOOR = {"kl": 28.0, "taesd": 60.0}
# Their tiled encodings' moments (signal over error): 19-20 dB and 36-42 dB; hard seams 9-10 and
# 18-24 dB.
ENCODE_FLOOR = {"kl": 16.0, "taesd": 30.0}


@pytest.mark.parametrize("kind", ["kl", "taesd"])
@torch.no_grad()
def test_tiled_decode_is_close_to_the_whole_decode(kind):
    vae = tiny_vaes()[kind]
    z = torch.randn(1, 4, *GRID)
    whole = vae.decode(z)
    tiled = vae_tiling.decode_tiled(vae, z, TILE, OVERLAP)
    assert tiled.shape == whole.shape and tiled.dtype == torch.float32
    assert psnr(tiled, whole) >= DECODE_FLOOR[kind]
    seams = vae_tiling.decode_tiled(vae, z, TILE, 0)  # blending is what closes the gap
    assert psnr(tiled, whole) >= psnr(seams, whole) + 5


@pytest.mark.parametrize("kind", ["kl", "taesd"])
@torch.no_grad()
def test_tiled_encode_is_close_to_the_whole_encode(kind):
    vae = tiny_vaes()[kind]
    f = vae.cfg.downsample
    x = F.avg_pool2d(torch.rand(1, 3, GRID[0] * f, GRID[1] * f) * 2 - 1, 3, 1, 1)
    whole = vae.encode(x)
    tiled = vae_tiling.encode_tiled(vae, x, TILE, OVERLAP)
    assert type(tiled) is type(whole) and tiled.moments.dtype == x.dtype
    assert snr(tiled.moments, whole.moments) >= ENCODE_FLOOR[kind]
    seams = vae_tiling.encode_tiled(vae, x, TILE, 0)
    assert snr(tiled.moments, whole.moments) >= snr(seams.moments, whole.moments) + 5
    # img2img's draw: the same noise from the same seed
    a = tiled.sample(torch.Generator().manual_seed(1))
    b = whole.sample(torch.Generator().manual_seed(1))
    assert snr(a, b) >= ENCODE_FLOOR[kind]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return load_model(tiny_model_file, dtype=torch.float32)


PARAMS = GenerationParams("a red circle", steps=2, seed=3, width=64, height=48)


def _small_tiles(monkeypatch) -> int:
    """Tiles of 8 latent pixels (16 image pixels for the tiny VAE): a 64x48 image is 5 x 4 of
    them; returns the tile's side in image pixels."""
    monkeypatch.setattr(vae_tiling, "TILE", 8)
    monkeypatch.setattr(vae_tiling, "OVERLAP", 2)
    return 8 * TINY_VAE.downsample


def test_off_auto_and_one_tile_give_the_untiled_pixels(tiny):
    """`auto` at a size that fits is "off", and "on" for an image within one tile is the whole
    decode: all three exactly the pixels of today's decode (tests/test_same_images.py holds them
    to pixels from before tiling existed)."""
    assert pipeline.resolve_vae_tiling(tiny, PARAMS).vae_tiling == "off"
    images = {
        mode: pipeline.generate(tiny, dataclasses.replace(PARAMS, vae_tiling=mode))
        for mode in ("off", "auto", "on")
    }
    assert torch.equal(images["off"], images["auto"])
    assert torch.equal(images["off"], images["on"])


def _map_sizes(module: torch.nn.Module) -> tuple[list[tuple[int, int]], list]:
    """Record the (H, W) of every output of `module`'s submodules while it runs."""
    sizes: list[tuple[int, int]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
             for m in module.modules() if m is not module]  # fmt: skip
    return sizes, hooks


def test_tiling_bounds_the_largest_map_the_vae_makes(tiny, monkeypatch):
    """`auto` where memory is short: the record says "on", and neither the decoder nor the
    img2img encoder ever makes a map larger than a tile."""
    side = _small_tiles(monkeypatch)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2**20)
    params = pipeline.resolve_vae_tiling(tiny, PARAMS)
    assert params.vae_tiling == "on"
    vae = tiny.model.first_stage_model
    decoded, hooks = _map_sizes(vae.decoder)
    encoded, more = _map_sizes(vae.encoder)
    init = torch.rand(1, 3, PARAMS.height, PARAMS.width)
    image = pipeline.generate(tiny, params, pipeline.Inputs(init_image=init))
    for hook in hooks + more:
        hook.remove()
    assert image.shape[-2:] == (48, 64)
    for sizes in (decoded, encoded):
        assert sizes and max(h for h, _ in sizes) <= side and max(w for _, w in sizes) <= side
    whole = pipeline.generate(tiny, dataclasses.replace(params, vae_tiling="off"),
                              pipeline.Inputs(init_image=init))  # fmt: skip
    assert 25 <= psnr(image * 2 - 1, whole * 2 - 1) < 100  # close, and tiling did run


def test_off_where_the_whole_decode_cannot_fit_is_one_clear_error(tiny, monkeypatch):
    from ember import device

    monkeypatch.setattr(device, "available_memory", lambda: 2**10)
    off = dataclasses.replace(PARAMS, vae_tiling="off")
    with pytest.raises(EmberError, match="decoding 64x48 whole .--vae-tiling on bounds it. needs"):
        pipeline.resolve_vae_tiling(tiny, off)


def test_a_batch_that_does_not_fit_decodes_image_by_image(tiny, monkeypatch):
    z = torch.randn(2, 4, 16, 24)
    whole = pipeline.decode_latents(tiny, z)
    batches, hooks = [], [tiny.model.first_stage_model.decoder.register_forward_hook(
        lambda m, i, o: batches.append(i[0].shape[0]))]  # fmt: skip
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2**20)
    one_by_one = pipeline.decode_latents(tiny, z)
    hooks[0].remove()
    assert batches == [1, 1]
    assert torch.allclose(one_by_one, whole, atol=1e-5)


def test_previews_of_tiled_requests_in_two_prompt_groups(tiny_model_file, monkeypatch):
    """Requests whose prompts encode to different lengths sample as separate groups; their
    previews decode tiled, and each request's record says so."""
    from ember.service import GenerationService, Request

    _small_tiles(monkeypatch)
    service = GenerationService("fp32")
    service.load(tiny_model_file)
    on = dataclasses.replace(PARAMS, vae_tiling="on")
    long = dataclasses.replace(on, prompt=" ".join(["a red circle"] * 30))  # over 77 tokens
    previews = []
    out = service.generate([Request(on), Request(long)], lambda i, n, p: previews.append(p),
                           preview_every=1)  # fmt: skip
    assert [p is not None for p in previews] == [True, False, True, False]  # each group's steps
    assert [images[0].record.params.vae_tiling for images in out] == ["on", "on"]


def _record(path) -> dict:
    return json.loads(Image.open(path).text["ember"])["params"]


def test_cli_flag_record_and_from_make_the_same_pixels(tmp_path, tiny_model_file, monkeypatch):
    """`auto` on a machine short of memory tiles and records "on"; `--from` on a machine with
    plenty repeats the tiled pixels; `--vae-tiling off` reaches the record too."""
    _small_tiles(monkeypatch)
    base = ["generate", "a red circle", "--model", str(tiny_model_file), "--steps", "1",
            "--seed", "3", "--size", "64x48", "-q", "--no-credentials"]  # fmt: skip
    short, off, again = (tmp_path / f"{name}.png" for name in ("short", "off", "again"))
    with monkeypatch.context() as small_machine:
        small_machine.setattr(pipeline, "available_memory", lambda: 2**20)
        assert main([*base, "-o", str(short)]) == 0  # --vae-tiling auto, the default
    assert main([*base, "--vae-tiling", "off", "-o", str(off)]) == 0
    assert main(["generate", "--from", str(short), "-q", "--no-credentials", "-o", str(again)]) == 0
    assert [_record(p)["vae_tiling"] for p in (short, off, again)] == ["on", "off", "on"]
    pixels = [np.asarray(Image.open(p)) for p in (short, off, again)]
    assert (pixels[2] == pixels[0]).all() and (pixels[0] != pixels[1]).any()
