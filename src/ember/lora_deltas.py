"""The weight change each add-on format stands for: one module's `Adapter` as a file stores it
-> the delta of its weight tensor (before the strength), and DoRA's magnitude rescaling.

Updates (delta = the change of one weight tensor, before the strength):
- LoRA (Hu et al. 2021): `up @ down * alpha / rank` (scale 1 without alpha); a `lora_mid` core
  is the conv CP decomposition of LoCon (`einsum(mid, up, down)`, as LyCORIS `rebuild_cp`).
- LoHa (LyCORIS; FedPara, Hyeon-Woo et al. 2022): `(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`,
  each factor optionally a Tucker core `t1`/`t2`.
- LoKr (LyCORIS; Yeh et al. 2024): `kron(w1, w2) * alpha / rank`, each side whole or `a @ b`
  (`w2` optionally Tucker); scale 1 when neither side is decomposed.
- full (LyCORIS): `diff` (and `diff_b` for the bias) as stored.
- DoRA (Liu et al. 2024): `m * (W + dW) / ||W + dW|| - W`, the norm per output row for PEFT's
  `lora_magnitude_vector` (and a `dora_scale` of shape (out, 1)), per input column for LyCORIS'
  default `dora_scale` of shape (1, in). Strength w interpolates linearly: `W + w * delta`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ember.errors import EmberError


@dataclass(frozen=True)
class Adapter:
    """One module's update as stored in a file: `kind` is lora, loha, lokr or full."""

    part: str  # UNET_PART or TEXT_PART
    style: str  # "kohya" (underscored path) or "dot"
    module: str  # the module path as the file names it, prefix stripped
    kind: str
    tensors: Mapping[str, torch.Tensor]  # by role (see `ember.lora._ROLES`)
    alpha: float | None  # None: scale 1 (LoRA without alpha)
    rslora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(rank)
    keys: tuple[str, ...] = ()  # the file's tensor names, for error messages


def _rebuild_cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker/CP factors -> (out, in, kh, kw): core (r1, r2, kh, kw), a (r1, out), b (r2, in)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a.flatten(1), b.flatten(1))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (out, r[, 1, 1]) @ b (r, in[, kh, kw]) -> (out, in * kh * kw)."""
    return a.flatten(1) @ b.flatten(1)


def compute_delta(adapter: Adapter, shape: torch.Size) -> torch.Tensor:
    """The adapter's weight update in fp32, shaped `shape` (the target weight's), before DoRA."""
    t = {role: v.float() for role, v in adapter.tensors.items()}
    if adapter.kind == "full":
        delta = t["diff"]
    elif adapter.kind == "lora":
        down, up = t["down"], t["up"]
        if up.ndim == 4 and up.shape[2:] != (1, 1):
            raise EmberError(f"{adapter.module}: lora_up with a {tuple(up.shape[2:])} kernel")
        if "mid" in t:
            delta = _rebuild_cp(t["mid"], up.flatten(1).T, down.flatten(1))
        else:
            delta = _product(up, down)
        delta = delta * _scale(adapter, down.shape[0])
    elif adapter.kind == "loha":
        if "hada_t1" in t:
            w1 = _rebuild_cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _rebuild_cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = _product(t["hada_w1_a"], t["hada_w1_b"])
            w2 = _product(t["hada_w2_a"], t["hada_w2_b"])
        delta = w1 * w2 * _scale(adapter, t["hada_w1_b"].shape[0])
    else:  # lokr
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _rebuild_cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = _product(t["lokr_w2_a"], t["lokr_w2_b"])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        rank = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
        delta = torch.kron(w1, w2) * (_scale(adapter, rank) if rank else 1.0)
    return _fit(delta, shape, adapter)


def _scale(adapter: Adapter, rank: int) -> float:
    if adapter.alpha is None:
        return 1.0
    return adapter.alpha / (rank**0.5 if adapter.rslora else rank)


def _fit(delta: torch.Tensor, shape: torch.Size, adapter: Adapter) -> torch.Tensor:
    """Reshape to the weight's shape when only the layout differs: Linear (out, in) vs 1x1 conv
    (out, in, 1, 1) for `proj_in`/`proj_out`, flattened kernels of LoHa/LoKr convs."""
    if delta.shape == shape:
        return delta
    if delta.numel() == shape.numel() and delta.shape[0] == shape[0]:
        return delta.reshape(shape)
    raise EmberError(
        f"{adapter.keys[0]}: the update has shape {tuple(delta.shape)}, the model's weight "
        f"{tuple(shape)}"
    )


def apply_dora(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, per_output: bool
) -> torch.Tensor:
    """DoRA's merged weight minus `weight` (Liu et al. 2024, eq. 5): m * V / ||V||, V = W + dW.

    `per_output`: the norm of each output row (PEFT); else of each input column (LyCORIS).
    """
    v = weight + delta
    ones = [1] * (v.ndim - 1)
    if per_output:
        norm = v.flatten(1).norm(dim=1).reshape(-1, *ones)
        m = magnitude.reshape(-1, *ones)
    else:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *ones[1:])
        m = magnitude.reshape(1, -1, *ones[1:])
    return m.float() * v / norm - weight


def dora_parts(adapter: Adapter, shape: torch.Size) -> tuple[torch.Tensor, bool] | None:
    """(magnitude, per_output) of a DoRA adapter, checked against the weight's shape."""
    t = adapter.tensors
    if "magnitude" in t:
        mag, per_output = t["magnitude"], True
    elif "dora_scale" in t:
        mag = t["dora_scale"]
        per_output = mag.shape[0] == shape[0] and mag.numel() == shape[0] and shape[0] != 1
    else:
        return None
    want = shape[0] if per_output else shape[1]
    if mag.numel() != want:
        raise EmberError(
            f"{adapter.keys[0]}: DoRA magnitude of {mag.numel()} values for a weight of shape "
            f"{tuple(shape)}"
        )
    return mag, per_output
