"""Denoisers: wrap a raw eps- or v-prediction U-Net as `denoiser(x, sigma, cond) -> x0`.

Preconditioning follows Karras et al. 2022 (EDM), Table 1, for a DDPM-trained network queried in
the variance-exploding space: `D(x; sigma) = c_skip * x + c_out * F(c_in * x; c_noise)`, with
`c_in = 1 / sqrt(sigma^2 + 1)` (back to the variance-preserving input the network was trained on)
and `c_noise = t = sigma_to_t(sigma)` (the discrete training timestep).

- eps-prediction (Ho et al. 2020): c_skip = 1, c_out = -sigma.
- v-prediction (Salimans & Ho 2022): with alpha = c_in and s = sigma * c_in (the VP coefficients),
  x0 = alpha * x_vp - s * v and x_vp = alpha * x, so c_skip = 1 / (sigma^2 + 1) and
  c_out = -sigma / sqrt(sigma^2 + 1). This is diffusers' `v_prediction` branch term for term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.config import ScheduleConfig
from ember.diffusion.schedules import sigma_to_t, train_sigmas

# unet_fn(x_in (B, C_in, H, W), t (B,) float timestep, context (B, L, D)[, y (B, adm)])
#   -> (B, C, H, W); y (SDXL's vector conditioning) is passed only when there is one.
UNetFn = Callable[..., torch.Tensor]


def per_image_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """`sigma` as a float32 (B,) tensor on x's device: samplers pass a scalar or one per image."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


@dataclass
class Conditioning:
    """What the network is conditioned on.

    `context`: (B, L, D) text embeddings; `uncond_context`: (B, L, D) negative-prompt embeddings
    for classifier-free guidance, or None; `concat`: (B, C, H, W) extra input channels for
    inpainting U-Nets (mask and masked-image latents), appended after c_in scaling; `vector` and
    `uncond_vector`: (B, adm) SDXL's pooled text and size conditioning (ldm's `y`), or None.
    """

    context: torch.Tensor
    uncond_context: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    vector: torch.Tensor | None = None
    uncond_vector: torch.Tensor | None = None

    def positive(self) -> Conditioning:
        """The conditional half alone (no guidance)."""
        return Conditioning(self.context, None, self.concat, self.vector)

    def negative(self) -> Conditioning:
        return Conditioning(self.uncond_context, None, self.concat, self.uncond_vector)


class _DiscreteDenoiser:
    """Shared plumbing of the eps and v wrappers: sigma table, c_in, timestep, concat channels."""

    def __init__(self, unet_fn: UNetFn, schedule_cfg: ScheduleConfig, *, quantize: bool = False):
        self.unet_fn = unet_fn
        self.schedule_cfg = schedule_cfg
        # Round t to the nearest training timestep; diffusers does this for DPMSolverMultistep
        # and KDPM2 with Karras sigmas, A1111 and k-diffusion do not by default.
        self.quantize = quantize
        self.sigmas = train_sigmas(schedule_cfg)  # (T,)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_t(sigma.cpu(), self.sigmas)
        return (t.round() if self.quantize else t).to(sigma.device)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in), each shaped like `sigma`."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = per_image_sigma(sigma, x)  # (B,)
        c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.scalings(sigma))
        x_in = x * c_in.to(x.dtype)  # (B, C, H, W)
        if cond.concat is not None:
            x_in = torch.cat([x_in, cond.concat.to(x_in.dtype)], dim=1)  # (B, C + C_extra, H, W)
        t = self.sigma_to_t(sigma)
        if cond.vector is None:
            out = self.unet_fn(x_in, t, cond.context)
        else:
            out = self.unet_fn(x_in, t, cond.context, cond.vector)
        return x * c_skip.to(x.dtype) + out.to(x.dtype) * c_out.to(x.dtype)


class EpsDenoiser(_DiscreteDenoiser):
    """x0 = x - sigma * eps(c_in * x, t) for networks trained to predict the added noise."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return torch.ones_like(sigma), -sigma, c_in


class VDenoiser(_DiscreteDenoiser):
    """x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in * x, t) (v-prediction)."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in


def build_denoiser(
    unet_fn: UNetFn, schedule_cfg: ScheduleConfig, *, quantize: bool = False
) -> _DiscreteDenoiser:
    """The wrapper that matches `schedule_cfg.prediction`."""
    if schedule_cfg.prediction == "eps":
        return EpsDenoiser(unet_fn, schedule_cfg, quantize=quantize)
    if schedule_cfg.prediction == "v":
        return VDenoiser(unet_fn, schedule_cfg, quantize=quantize)
    raise ValueError(f"unknown prediction {schedule_cfg.prediction!r}; choose eps or v")


Denoiser = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    One batched call with `[uncond, cond]` stacked along the batch, in diffusers' order, then
    `uncond + scale * (cond - uncond)`. Guiding x0 equals guiding eps or v, because x0 is affine
    in the network output with the same c_skip * x for both halves.
    """

    def __init__(self, inner: Denoiser, scale: float):
        self.inner = inner
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.scale == 1.0 or cond.uncond_context is None:
            if self.scale != 1.0:
                raise ValueError(f"guidance scale {self.scale} needs an uncond_context")
            return self.inner(x, sigma, cond.positive())
        sigma = per_image_sigma(sigma, x)  # (B,)
        concat = None if cond.concat is None else torch.cat([cond.concat, cond.concat])
        if cond.uncond_context.shape[1:] != cond.context.shape[1:]:
            # Prompts of different token lengths cannot share a batch; two calls give the same x0.
            uncond = self.inner(x, sigma, cond.negative())
            positive = self.inner(x, sigma, cond.positive())
        else:
            vector = None
            if cond.vector is not None:
                vector = torch.cat([cond.uncond_vector, cond.vector])
            context = torch.cat([cond.uncond_context, cond.context])
            both = Conditioning(context, None, concat, vector)
            uncond, positive = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(
                2
            )
        return uncond + self.scale * (positive - uncond)


class SwitchDenoiser:
    """One denoiser for the high noise levels, another below them: SDXL's refiner (Podell et al.
    2023, section 2.5), which takes over the same sampler run with its own conditioning, as A1111
    and diffusers' `denoising_end` / `denoising_start` hand over."""

    def __init__(
        self,
        first: Denoiser,
        second: Denoiser,
        second_cond: Conditioning,
        use_second: Callable[[torch.Tensor], bool],
    ):
        self.first, self.second, self.second_cond = first, second, second_cond
        self.use_second = use_second

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.use_second(per_image_sigma(sigma, x)):
            return self.second(x, sigma, self.second_cond)
        return self.first(x, sigma, cond)
