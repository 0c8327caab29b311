"""Input limits of the server: sizes, counts, bodies and uploaded images.

Every check raises `EmberError` (answered 4xx) with a message naming the value and what is allowed,
so no bad input can reach the engine and turn into a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ember.errors import EmberError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings; the defaults suit a public server on a single GPU."""

    max_side: int = 2048
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_batch: int = 8
    max_prompt_chars: int = 4000
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # decoded uploads; PIL refuses bigger before decoding

    def check_request(
        self, *, width: int, height: int, steps: int, batch: int, prompts: tuple[str, ...]
    ) -> None:
        """Raise EmberError for a request over any ceiling."""
        for name, value in (("width", width), ("height", height)):
            if not 8 <= value <= self.max_side:
                raise EmberError(f"{name} {value} is not allowed: use 8 to {self.max_side}")
        if width * height > self.max_pixels:
            raise EmberError(
                f"size {width}x{height} is over this server's limit of {self.max_pixels} pixels"
            )
        if not 1 <= steps <= self.max_steps:
            raise EmberError(f"steps {steps} is not allowed: use 1 to {self.max_steps}")
        if not 1 <= batch <= self.max_batch:
            raise EmberError(f"batch size {batch} is not allowed: use 1 to {self.max_batch}")
        for text in prompts:
            if len(text) > self.max_prompt_chars:
                raise EmberError(
                    f"prompt of {len(text)} characters is over the limit of {self.max_prompt_chars}"
                )


def check_finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise EmberError(f"{name} must be a finite number, not {value}")
    return value


def decode_base64(data: str, what: str = "image") -> bytes:
    """Strict base64 (a `data:...;base64,` prefix allowed, as A1111 clients send)."""
    if not isinstance(data, str) or not data:
        raise EmberError(f"{what} must be a non-empty base64 string")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise EmberError(f"{what}: a data URL must be base64 encoded")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EmberError(f"{what} is not valid base64 (truncated or corrupt)") from None


def decode_image(raw: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Open an uploaded image safely: allowlisted formats only and a pixel cap checked from the
    header, before any pixel is decoded (a 50 kB PNG can claim 100k x 100k pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=list(ALLOWED_FORMATS))
            w, h = img.size
            if w * h > limits.max_image_pixels or w < 1 or h < 1:
                raise EmberError(
                    f"{what} is {w}x{h}: over the limit of {limits.max_image_pixels} pixels"
                )
            img.load()
    except EmberError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EmberError(f"{what} is too large (decompression bomb refused)") from None
    except Image.UnidentifiedImageError:
        raise EmberError(f"{what} is not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise EmberError(f"{what} cannot be decoded: {exc}") from None
    return img


def image_array(img: Image.Image, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, C) uint8 in `mode`, resized to `size` (width, height) when given."""
    img = img.convert(mode)
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
