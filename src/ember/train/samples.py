"""Progress pictures for a training run: image grids and a small Euler sampler.

The sampler is deliberately the simplest correct one (Euler in sigma space, Karras et al. 2022
Algorithm 1 with no churn) with classifier-free guidance, so a sample grid never depends on
the inference stack being finished or bug-free; it wraps eps / v networks into x0 predictions
with the EDM preconditioning written out (`c_skip`, `c_out`, `c_in`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ember.config import ScheduleConfig
from ember.diffusion.schedules import get_sigmas, sigma_to_t, train_sigmas


def save_grid(images: torch.Tensor, rows: int, path: Path) -> Path:
    """Write (N, 3, H, W) pixels in [-1, 1] as one PNG with `rows` rows (atomically)."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(rows * cols, c, h, w)
    canvas[:n] = images.detach().float().cpu().clamp(-1, 1).add(1).mul(0.5)
    grid = canvas.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
    tmp.replace(path)
    return path


def to_x0(
    unet: nn.Module,
    x: torch.Tensor,
    sigma: float,
    context: torch.Tensor,
    cfg: ScheduleConfig,
    table: torch.Tensor,
) -> torch.Tensor:
    """x0 estimate of latents `x` (B, C, h, w) at noise level `sigma` (EDM preconditioning)."""
    s = torch.tensor(sigma, dtype=torch.float32)
    c_in = 1.0 / (s * s + 1).sqrt()
    t = sigma_to_t(s.reshape(1), table).expand(x.shape[0]).to(x.device)
    out = unet(x * c_in, t, context).float()
    if cfg.prediction == "v":
        c_skip, c_out = 1.0 / (s * s + 1), -s / (s * s + 1).sqrt()
        return c_skip * x + c_out * out
    return x - s * out  # eps: c_skip = 1, c_out = -sigma


@torch.no_grad()
def sample_euler_cfg(
    unet: nn.Module,
    context: torch.Tensor,
    uncond: torch.Tensor,
    shape: tuple[int, ...],
    cfg: ScheduleConfig,
    *,
    steps: int = 20,
    scale: float = 5.0,
    generator: torch.Generator,
) -> torch.Tensor:
    """Latents (B, C, h, w) sampled with Euler steps and classifier-free guidance `scale`."""
    device = context.device
    sigmas = get_sigmas("default", steps, cfg)
    table = train_sigmas(cfg)
    x = torch.randn(shape, generator=generator).to(device) * sigmas[0]
    both = torch.cat([uncond.expand_as(context), context])
    for i in range(steps):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        x0_u, x0_c = to_x0(unet, torch.cat([x, x]), sigma, both, cfg, table).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        x = x + (x - x0) / sigma * (nxt - sigma)
    return x
