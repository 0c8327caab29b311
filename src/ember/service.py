"""The generation service below both front-ends: requests in, images with their records out.

`ember generate`, `ember eval` and the server's worker all go through `GenerationService`: it loads a
model (or reuses the one loaded), fills in the model's defaults and checks the settings once
(`ember.settings`), converts input pixels to tensors, runs the pipeline, and returns each image as
uint8 pixels with the `ImageRecord` that makes it again. The front-ends only parse input and write
output; nothing here knows about argparse or HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.images import ImageRecord, png_bytes, tensor_to_uint8, uint8_to_tensor
from ember.settings import ENGINE_LIMITS, GenerationParams, Limits, resolve, validate

# on_step(step, total, previews): previews are (H, W, 3) uint8 per image of the batch, or None.
StepFn = Callable[[int, int, list[np.ndarray] | None], None]


@dataclass(frozen=True)
class Request:
    """One request: its settings and, for img2img / inpainting, its input pixels."""

    params: GenerationParams
    init_image: np.ndarray | None = None  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W, 1) uint8, 255 = repaint

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"


@dataclass(frozen=True)
class GeneratedImage:
    pixels: np.ndarray  # (H, W, 3) uint8
    record: ImageRecord

    def png(self) -> bytes:
        return png_bytes(self.pixels, self.record)


class GenerationService:
    """One model loaded at a time (reused while the same file is asked for), in one dtype."""

    def __init__(self, dtype: str = "auto") -> None:
        from ember.device import resolve_dtype

        self.dtype = resolve_dtype(dtype)  # "auto" resolved once: records say which
        self._loaded = None
        self._key: tuple[str, str | None] | None = None

    @property
    def model(self):
        """The loaded `LoadedModel`."""
        if self._loaded is None:
            raise RuntimeError("no model loaded: call load() first")
        return self._loaded

    def load(self, path: str | Path, config: str | None = None, *, progress=None):
        """Load the model at `path` (a `.safetensors` file or a diffusers folder), unless it is
        the one already loaded."""
        from ember.checkpoints import load_model

        key = (str(Path(path).resolve()), config)
        if self._loaded is not None and key == self._key:
            return self._loaded
        self._loaded = self._key = None  # free the old weights before reading the new ones
        self._loaded = load_model(path, config, dtype=self.dtype, progress=progress)
        self._key = key
        return self._loaded

    def prepare(self, params: GenerationParams, limits: Limits = ENGINE_LIMITS) -> GenerationParams:
        """The model's defaults filled in, the seed drawn, every field checked against `limits`."""
        return validate(resolve(params, self.model.config), limits)

    def generate(
        self, requests: list[Request], on_step: StepFn | None = None, *, preview_every: int = 0
    ) -> list[list[GeneratedImage]]:
        """Run requests that share a batch key and mode as one U-Net batch -> each request's
        images, in order, with their records. `on_step` hears of every step; every
        `preview_every` steps (0: never) it gets the batch's current x0 estimate as pixels."""
        from ember.pipeline import Inputs, decode_latents, generate_batch

        loaded = self.model
        params = [self.prepare(r.params) for r in requests]
        inputs = [Inputs(_tensor(r.init_image), _tensor(r.mask)) for r in requests]

        def callback(i: int, total: int, x, denoised) -> None:
            if on_step is None:
                return
            previews = None
            if preview_every and (i + 1) % preview_every == 0 and i + 1 < total:
                previews = list(tensor_to_uint8(decode_latents(loaded, denoised)))
            on_step(i + 1, total, previews)

        outputs = generate_batch(loaded, params, inputs, callback=callback)
        return [
            [GeneratedImage(pixels, self.record(p, r, n))
             for n, pixels in enumerate(tensor_to_uint8(images))]
            for p, r, images in zip(params, requests, outputs, strict=True)
        ]  # fmt: skip

    def record(self, params: GenerationParams, request: Request, index: int) -> ImageRecord:
        """The record of image `index` of a request: its own seed, batch 1, the model's hashes
        and the sha256 of the input pixels the pipeline used."""
        import torch

        from ember import __version__
        from ember.device import dtype_name

        loaded = self.model
        return ImageRecord(
            params=dataclasses.replace(params, seed=params.seed + index, batch=1),
            model_name=loaded.name,
            model_path=str(loaded.path),
            model_sha256=loaded.sha256,
            model_hash=loaded.short_hash,
            ember_version=__version__,
            torch_version=torch.__version__,
            dtype=dtype_name(loaded.dtype),
            device="cpu",
            mode=request.mode,
            init_image_sha256=_sha(request.init_image),
            mask_sha256=_sha(request.mask),
        )


def _tensor(pixels: np.ndarray | None):
    return None if pixels is None else uint8_to_tensor(pixels)


def _sha(pixels: np.ndarray | None) -> str | None:
    import hashlib

    return (
        None
        if pixels is None
        else hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    )
