"""What the probes share: load a model as `ember eval` scores it, and generate as it does."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from ember.catalog import DEFAULT_MODEL, resolve_model_path  # noqa: E402, F401 (re-exported)
from ember.checkpoints import load_model  # noqa: E402
from ember.device import resolve_dtype  # noqa: E402


def load(name: str | None):
    """A model file, a name in the models folder, or None (the bundled model), in fp32."""
    return load_model(resolve_model_path(name), dtype=resolve_dtype("fp32"))


def generate_images(
    loaded,
    prompts: list[str],
    seeds: list[int],
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    cfg: float | None = None,
    layout_guidance: float | None = None,
    batch: int = 16,
) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per (prompt, seed) at the model's size; cfg and layout guidance
    default to the model's, as in `ember eval`."""
    from ember.images import tensor_to_uint8
    from ember.pipeline import generate_batch
    from ember.settings import GenerationParams

    size = loaded.config.size
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = zip(prompts[start : start + batch], seeds[start : start + batch], strict=True)
        reqs = [
            GenerationParams(prompt=p, sampler=sampler, steps=steps, cfg=cfg,
                             layout_guidance=layout_guidance, seed=s, width=size, height=size)
            for p, s in chunk
        ]  # fmt: skip
        for images in generate_batch(loaded, reqs):
            out.extend(tensor_to_uint8(images))
    return out
