"""The generation service below both front-ends: requests in, images with their records out.

`ember generate`, `ember eval` and the server's worker all go through `GenerationService`: it loads a
model (or reuses the one loaded), fills in the model's defaults and checks the settings once
(`ember.settings`), converts input pixels to tensors, runs the pipeline, and returns each image as
uint8 pixels with the `ImageRecord` that makes it again. The front-ends only parse input and write
output; nothing here knows about argparse or HTTP.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.catalog import resolve_lora_path
from ember.images import ImageRecord, png_bytes, tensor_to_uint8, uint8_to_tensor
from ember.provenance import ON, Provenance
from ember.settings import (
    ENGINE_LIMITS,
    GenerationParams,
    Limits,
    LoraChoice,
    lora_selection,
    resolve,
    validate,
)

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
    inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # init image, mask

    def png(self, provenance: Provenance = ON) -> bytes:
        return png_bytes(self.pixels, self.record, provenance, self.inputs)


class GenerationService:
    """One model loaded at a time (reused while the same file is asked for), in one dtype, with
    the LoRAs of the current batch merged into it (unmerged when the next batch wants others)."""

    def __init__(
        self,
        dtype: str = "auto",
        *,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        preview_vae: Path | None = None,
    ) -> None:
        from ember.catalog import embeddings_dir as default_embeddings_dir
        from ember.catalog import lora_dir as default_lora_dir
        from ember.device import resolve_dtype

        self.dtype = resolve_dtype(dtype)  # "auto" resolved once: records say which
        self.lora_dir = lora_dir if lora_dir is not None else default_lora_dir()
        self.embeddings_dir = (
            embeddings_dir if embeddings_dir is not None else default_embeddings_dir()
        )
        self.preview_vae_path = preview_vae
        self._preview_vae = None  # (vae_files.LoadedVAE) decodes previews, e.g. TAESD
        self._vae = None  # a replacement VAE in use (vae_files.LoadedVAE)
        self._vae_path: str | None = None
        self._vae_remove = None  # puts the model's own VAE back
        self._embeddings = None  # ember.embeddings.AppliedEmbeddings
        self.embedding_errors: dict[str, str] = {}  # embeddings of the folder that cannot be read
        self._loaded = None
        self._key: tuple | None = None  # (model path, config, prediction) of the loaded model
        self._merged = None  # the LoRAs merged into the loaded weights (ember.lora.MergedLoras)
        self._lora_key: tuple = ()
        self._lora_records: tuple[dict, ...] = ()
        self._refiner = None  # the SDXL refiner requests name (a LoadedModel), kept while asked for
        # How a request's refiner name becomes a path: a file, a folder or a models-folder name;
        # the server narrows it to its catalog.
        self.resolve_refiner: Callable[[str], Path] = _resolve_model_path

    @property
    def model(self):
        """The loaded `LoadedModel`."""
        if self._loaded is None:
            raise RuntimeError("no model loaded: call load() first")
        return self._loaded

    def load(
        self,
        path: str | Path,
        config: str | None = None,
        *,
        progress=None,
        prediction: str | None = None,
        vae: str | Path | None = None,
    ):
        """Load the model at `path` (a `.safetensors` file or a diffusers folder), unless it is
        the one already loaded: `prediction` overrides its detected type, `vae` replaces its VAE
        (a full SD VAE or TAESD), and the embeddings folder's embeddings join its vocabulary."""
        from ember.checkpoints import load_model
        from ember.embeddings import apply_embeddings, read_embeddings
        from ember.process import release_freed_memory
        from ember.vae_files import load_vae

        key = (str(Path(path).resolve()), config, prediction)
        if self._loaded is not None and key == self._key:
            self.use_vae(vae)
            return self._loaded
        replacing = self._loaded is not None
        self._loaded = self._key = self._merged = self._vae = self._embeddings = None
        self._vae_path = self._vae_remove = None
        self._lora_key, self._lora_records = (), ()  # the old weights are freed first
        if replacing:  # and handed back, not kept by malloc for buffers that will not come
            gc.collect()
            release_freed_memory()
        loaded = load_model(
            path, config, dtype=self.dtype, progress=progress, prediction=prediction
        )
        if self.preview_vae_path is not None:
            self._preview_vae = load_vae(
                self.preview_vae_path, loaded.dtype, base=loaded.config.vae
            )
        found, self.embedding_errors = read_embeddings(self.embeddings_dir)
        self._embeddings = apply_embeddings(loaded, found, self.embedding_errors)
        self._loaded, self._key = loaded, key
        self.use_vae(vae)
        return loaded

    def use_vae(self, path: str | Path | None) -> None:
        """Decode (and encode img2img inputs) with the VAE at `path` (a full SD VAE or TAESD)
        instead of the model's own; None: the model's own. Swapping costs one VAE load."""
        from ember.vae_files import apply_vae, load_vae

        path = None if path is None else str(path)
        if path == self._vae_path:
            return
        if self._vae_remove is not None:
            self._vae_remove()
            self._vae = self._vae_path = self._vae_remove = None
        if path is not None:
            vae = load_vae(path, self.model.dtype, base=self.model.config.vae)
            self._vae_remove = apply_vae(self.model, vae)
            self._vae, self._vae_path = vae, path

    def use_loras(self, choices: tuple[LoraChoice, ...]) -> tuple[dict, ...]:
        """Merge exactly `choices` into the loaded model (unmerging any others first, which restores
        the base weights bit for bit) -> their records. The same set again costs nothing."""
        paths = [resolve_lora_path(c.name, self.lora_dir) for c in choices]
        key = tuple(
            (str(p.resolve()), p.stat().st_mtime_ns, c.te_weight, c.unet_weight)
            for p, c in zip(paths, choices, strict=True)
        )
        if key == self._lora_key:
            return self._lora_records
        if self._merged is not None:
            self._merged.remove()
            self._merged, self._lora_key, self._lora_records = None, (), ()
        if not choices:
            return ()
        from ember.lora import merge_loras, read_lora

        files = [read_lora(p) for p in paths]
        self._merged = merge_loras(
            self.model,
            [(f, c.te_weight, c.unet_weight) for f, c in zip(files, choices, strict=True)],
        )
        self._lora_key = key
        self._lora_records = tuple(
            {"name": f.name, "path": str(p), "sha256": f.sha256,
             "a1111_hash": f.a1111_hash, "te_weight": c.te_weight,
             "unet_weight": c.unet_weight}
            for f, p, c in zip(files, paths, choices, strict=True)
        )  # fmt: skip
        return self._lora_records

    def prepare(self, params: GenerationParams, limits: Limits = ENGINE_LIMITS) -> GenerationParams:
        """The model's defaults filled in, the seed drawn, every field checked against `limits`."""
        return validate(resolve(params, self.model.config), limits)

    def generate(
        self, requests: list[Request], on_step: StepFn | None = None, *, preview_every: int = 0
    ) -> list[list[GeneratedImage]]:
        """Run requests that share a batch key and mode as one U-Net batch -> each request's
        images, in order, with their records. `on_step` hears of every step; every
        `preview_every` steps (0: never) it gets the batch's current x0 estimate as pixels.
        `vae_tiling="auto"` is decided here, for this machine now, and recorded as it ran."""
        from ember.compiled import find as find_compiled
        from ember.pipeline import Inputs, decode_latents, generate_batch, resolve_vae_tiling

        loaded = self.model
        params = [resolve_vae_tiling(loaded, self.prepare(r.params)) for r in requests]
        # previews come per prompt-length group: tiled if any image is
        tiled_previews = any(p.vae_tiling == "on" for p in params)
        inputs = [Inputs(_tensor(r.init_image), _tensor(r.mask)) for r in requests]

        def callback(i: int, total: int, x, denoised) -> None:
            if on_step is None:
                return
            previews = None
            if preview_every and (i + 1) % preview_every == 0 and i + 1 < total:
                pixels = decode_latents(loaded, denoised, self._preview_vae, tiled=tiled_previews)
                previews = list(tensor_to_uint8(pixels))
            on_step(i + 1, total, previews)

        loras = self.use_loras(lora_selection(params[0]))
        embeddings = [self._embeddings_used(p) for p in params]  # before any work: bad names
        refiner = self.use_refiner(params[0].refiner)
        ds = loaded.config.vae.downsample
        net = find_compiled(loaded, (params[0].height // ds, params[0].width // ds))
        calls = net.calls if net is not None else 0
        outputs = generate_batch(loaded, params, inputs, callback=callback, refiner=refiner)
        compiled = net.key.name if net is not None and net.calls > calls else None
        return [
            [GeneratedImage(pixels, self.record(p, r, n, loras, used, compiled), _inputs(r))
             for n, pixels in enumerate(tensor_to_uint8(images))]
            for p, r, images, used in zip(params, requests, outputs, embeddings, strict=True)
        ]  # fmt: skip

    def use_refiner(self, name: str | None):
        """The refiner model `name` (a path, or a name in the models folder), loaded in the
        service's dtype unless it is the one loaded already; None for none."""
        from ember.checkpoints import load_model

        if name is None:
            return None
        path = self.resolve_refiner(name)
        if self._refiner is None or Path(self._refiner.path).resolve() != path.resolve():
            self._refiner = None  # the old one is freed first
            self._refiner = load_model(path, dtype=self.dtype)
        return self._refiner

    def _embeddings_used(self, params: GenerationParams) -> tuple[dict, ...]:
        """The records of the embeddings a request's prompts name (EmberError for one that does
        not fit the model)."""
        from ember.embeddings import embeddings_used

        if self._embeddings is None:
            return ()
        from ember.pipeline import guided

        names = embeddings_used(params.prompt, self._embeddings)
        negative = params.negative_prompt if guided(params.cfg) else ""  # unused at cfg <= 1
        names += [n for n in embeddings_used(negative, self._embeddings) if n not in names]
        found = self._embeddings.embeddings
        return tuple(
            {"name": n, "path": found[n].path, "sha256": found[n].sha256,
             "a1111_hash": found[n].a1111_hash}
            for n in names
        )  # fmt: skip

    def record(
        self,
        params: GenerationParams,
        request: Request,
        index: int,
        loras: tuple[dict, ...] = (),
        embeddings: tuple[dict, ...] = (),
        compiled: str | None = None,
    ) -> ImageRecord:
        """The record of image `index` of a request: its own seed, batch 1, the model's and the
        LoRAs' hashes, and the sha256 of the input pixels the pipeline used."""
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
            loras=loras,
            embeddings=embeddings,
            vae_name=self._vae.name if self._vae else None,
            vae_path=self._vae_path,
            vae_sha256=self._vae.sha256 if self._vae else None,
            refiner=self._refiner_record(params),
            compiled_unet=compiled,
        )

    def _refiner_record(self, params: GenerationParams) -> dict | None:
        refiner = self._refiner
        if params.refiner is None or refiner is None:
            return None
        return {"name": refiner.name, "path": str(refiner.path), "sha256": refiner.sha256,
                "hash": refiner.short_hash}  # fmt: skip


def _resolve_model_path(name: str) -> Path:
    from ember.catalog import resolve_model_path

    return resolve_model_path(name)


def _inputs(request: Request) -> dict[str, np.ndarray]:
    named = {"init image": request.init_image, "mask": request.mask}
    return {k: v for k, v in named.items() if v is not None}


def _tensor(pixels: np.ndarray | None):
    return None if pixels is None else uint8_to_tensor(pixels)


def _sha(pixels: np.ndarray | None) -> str | None:
    import hashlib

    return (
        None
        if pixels is None
        else hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    )
