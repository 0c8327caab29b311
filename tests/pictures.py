"""Test pictures and the edits a watermark must outlive, shared by tests/test_provenance.py and
bench/watermark_detection.py."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def dead_leaves(side: int, seed: int = 0) -> np.ndarray:
    """(side, side, 3) uint8 with natural images' statistics: occluding objects of power-law sizes,
    a 1/f spectrum (the dead-leaves model; Lee, Mumford and Huang 2001), and a little sensor noise.
    Random noise would be too easy for a watermark detector, a flat image too hard to hide in."""
    rng = np.random.default_rng(seed)
    img = np.zeros((side, side, 3)) + rng.uniform(0, 255, 3)
    y, x = np.mgrid[:side, :side]
    for r in side * 0.4 * rng.uniform(0.02, 1, 150) ** 2:
        cy, cx = rng.uniform(0, side, 2)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 2, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def reencode(pixels: np.ndarray, fmt: str = "PNG", scale: float = 1.0, quality: int = 90):
    """The pixels after a resize by `scale` (Lanczos) and a save as `fmt` (JPEG at `quality`)."""
    img = Image.fromarray(pixels)
    if scale != 1.0:
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return np.asarray(Image.open(buf).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")
