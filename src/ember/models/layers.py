"""Building blocks of the latent-diffusion U-Net (Rombach et al. 2022, CompVis ldm).

Submodule names follow ldm's `openaimodel.py` and `attention.py` exactly, so the state dict of a
module built here has the keys of an original Stable Diffusion single-file checkpoint.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ember.models.prepack import Conv2d, Linear


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cosines first.

    As ldm's `timestep_embedding` (Vaswani et al. 2017, section 3.5); equals diffusers'
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`. Computed in float32 because
    fp16 cannot resolve t * freq for t near 1000.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


SMALL_MAP = 16 * 16  # GroupNorm makes channels-last maps of at most this many pixels contiguous


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype, as ldm's `GroupNorm32`.

    The affine parameters are upcast too, so a model cast wholesale to fp16/bf16 still works.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            if x.shape[-1] * x.shape[-2] <= SMALL_MAP:
                # oneDNN hands back channels-last maps; on bf16 maps of <= 16x16 pixels the CPU
                # kernel is 1.2-20x slower on those than a contiguous copy plus the norm, while on
                # larger maps it is faster (bench/groupnorm_layout.py). fp32 shows no such gap.
                x = x.contiguous()  # a no-op when it already is
            # The CPU kernel takes bf16 input with fp32 affine and keeps its statistics in fp32:
            # the same result as upcasting (to within the final bf16 rounding) without the two
            # full-size copies, which cost 14x the norm itself on the VAE's 128x256x256 maps.
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int, groups: int, eps: float = 1e-5) -> GroupNorm32:
    """ldm's `normalization` (eps 1e-5, U-Net ResBlocks); `Normalize` in ldm uses eps 1e-6."""
    return GroupNorm32(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: ldm initialises each residual branch's last layer to zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ldm `ResBlock` (use_scale_shift_norm=False): GN-SiLU-conv, + time embedding, GN-SiLU-conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels, groups),
            nn.SiLU(),
            Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(0.0),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), emb (B, E)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        return conv.fused(drop(act(norm(h))), add=self.skip_connection(x))  # skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (ldm `Downsample`, use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (ldm `Upsample`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Largest query x key length for which training takes the explicit attention path (see `sdpa`).
SMALL_ATTENTION = 128 * 128


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, h, N, d) tensors.

    Fused SDPA, except when gradients are needed and the score matrix is small: the CPU flash
    kernel's backward is several times slower than plain matmuls there (ember-small trains ~1.3x
    faster per step; `bench/train_step.py`). The softmax runs in float32 either way.
    """
    if not (torch.is_grad_enabled() and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)
    return attention_weights(q, k).to(v.dtype) @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: (B, h, N, d), (B, h, L, d) -> (B, h, N, L)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float().softmax(-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    weights_hooks: Sequence[Callable[[torch.Tensor], None]] = (),
) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v on (B, N, heads*d) tensors -> (B, N, heads*d).

    With `weights_hooks`, the attention weights are formed explicitly, as (B, heads, N, L) float32
    through which gradients flow, and handed to each hook before they weigh `v`; without, the
    fused kernel runs and the weights never exist.
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (B, h, N, d)
    if not weights_hooks:
        out = sdpa(q, k, v)
    else:
        probs = attention_weights(q, k)  # (B, h, N, L)
        for hook in weights_hooks:
            hook(probs)
        out = probs.to(v.dtype) @ v
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """ldm `CrossAttention`: queries from x, keys/values from `context` (x itself when None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self._weights_hooks: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(0.0))

    def register_weights_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Have `hook(weights)` called with each forward's (B, heads, N, L) attention weights.

        As torch's `register_forward_hook`, but for a tensor no forward hook sees: while any hook
        is registered this layer forms its weights explicitly instead of in the fused kernel.
        `handle.remove()` detaches the hook again. A hook may raise to end the forward pass.
        """
        handle = RemovableHandle(self._weights_hooks)
        self._weights_hooks[handle.id] = hook
        return handle

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, query_dim), context (B, L, context_dim) -> (B, N, query_dim); with `residual`
        (B, N, query_dim), residual + that, the sum fused into the output projection."""
        context = x if context is None else context
        out = attention(
            self.to_q(x),
            self.to_k(context),
            self.to_v(context),
            self.heads,
            tuple(self._weights_hooks.values()),
        )
        return self.to_out[1](self.to_out[0].fused(out, add=residual))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear to 2*dim_out, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj.fusable(x):
            # Two GEMMs, the GELU fused into the gate's and the product into the value's: the
            # separate GELU and product passes cost more than the GEMMs' split does.
            n = self.proj.out_features // 2
            gate = self.proj.fused(x, rows=(n, 2 * n), gelu=True)
            return self.proj.fused(x, rows=(0, n), mul=gate)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm `FeedForward(glu=True, mult=4)`: keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), Linear(inner, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `residual`, residual + the output, the sum fused into the last projection."""
        geglu, drop, out = self.net
        return out.fused(drop(geglu(x)), add=residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual (ldm)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, N, dim), context (B, L, context_dim)
        x = _plus(self.attn1, x, self.norm1(x))
        x = _plus(self.attn2, x, self.norm2(x), context)
        return _plus(self.ff, x, self.norm3(x))


def _plus(layer: nn.Module, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """x + layer(*args), the sum fused into the layer's last projection, unless hooks on the
    layer (token merging's) see its output, which must then be the layer's alone."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return x + layer(*args)
    return layer(*args, residual=x)


class SpatialTransformer(nn.Module):
    """ldm `SpatialTransformer`: a stack of transformer blocks over the H*W positions of a map.

    `use_linear` (SD 2.x) makes proj_in/proj_out Linear layers applied after flattening;
    otherwise (SD 1.x) they are 1x1 convolutions applied before flattening.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear: bool,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = zero_module(Linear(inner, channels))
        else:
            self.proj_in = Conv2d(channels, inner, 1)
            self.proj_out = zero_module(Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), context (B, L, D)
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if not self.use_linear:
            h_ = self.proj_in(h_)
        h_ = h_.flatten(2).transpose(1, 2)  # (B, H*W, inner)
        if self.use_linear:
            h_ = self.proj_in(h_)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.use_linear:  # x + proj_out(h_), the sum fused into it
            h_ = self.proj_out.fused(h_, add=x.flatten(2).transpose(1, 2))
            return h_.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        h_ = h_.transpose(1, 2).reshape(b, -1, h, w)  # (B, inner, H, W)
        return self.proj_out.fused(h_, add=x)
