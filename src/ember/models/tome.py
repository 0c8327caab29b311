"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"), an add-on hooked onto a loaded U-Net for one call and taken off again.

Self-attention over the N positions of a latent map costs O(N^2), and neighbouring positions are
often nearly the same. In the transformer blocks of the U-Net's highest-resolution level, before
self-attention (`attn1`), r = ratio * N tokens are merged away by bipartite soft matching (from
ToMe for ViTs, Bolya et al. 2023, "Token Merging: Your ViT but Faster"), with the SD paper's random
2D partition: one random token per 2x2 window is a destination, the others are sources; each
source is paired with the destination whose token is most similar (cosine similarity of the
block's input), and the r best-matched sources are averaged into their destinations.
Self-attention runs on the N - r tokens left; afterwards each merged source takes its
destination's output (the SD paper's "unmerging"). Cross-attention and the feed-forward layers
see every token: the reference implementation's (tomesd) defaults, `merge_attn=True,
merge_crossattn=False, merge_mlp=False, sx=sy=2`.

Where this differs from tomesd, and why:
- **Which level.** tomesd's default `max_downsample=1` merges only at the latent's own resolution;
  a U-Net without attention there (SDXL, ember's own models) would merge nothing. ember merges at
  the highest-resolution level that has transformer blocks: the latent's own for SD 1.x/2.x (so
  tomesd's default there), half of it for SDXL and ember-small.
- **Its randomness.** tomesd forks torch's global generator. Here the destinations of one U-Net
  call are drawn from a generator seeded by the call's timestep (`token_merging`), so the same seed
  and settings give the same image, an image does not depend on its batch-mates (every row of a
  call shares the draw; the matching itself is per row), and a step's conditional and
  unconditional passes share one partition even when they run as two calls (tomesd turns the
  randomness off for odd batches, where they cannot share one call, because mismatched partitions
  leave artifacts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ember.models.layers import Downsample, SpatialTransformer, Upsample

# One destination per WINDOW x WINDOW block of tokens (tomesd's sx = sy = 2): at most
# 1 - 1/WINDOW^2 of the tokens can be merged away (a larger ratio merges that many).
WINDOW = 2

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_soft_matching_2d(
    metric: torch.Tensor, h: int, w: int, r: int, generator: torch.Generator
) -> tuple[Merge, Merge]:
    """(merge, unmerge) for the tokens of an h x w map, r of them merged away.

    `metric` (B, N = h*w, C): the tokens compared (cosine similarity), row-major. `merge` maps
    (B, N, C') -> (B, N - r, C'), averaging each merged source into its destination; `unmerge` maps
    (B, N - r, C') back to (B, N, C'), each merged source taking its destination's value. Each row
    of the batch is matched on its own; the destinations (one per 2x2 window, uniformly at random
    from `generator`) are shared by the rows. Rows and columns beyond the last whole window stay
    sources, as in tomesd.
    """
    b, n, _ = metric.shape
    hw, ww = h // WINDOW, w // WINDOW
    if r <= 0 or hw * ww == 0:
        return _identity, _identity
    with torch.no_grad():
        pick = torch.randint(WINDOW * WINDOW, (hw, ww, 1), generator=generator)  # (hw, ww, 1)
        window = torch.zeros(hw, ww, WINDOW * WINDOW, dtype=torch.bool).scatter_(2, pick, True)
        is_dst = torch.zeros(h, w, dtype=torch.bool)
        is_dst[: hw * WINDOW, : ww * WINDOW] = (
            window.view(hw, ww, WINDOW, WINDOW).transpose(1, 2).reshape(hw * WINDOW, ww * WINDOW)
        )
        is_dst = is_dst.flatten().to(metric.device)  # (N,)
        dst_pos = is_dst.nonzero().squeeze(1)  # (D,) token positions of the destinations
        src_pos = (~is_dst).nonzero().squeeze(1)  # (S,) and of the sources
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)  # (B, S, D)
        r = min(r, src_pos.numel())
        best, match = scores.max(dim=-1)  # (B, S): each source's best destination
        order = best.argsort(dim=-1, descending=True, stable=True)  # (B, S)
        merged, kept = order[:, :r], order[:, r:]  # indices into the sources
        into = match.gather(1, merged)  # (B, r): indices into the destinations

    def expand(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_pos], x[:, dst_pos]  # (B, S, C), (B, D, C)
        moving = src.gather(1, expand(merged, c))  # (B, r, C)
        dst = dst.scatter_reduce(1, expand(into, c), moving, reduce="mean")
        return torch.cat([src.gather(1, expand(kept, c)), dst], dim=1)  # (B, N - r, C)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c, k = y.shape[-1], kept.shape[1]
        unm, dst = y[:, :k], y[:, k:]  # (B, S - r, C), (B, D, C)
        src = y.new_empty(b, src_pos.numel(), c)
        src = src.scatter(1, expand(kept, c), unm)
        src = src.scatter(1, expand(merged, c), dst.gather(1, expand(into, c)))
        out = y.new_empty(b, n, c)
        out[:, src_pos] = src
        out[:, dst_pos] = dst
        return out

    return merge, unmerge


def transformers_by_level(unet: nn.Module) -> dict[int, list[SpatialTransformer]]:
    """An ldm `UNetModel`'s SpatialTransformers by downsampling factor (1: the latent's own
    resolution), encoder, middle and decoder alike, in forward order."""
    levels: dict[int, list[SpatialTransformer]] = {}
    ds = 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                levels.setdefault(ds, []).append(layer)
            elif isinstance(layer, Downsample):
                ds *= 2
            elif isinstance(layer, Upsample):
                ds //= 2
    return levels


class TokenMerging:
    """ToMe's hooks on a U-Net (see the module docstring); `remove()` takes every one off again.

    Per top-level SpatialTransformer a pre-hook notes its map's (H, W); per transformer block a
    pre-hook matches the block's input tokens, and `attn1`'s pre- and post-hooks merge its input
    and unmerge its output. The model's code and weights are untouched.
    """

    def __init__(self, unet: nn.Module, ratio: float, generator: torch.Generator) -> None:
        self.ratio, self.generator = ratio, generator
        self._hw = (0, 0)
        self._merge: Merge = _identity
        self._unmerge: Merge = _identity
        self._handles = []
        levels = transformers_by_level(unet)
        for st in levels[min(levels)] if levels else []:
            self._handles.append(st.register_forward_pre_hook(self._note_size))
            for block in st.transformer_blocks:
                self._handles += [
                    block.register_forward_pre_hook(self._match),
                    block.attn1.register_forward_pre_hook(self._merge_input),
                    block.attn1.register_forward_hook(self._unmerge_output),
                ]

    def _note_size(self, module: nn.Module, args: tuple) -> None:
        self._hw = tuple(args[0].shape[-2:])  # (B, C, H, W) -> (H, W)

    def _match(self, module: nn.Module, args: tuple) -> None:
        x = args[0]  # (B, N, C): the block's input is the similarity metric
        self._merge, self._unmerge = bipartite_soft_matching_2d(
            x, *self._hw, int(x.shape[1] * self.ratio), self.generator
        )

    def _merge_input(self, module: nn.Module, args: tuple) -> tuple:
        return (self._merge(args[0]), *args[1:])

    def _unmerge_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return self._unmerge(out)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_token_merging(unet: nn.Module, ratio: float, seed: int) -> TokenMerging:
    """Hook ToMe onto `unet` with its destinations drawn from a CPU generator seeded `seed`;
    `.remove()` on the result restores the plain network."""
    return TokenMerging(unet, ratio, torch.Generator("cpu").manual_seed(seed))


@contextmanager
def token_merging(unet: nn.Module, ratio: float, t: torch.Tensor) -> Iterator[None]:
    """ToMe on `unet` while the block runs one U-Net call at timestep(s) `t`; ratio 0 hooks
    nothing, so the call is exactly the plain network's. The random destinations are seeded by the
    timestep, so the calls of one step share them and the same settings draw them again."""
    if ratio <= 0:
        yield
        return
    handle = apply_token_merging(unet, ratio, round(float(t.max()) * 1000))
    try:
        yield
    finally:
        handle.remove()
