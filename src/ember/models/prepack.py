"""Convolutions prepacked in oneDNN's blocked layout, and linear layers with fused post-ops (CPU).

A plain `F.conv2d` call on CPU reorders the weight into oneDNN's layout on every call; for the deep,
small-spatial layers of a U-Net (1280 channels at 8x8 or 4x4) the reorder costs more than the
convolution itself (measured 2-4x per layer, bench/profile-sd15-256.md). `Conv2d` here is a drop-in
`nn.Conv2d` that makes the packed copy once, through private torch ops (`torch.ops.mkldnn`), so
the model definitions (`layers.py`, `unet.py`, `vae.py`) read like the ldm code they mirror.

Both also run what follows them in the same oneDNN call (`fused`): a residual sum, a ReLU, and for
`Linear` a GELU or a product. Each such pass over a large activation costs as much as a small
GEMM; fused (`layers.py`: the transformers' residuals and GEGLU, the ResBlocks' skips; `vae.py`),
SD 1.5's U-Net pass at 512x512 in bf16 is 1.10x and its VAE decode 1.19x faster (bench/fused.py).

EMBER_PREPACK=0, read at import, turns both off: each conv weight then exists once instead of
twice (SD 1.5 in fp32: 2.3 GB less peak memory, ~20% slower; bench/prepack_memory.py). Setting
`PREPACK` at run time takes effect on the next call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ember.process import env_on

PREPACK = env_on("EMBER_PREPACK")


def onednn_usable(dtype: torch.dtype) -> bool:
    """oneDNN convolutions with prepacked weights: on CPU builds with mkldnn, fp32 always, bf16
    only where the CPU has native bf16 instructions (elsewhere oneDNN would emulate it slowly)."""
    if not PREPACK or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


@contextmanager
def unpacked() -> Iterator[None]:
    """Plain `F.conv2d` inside the block: what `torch.export` must trace (an opaque packed weight
    cannot be a graph constant; inductor's freezing packs the weights itself)."""
    global PREPACK
    was, PREPACK = PREPACK, False
    try:
        yield
    finally:
        PREPACK = was


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that, at inference on CPU, keeps its weight prepacked in oneDNN's blocked layout.

    The packed copy is made on first use and rebuilt whenever the weight's storage, version or
    dtype changes; with gradients, autocast, other devices or dtypes this is exactly `nn.Conv2d`.
    Parameter names and the state dict are unchanged.
    """

    _packed: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def fused(
        self, x: torch.Tensor, *, add: torch.Tensor | None = None, relu: bool = False
    ) -> torch.Tensor:
        """`relu(conv(x) + add)` (each part optional), in one oneDNN call on the prepacked path: a
        separate ReLU and sum over a 64-channel 512x512 map cost half as much again as the
        convolution (TAESD's decoder, bench/fewstep.py)."""
        packed = self._packed_weight(x)
        if packed is None:
            y = super().forward(x)
            y = y if add is None else y + add
            return torch.relu(y) if relu else y
        bias = None if self.bias is None else self.bias.detach()
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if add is None:
            attr = "relu" if relu else "none"
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, attr, [], "")
        # oneDNN's post-op names: "add" (not "sum") and no unary as None (not "none")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, packed, bias, *geometry, "add", None, "relu" if relu else None, [], ""
        )

    def _packed_weight(self, x: torch.Tensor):
        """The oneDNN-packed weight for `x`, or None where the plain convolution must run."""
        w = self.weight
        if (
            x.device.type != "cpu"
            or x.dtype != w.dtype
            or x.ndim != 4
            or w.is_meta
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            or torch.is_autocast_enabled("cpu")
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or not onednn_usable(x.dtype)
        ):
            return None
        key = (w.data_ptr(), w._version, w.dtype, x.shape[1])
        if self._packed is None or self._packed[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(),
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(x.shape),
            )
            self._packed = (key, packed)
        return self._packed[1]

    def __getstate__(self) -> dict:
        # The packed copy is a cache (and an opaque oneDNN tensor): never copy or pickle it.
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


class Linear(nn.Linear):
    """`nn.Linear` whose `fused` runs, at inference on CPU, as one oneDNN GEMM with a GELU, a
    residual sum or a product applied to the output before it is stored.

    The weight is handed to oneDNN as it is (no packed copy): for these GEMMs a prepacked weight
    measured no faster, and SDXL's fused layers would hold 2.8 GB more in bf16. `forward` is
    `nn.Linear`'s; parameter names and the state dict are unchanged.
    """

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether `fused` runs as one oneDNN call for `x` (else it computes the same in steps)."""
        w = self.weight
        return not (
            x.device.type != "cpu"
            or x.dtype != w.dtype
            or w.is_meta
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            or torch.is_autocast_enabled("cpu")
            or not onednn_usable(x.dtype)
        )

    def fused(
        self,
        x: torch.Tensor,
        *,
        rows: tuple[int, int] | None = None,
        gelu: bool = False,
        add: torch.Tensor | None = None,
        mul: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`gelu(x W^T + b)`, `x W^T + b + add` or `(x W^T + b) * mul` (at most one of the three),
        with W and b the output rows `rows` = (start, stop) of the layer's (all when None)."""
        assert gelu + (add is not None) + (mul is not None) <= 1, "one post-op at a time"
        w, b = self.weight, self.bias
        if rows is not None:
            w = w[rows[0] : rows[1]]  # a block of rows: contiguous
            b = None if b is None else b[rows[0] : rows[1]]
        if not self.fusable(x):
            y = F.linear(x, w, b)
            if gelu:
                return F.gelu(y)
            if add is not None:
                return y + add
            return y if mul is None else y * mul
        x2 = x.reshape(-1, x.shape[-1])
        w, b = w.detach(), None if b is None else b.detach()
        pointwise = torch.ops.mkldnn._linear_pointwise
        if add is not None:
            y = pointwise.binary(x2, add.reshape(len(x2), -1), w, b, "add")
        elif mul is not None:
            y = pointwise.binary(x2, mul.reshape(len(x2), -1), w, b, "mul")
        elif gelu:  # "none" as the algorithm: the exact (erf) GELU, F.gelu's default
            y = pointwise(x2, w, b, "gelu", [], "none")
        else:
            y = pointwise(x2, w, b, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])
