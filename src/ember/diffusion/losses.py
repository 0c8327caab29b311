"""Training losses for DDPM-style eps- and v-prediction networks.

The forward process is Ho et al. 2020, eq. 4: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n. Targets:
eps = n (Ho et al. 2020) or v = sqrt(a_t) n - sqrt(1 - a_t) x0 (Salimans & Ho 2022, eq. after 9).
Optional Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): the x0-space weight min(SNR, gamma), expressed for the eps target as
min(SNR, gamma) / SNR and for the v target as min(SNR, gamma) / (SNR + 1).

Min-SNR's x0-space weight min(SNR, gamma) falls to SNR itself at high noise: under the default
schedule it is below 0.1 for the 31% of timesteps from t = 687 on, where a 16x16 latent's layout
and colours are decided. An optional floor keeps those steps in training: the x0-space weight
becomes max(min(SNR, gamma), floor).
"""

from __future__ import annotations

import torch

from ember.config import Prediction, ScheduleConfig
from ember.diffusion.schedules import train_alphas_cumprod


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather (T,) `values` at timesteps `t` (B,) and shape them (B, 1, ..., 1) for broadcasting."""
    return values.to(t.device)[t.long()].view(-1, *([1] * (ndim - 1)))


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise for x0, noise (B, C, H, W) and integer t (B,)."""
    a = _per_sample(alphas_cumprod, t, x0.ndim).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def get_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
) -> torch.Tensor:
    """The regression target of an eps- or v-prediction network, shaped like x0."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        a = _per_sample(alphas_cumprod, t, x0.ndim).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose eps or v")


def min_snr_weights(
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float,
    prediction: Prediction,
    floor: float = 0.0,
    floored: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weights (Hang et al. 2023) for the given target type, with the
    x0-space weight held at `floor` or above (0 = plain Min-SNR) for every sample, or only where
    the (B,) bool mask `floored` is True."""
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    if not 0 <= floor <= gamma:
        raise ValueError(f"min-SNR floor must be in [0, gamma = {gamma}], got {floor}")
    a = alphas_cumprod.to(t.device, torch.float64)[t.long()]
    snr = a / (1 - a)
    low = torch.full_like(snr, floor) if floored is None else floor * floored.to(snr)
    clipped = torch.maximum(snr, low).clamp(max=gamma)
    if prediction == "eps":
        return (clipped / snr).float()
    if prediction == "v":
        return (clipped / (snr + 1)).float()
    raise ValueError(f"unknown prediction {prediction!r}; choose eps or v")


class DiffusionLoss:
    """Per-sample MSE of a network's prediction against its eps or v target.

    `loss(model_output, x0, noise, t) -> (B,)`; `model_output` is the network applied to
    `add_noise(x0, noise, t, loss.alphas_cumprod)`. With `min_snr_gamma`, each sample is
    weighted by `min_snr_weights` (with `min_snr_floor`, for the samples in the optional
    `floored` mask, or all).
    """

    def __init__(
        self,
        schedule_cfg: ScheduleConfig,
        *,
        prediction: Prediction | None = None,
        min_snr_gamma: float | None = None,
        min_snr_floor: float = 0.0,
    ):
        self.alphas_cumprod = train_alphas_cumprod(schedule_cfg)  # (T,)
        self.prediction: Prediction = prediction or schedule_cfg.prediction
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {self.prediction!r}; choose eps or v")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
        if min_snr_floor and min_snr_gamma is None:
            raise ValueError("a min-SNR floor needs min_snr_gamma")
        self.min_snr_gamma = min_snr_gamma
        self.min_snr_floor = min_snr_floor

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def __call__(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        floored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        target = get_target(x0, noise, t, self.alphas_cumprod, self.prediction)
        err = (model_output.float() - target.float()) ** 2
        loss = err.mean(dim=tuple(range(1, err.ndim)))  # (B,)
        if self.min_snr_gamma is not None:
            loss = loss * min_snr_weights(
                t,
                self.alphas_cumprod,
                self.min_snr_gamma,
                self.prediction,
                self.min_snr_floor,
                floored,
            )
        return loss
