"""Progress pictures for a training run: image grids, and latents sampled with ember.diffusion.

Sampling uses the plainest correct pieces of the inference stack (the model's default sigmas,
Euler, classifier-free guidance), so a sample grid shows what the model has learned rather than
what a sampler choice adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ember.config import ScheduleConfig
from ember.diffusion.denoisers import CFGDenoiser, Conditioning, build_denoiser
from ember.diffusion.samplers import draw_noise, sample_euler
from ember.diffusion.schedules import get_sigmas, initial_noise_scale
from ember.files import atomic_path


def save_grid(images: torch.Tensor, rows: int, path: Path) -> Path:
    """Write (N, 3, H, W) pixels in [-1, 1] as one PNG with `rows` rows (atomically)."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(rows * cols, c, h, w)
    canvas[:n] = images.detach().float().cpu().clamp(-1, 1).add(1).mul(0.5)
    grid = canvas.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
    return Path(path)


@torch.no_grad()
def sample_latents(
    unet: nn.Module,
    context: torch.Tensor,
    uncond: torch.Tensor,
    shape: tuple[int, ...],
    schedule: ScheduleConfig,
    *,
    steps: int = 20,
    scale: float = 5.0,
    generator: torch.Generator,
) -> torch.Tensor:
    """Latents `shape` (B, C, h, w) for prompts `context` (B, L, D) against `uncond` (1, L, D):
    Euler steps down the model's default sigmas with guidance `scale`."""
    denoiser = CFGDenoiser(build_denoiser(unet, schedule), scale)
    cond = Conditioning(context, uncond.expand_as(context))
    sigmas = get_sigmas("default", steps, schedule, sampler="euler")
    x = draw_noise(shape, generator, device=context.device) * initial_noise_scale(sigmas, "euler")
    return sample_euler(denoiser, x, sigmas.to(context.device), cond, generator=generator)
