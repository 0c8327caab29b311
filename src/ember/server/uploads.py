"""Uploaded images: strict base64, allowlisted formats, and a pixel cap read before decoding.

Every check raises `EmberError` (answered 4xx) with a message naming the value and what is allowed,
so no bad upload can reach the engine and turn into a 500. The ceilings are `ember.settings.Limits`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from ember.errors import EmberError
from ember.settings import Limits

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


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
