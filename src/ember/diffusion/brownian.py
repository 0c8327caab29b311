"""Brownian motion that is a pure function of (seed, t): noise for SDE samplers.

An SDE sampler that draws fresh noise at each step gives a different image for every step count:
the noise depends on where the steps fall. Drawing each step's noise as an increment of one
Brownian path W instead (as k-diffusion and A1111 do for DPM++ SDE) makes the image converge as
the steps increase, and keeps the two noises inside a step correctly correlated.

`BrownianTree` is a virtual Brownian tree (Li et al. 2020, "Scalable Gradients for Stochastic
Differential Equations", section 4): W on [0, t1] is never stored. To find W(t) it bisects
[0, t1] from the root, drawing each midpoint from the Brownian bridge between the interval's ends
with a seed derived from the node's position in the tree, until the interval is narrower than
`tol * t1`; inside that last interval it takes the bridge's mean. So W(t) depends only on the seed
and t, not on which other points were asked for, or in which order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class BrownianTree:
    """W(t) for t in [0, t1] with W(0) = 0, of a fixed shape, from one integer seed."""

    def __init__(self, seed: int, shape: Sequence[int], t1: float, *, tol: float = 1e-6):
        if not t1 > 0:
            raise ValueError(f"a Brownian tree needs t1 > 0, got {t1}")
        self.seed, self.shape, self.t1 = seed & _MASK, tuple(shape), float(t1)
        self.min_width = tol * self.t1
        self._cache: dict[float, torch.Tensor] = {}

    def _normal(self, node: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed ^ _mix(node)) & ((1 << 63) - 1))
        return torch.randn(self.shape, generator=g, dtype=torch.float32)

    def __call__(self, t: float) -> torch.Tensor:
        """W(t), float32 on the CPU."""
        t = min(max(float(t), 0.0), self.t1)
        if t in self._cache:
            return self._cache[t]
        a, b = 0.0, self.t1
        wa = torch.zeros(self.shape)
        wb = self._normal(0) * math.sqrt(self.t1)
        node = 1
        while b - a > self.min_width and t not in (a, b):
            m = (a + b) / 2
            # the bridge at the midpoint: mean (wa + wb) / 2, variance (b - a) / 4
            wm = (wa + wb) / 2 + self._normal(node) * (math.sqrt(b - a) / 2)
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        w = wa if t == a else wb if t == b else wa + (wb - wa) * ((t - a) / (b - a))
        self._cache[t] = w
        return w


class BrownianNoise:
    """Unit-variance noise for the step from sigma to sigma_next: (W(sigma) - W(sigma_next)) /
    sqrt(sigma - sigma_next), one Brownian path per image.

    With a list of generators (one per image) each image gets its own tree, seeded from its
    generator, so an image is the same alone or in a batch; with one generator (or none) the
    whole batch shares one seed, as `draw_noise` draws a batch from one generator.
    """

    def __init__(self, x: torch.Tensor, sigma_max: float, generator=None):
        self.device, self.dtype = x.device, x.dtype
        self.batched = isinstance(generator, Sequence)
        gens, shape = (generator, x.shape[1:]) if self.batched else ([generator], x.shape)
        self.trees = [BrownianTree(_seed_from(g), shape, sigma_max) for g in gens]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        s, s_next = float(sigma), float(sigma_next)
        parts = [tree(s) - tree(s_next) for tree in self.trees]
        w = torch.stack(parts) if self.batched else parts[0]
        return (w / math.sqrt(abs(s - s_next))).to(device=self.device, dtype=self.dtype)


def _seed_from(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from `generator` (the global RNG if None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
