"""Comparing PNGs ember wrote: signed Content Credentials differ on every signing (signature,
manifest id), so "the same image again" means the same pixels and the same generation record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def same_image(a: Path, b: Path) -> bool:
    """Same pixels, same A1111 infotext and the same `ember` record."""
    ia, ib = Image.open(a), Image.open(b)
    texts = [{k: i.text.get(k) for k in ("parameters", "ember")} for i in (ia, ib)]
    return np.array_equal(np.asarray(ia), np.asarray(ib)) and texts[0] == texts[1]
