"""The generation settings: one dataclass, with the limits, validation and model defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ember.config import SD_DEFAULT_CFG


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines an image. Stored in each PNG's `ember` record."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "dpmpp_2m"
    schedule: str = "default"
    steps: int = 20
    cfg: float = SD_DEFAULT_CFG
    seed: int = 0
    width: int = 512
    height: int = 512
    batch: int = 1
    strength: float = 0.75  # img2img / inpaint only
    clip_skip: int = 1
    layout_guidance: float = 0.0  # strength of ember.diffusion.layout's guidance; 0: off
    eta: float | None = None  # noise of ancestral/SDE samplers; None: 1, or 0 for ddim
