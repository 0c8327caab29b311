"""Layout guidance: steer where named objects go by the U-Net's own cross-attention maps.

Backward guidance of Chen, Laina & Vedaldi 2023 ("Training-Free Layout Control with Cross-Attention
Guidance", section 3.3): for each object there is a box and the prompt tokens that name it; the
energy `E = sum_i (1 - sum_{box_i} A_i / sum A_i)^2` over the cross-attention map `A_i` of those
tokens is small when each object's attention lies in its box. During the early, high-noise steps,
where the layout is decided, the x0 prediction is moved down `grad E` (taken w.r.t. the latent).

A small U-Net can draw two named objects yet ignore the relation word between them (for ember's
bundled model the denoising loss is the same under the converse relation, docs/training.md), while
its last cross-attention maps already say where each object is being drawn. So "a red circle left
of a blue square" gets the boxes "left half" and "right half" from the prompt
(`ember.prompts.layout_from_prompt`) and the guidance enforces them. Counts are laid out too: a
model that has learnt to put three or four objects in distinct quadrants tends to fill all four
when asked for three, so "three red squares" gets a `Count` whose energy empties the quadrant the
squares' attention fills least. The maps are read through `CrossAttention.register_weights_hook`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ember.diffusion.denoisers import Conditioning, Denoiser, per_image_sigma
from ember.models.layers import CrossAttention

# (x0, y0, x1, y1) as fractions of the image's width and height, x1 and y1 exclusive
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """An object to place: the context positions of the tokens that name it, and its box."""

    tokens: tuple[int, ...]
    box: Box

    def energy(self, a: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(1 - share of the attention `a` (h*w,), summing to 1, inside the box)^2."""
        return (1 - (a * box_mask(self.box, h, w).to(a)).sum()) ** 2


@dataclass(frozen=True)
class Count:
    """`n` objects named by the same tokens ("three red squares"), one to a quadrant.

    Their energy asks for the attention of those tokens to leave `4 - n` quadrants empty, whichever
    they are, and to reach into the others: the quadrants the U-Net is already filling least are the
    ones pushed to empty, so the layout it has started on is kept where it can be.
    """

    tokens: tuple[int, ...]
    n: int

    def energy(self, a: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return count_energy(a, self.n, h, w)


# The quadrants a `Count`'s objects go to, one each.
_QUADRANTS = [(x, y, x + 0.5, y + 0.5) for y in (0.0, 0.5) for x in (0.0, 0.5)]


def box_mask(box: Box, h: int, w: int) -> torch.Tensor:
    """(h*w,) 1 where a cell's centre lies in `box`, else 0."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    inside_y = (ys >= y0) & (ys < y1)
    inside_x = (xs >= x0) & (xs < x1)
    return (inside_y[:, None] & inside_x[None, :]).flatten().float()


def layout_energy(
    probs: torch.Tensor, regions: Sequence[Region | Count], h: int, w: int
) -> torch.Tensor:
    """The energy of one map: small when every region's attention is where its layout wants it.

    `probs`: (h*w, L) cross-attention weights of one image at one layer; each region's tokens'
    attention, as shares of 1, goes to its own `energy` (`Region.energy`, `count_energy`).
    """
    energy = probs.new_zeros(())
    for region in regions:
        a = probs[:, list(region.tokens)].sum(-1)  # (h*w,)
        energy = energy + region.energy(a / a.sum().clamp_min(1e-12), h, w)
    return energy


def count_energy(a: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(h*w,) attention shares summing to 1 -> energy of `n` objects in `n` of the 4 quadrants.

    The `4 - n` quadrants with the least attention should hold none (their share, squared), and
    each of the other `n` at least half of an even share (the shortfall, squared).
    """
    masks = torch.stack([box_mask(q, h, w) for q in _QUADRANTS]).to(a)  # (4, h*w)
    ordered = (masks @ a).sort().values
    empty = ordered[: 4 - n].sum() ** 2
    filled = (0.5 / n - ordered[4 - n :]).clamp_min(0).square().sum()
    return empty + filled


def guided_layers(unet: nn.Module, count: int = 3) -> list[CrossAttention]:
    """The last `count` cross-attention layers of the U-Net's decoder, in forward order.

    Three is the decoder's last attention level in ember-small and SD 1.x alike. The last layers
    locate the objects being drawn: in the bundled model, the side of one named shape's attention
    centroid relative to the other's matches the finished image for 82% (first steps) to 94% (last
    steps) of images at the last layer; the one before rises from chance to 81% over the steps; the
    others are near chance (`bench/layout_attention.py`).
    """
    cross = [
        m
        for name, m in unet.named_modules()
        if name.endswith("attn2") and isinstance(m, CrossAttention)
    ]
    if not cross:
        raise ValueError("layout guidance needs a U-Net with cross-attention layers")
    return cross[-count:]


class ForwardDone(Exception):
    """Raised by `record_attention(..., stop=True)` once its last layer is read."""


@contextmanager
def record_attention(
    layers: Sequence[CrossAttention], *, stop: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's (B, N, L) attention weights, in call order, while the block runs.

    With `stop`, the forward pass ends (quietly) right after the last of `layers` has been read:
    guidance needs nothing the U-Net computes after it.
    """
    maps: list[torch.Tensor] = []

    def record(probs: torch.Tensor) -> None:  # (B, heads, N, L)
        maps.append(probs.mean(1))

    def record_last(probs: torch.Tensor) -> None:
        record(probs)
        if stop:
            raise ForwardDone

    hooks = [layer.register_weights_hook(record) for layer in layers[:-1]]
    hooks.append(layers[-1].register_weights_hook(record_last))
    try:
        yield maps
    except ForwardDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()


class LayoutGuidedDenoiser:
    """Wrap a (CFG) denoiser so that, above `sigma_stop`, images with regions are steered to them.

    For each guided call, a forward pass of the conditional branch over the images that have
    regions, stopped after the last guided layer, and its backward pass give `grad E` with respect
    to the latent; scaled to an RMS of 1 per image, `strength` times it is subtracted from the x0
    prediction, as classifier guidance subtracts an energy's gradient (Dhariwal & Nichol 2021).
    Chen et al. move the latent itself; a denoiser cannot move the sampler's `x`, and moving the
    prediction instead steered as well in a paired test (docs/training.md, "Layout guidance").
    `cond_denoiser` is the unguided single-branch denoiser inside `inner`, `latent_hw` the latent's
    (H, W) to place the attention maps on.
    """

    def __init__(
        self,
        inner: Denoiser,
        cond_denoiser: Denoiser,
        layers: Sequence[CrossAttention],
        regions: Sequence[Sequence[Region]],
        *,
        strength: float,
        sigma_stop: float,
        latent_hw: tuple[int, int],
    ):
        if strength < 0:
            raise ValueError(f"layout guidance strength must be >= 0, got {strength}")
        self.inner = inner
        self.cond_denoiser = cond_denoiser
        self.layers = list(layers)
        self.regions = [list(r) for r in regions]
        self.strength = strength
        self.sigma_stop = sigma_stop
        self.latent_hw = latent_hw

    def energy_grad(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """grad of the layout energy w.r.t. x, per image scaled to RMS 1 (0 for images without)."""
        grad = torch.zeros_like(x)
        idx = [i for i, r in enumerate(self.regions) if r]
        if not idx:
            return grad
        sub = Conditioning(
            cond.context[idx], None, None if cond.concat is None else cond.concat[idx],
            None if cond.vector is None else cond.vector[idx],
        )  # fmt: skip
        with torch.enable_grad():
            xg = x[idx].detach().requires_grad_()
            with record_attention(self.layers, stop=True) as maps:
                self.cond_denoiser(xg, sigma[idx], sub)
            energy = xg.new_zeros(())
            for probs in maps:  # (len(idx), N, L)
                h, w = _map_hw(probs.shape[1], self.latent_hw)
                for row, i in enumerate(idx):
                    energy = energy + layout_energy(probs[row], self.regions[i], h, w)
            (g,) = torch.autograd.grad(energy, xg)
        rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt()
        grad[idx] = (g / rms.clamp_min(1e-12)).to(grad.dtype)
        return grad

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = per_image_sigma(sigma, x)  # (B,)
        if self.strength == 0 or float(sigma.max()) <= self.sigma_stop:
            return self.inner(x, sigma, cond)
        return self.inner(x, sigma, cond) - self.strength * self.energy_grad(x, sigma, cond)


def _map_hw(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention map with n positions at the latent's aspect ratio."""
    lh, lw = latent_hw
    for factor in (1, 2, 4, 8, 16, 32, 64):
        if lh % factor == 0 and lw % factor == 0 and (lh // factor) * (lw // factor) == n:
            return lh // factor, lw // factor
    raise ValueError(f"cannot place an attention map of {n} positions on a {lh}x{lw} latent")
