"""DeepCache (Ma, Fang & Wang 2024, "DeepCache: Accelerating Diffusion Models for Free"): reuse
the U-Net's deep features across neighbouring sampling steps.

From one step to the next the U-Net's high-level features barely change (the temporal redundancy
the paper measures), while the skip connections of its shallowest blocks carry what does. So every
N-th call (the paper's uniform 1:N strategy) runs the whole network and keeps the feature
its decoder's outermost blocks take from below ("the main branch"); the calls in between run only
the shallowest encoder blocks ("the skip branch"), the decoder's outermost blocks fed by that
cached feature, and the output layer. The first call is always a full one.

Which branch: the reference implementation's default for SD 1.5 and SDXL alike
(`cache_layer_id=0, cache_block_id=0`), in ldm's names: the skip branch is `input_blocks[0]` (the
input convolution) and `input_blocks[1]` (the first ResBlock, with its transformer where it has
one); the cached feature is the decoder's `h` entering `output_blocks[-2]`, so a cached call runs
`output_blocks[-2:]` and `out`: 22% of the SD 1.5 U-Net's FLOPs at 512x512 (three transformers
over 4096 tokens), 4% of SDXL's at 1024x1024 (no transformer at that level), 14% of ember-small's.

A `DeepCacheUNet` holds the cache of one sampling run: build one per run, never share one between
runs (the server's requests each get their own, so the loaded model holds nothing). It counts U-Net
calls, not sampler steps: a sampler that calls the denoiser twice per step (heun, dpm2) counts
both, and an SDXL refiner that takes over builds its own, whose first call is full again.
"""

from __future__ import annotations

import torch
from torch import nn

# How many encoder blocks after the input convolution run in every call (the reference's branch 0,
# counted from the input convolution's own block).
SKIP_BRANCH = 1


class DeepCacheUNet:
    """`unet` (an ldm `UNetModel`) with DeepCache at `interval` N: a callable with the U-Net's
    signature `(x, t, context, y=None) -> (B, C, H, W)`.

    Calls of different shapes keep their own cache and count: when a step's conditional and
    unconditional passes run as two calls (prompts of different token lengths), each reuses its own
    features, never the other's. `interval` 1 runs the full network every call.
    """

    def __init__(self, unet: nn.Module, interval: int, branch: int = SKIP_BRANCH) -> None:
        if interval < 1:
            raise ValueError(f"DeepCache interval {interval} must be at least 1")
        if not 1 <= branch <= len(unet.output_blocks) - 2:
            raise ValueError(f"DeepCache branch {branch} does not fit this U-Net")
        self.unet, self.interval, self.branch = unet, interval, branch
        self._calls: dict[tuple, int] = {}
        self._deep: dict[tuple, torch.Tensor] = {}

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        key = (tuple(x.shape), tuple(context.shape), x.dtype)
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        if n % self.interval == 0 or key not in self._deep:
            return self._full(key, x, t, context, y)
        return self._shallow(self._deep[key], x, t, context, y)

    def _full(self, key: tuple, x, t, context, y) -> torch.Tensor:
        """The whole network, keeping the feature that leaves `output_blocks[-branch - 2]`."""

        def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self._deep[key] = out

        if self.interval == 1:
            return self.unet(x, t, context, y)
        handle = self.unet.output_blocks[-self.branch - 2].register_forward_hook(keep)
        try:
            return self.unet(x, t, context, y)
        finally:
            handle.remove()

    def _shallow(self, deep: torch.Tensor, x, t, context, y) -> torch.Tensor:
        """The skip branch and the decoder's outermost blocks on the cached deep feature: the
        U-Net's own forward pass (`UNetModel.forward`) with the blocks in between left out."""
        unet = self.unet
        emb = unet.embedding(t, y, x.shape[0], x.dtype)
        skips = []
        h = x
        for block in unet.input_blocks[: self.branch + 1]:
            h = block(h, emb, context)
            skips.append(h)
        h = deep
        for block in unet.output_blocks[len(unet.output_blocks) - self.branch - 1 :]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return unet.out(h)
