"""The server's view of the engine: models to choose from and one call that runs a batch of jobs.

The worker hands `Engine.run` a list of `WorkItem`s that share a batch key (same model, size, sampler,
schedule, steps, cfg, strength, mode); the engine returns uint8 pixels per item. Everything tensor
lives behind `ember.pipeline`; this module only converts arrays at the edge, as the CLI does.
Tests substitute any object with the same methods (see `Engine`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ember.settings import GenerationParams
from ember.errors import EmberError
from ember.images import ImageRecord

# on_step(step, total, previews): previews are (H, W, 3) uint8 per image of the batch, or None.
StepFn = Callable[[int, int, list[np.ndarray] | None], None]


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint the server can load, named as A1111 names it (`title` = "file [hash]")."""

    name: str
    path: str
    sha256: str
    short_hash: str

    @property
    def title(self) -> str:
        return f"{Path(self.path).name} [{self.short_hash}]"


@dataclass
class WorkItem:
    """One job's share of a U-Net batch: validated params and optional uint8 inputs."""

    job_id: str
    params: GenerationParams
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    init: np.ndarray | None = None  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W, 1) uint8, 255 = repaint
    model: str = ""  # ModelInfo.title the job asked for

    def batch_key(self) -> tuple:
        """Items with equal keys may share one U-Net batch without changing any image."""
        p = self.params
        return (self.model, self.mode, p.width, p.height, p.sampler, p.schedule, p.steps,
                p.cfg, p.strength, p.eta, p.clip_skip)  # fmt: skip

    def input_sha256(self) -> tuple[str | None, str | None]:
        def sha(a: np.ndarray | None) -> str | None:
            return None if a is None else hashlib.sha256(a.tobytes()).hexdigest()

        return sha(self.init), sha(self.mask)


class Engine(Protocol):
    """What the server needs from a model engine."""

    def models(self) -> list[ModelInfo]: ...
    def refresh(self) -> list[ModelInfo]: ...
    def current(self) -> ModelInfo: ...
    def select(self, title: str) -> ModelInfo: ...
    def validate(self, params: GenerationParams) -> GenerationParams: ...
    def native_size(self) -> int: ...
    def default_cfg(self) -> float: ...
    def default_layout_guidance(self) -> float: ...
    def run(self, items: list[WorkItem], on_step: StepFn) -> list[np.ndarray]: ...
    def record(self, item: WorkItem, index: int) -> ImageRecord: ...


def find_models(paths: list[Path]) -> list[ModelInfo]:
    """ModelInfos for files, folders of `.safetensors`, and diffusers folders, hashed (cached)."""
    from ember.checkpoints import file_hashes

    found: list[Path] = []
    for path in paths:
        if path.is_dir() and not (path / "model_index.json").exists():
            found += sorted(path.glob("*.safetensors"))
            found += sorted(p.parent for p in path.glob("*/model_index.json"))
        elif path.exists():
            found.append(path)
    out, seen = [], set()
    for path in found:
        sha, short = file_hashes(path)
        if str(path.resolve()) in seen:
            continue
        seen.add(str(path.resolve()))
        name = path.stem if path.is_file() else path.name
        out.append(ModelInfo(name, str(path), sha, short))
    return out


def generate_batch(loaded, requests: list[GenerationParams], inputs: list, callback=None) -> list:
    """One U-Net batch for compatible requests (each keeps its own prompt, seed and noise)."""
    from ember import pipeline

    return pipeline.generate_batch(loaded, requests, inputs, callback=callback)


class ModelEngine:
    """The real engine: one model loaded at a time, shared by every request."""

    def __init__(
        self,
        model_paths: list[Path],
        default: Path | None = None,
        *,
        dtype: str = "fp32",
        preview_every: int = 4,
    ) -> None:
        from ember.pipeline import dtype_name, resolve_dtype

        self._paths = model_paths
        self._dtype = dtype_name(resolve_dtype(dtype))  # "auto" resolved once: records say which
        self._preview_every = preview_every
        self._lock = threading.RLock()
        self._models = find_models(model_paths + ([default] if default else []))
        if not self._models:
            raise EmberError("no models found; pass --model FILE or put models in the models dir")
        chosen = self._models[0]
        if default is not None:
            chosen = next(m for m in self._models if Path(m.path).resolve() == default.resolve())
        self._loaded = None
        self._info = chosen
        self._load(chosen)

    def _load(self, info: ModelInfo) -> None:
        import torch

        from ember.checkpoints import load_model

        dtype = torch.bfloat16 if self._dtype == "bf16" else torch.float32
        self._loaded = None  # free the old weights before reading the new ones
        self._loaded = load_model(info.path, dtype=dtype)
        self._info = info

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def refresh(self) -> list[ModelInfo]:
        with self._lock:
            self._models = find_models(self._paths + [Path(self._info.path)])
        return self.models()

    def current(self) -> ModelInfo:
        return self._info

    def lookup(self, title: str) -> ModelInfo:
        for m in self._models:
            if title in (m.title, m.name, Path(m.path).name, m.short_hash, m.sha256):
                return m
        raise EmberError(f"unknown model {title!r}; see GET /sdapi/v1/sd-models")

    def select(self, title: str) -> ModelInfo:
        info = self.lookup(title)
        with self._lock:
            if info != self._info:
                self._load(info)
        return info

    def native_size(self) -> int:
        assert self._loaded is not None
        return self._loaded.config.size

    def default_cfg(self) -> float:
        assert self._loaded is not None
        return self._loaded.config.default_cfg

    def default_layout_guidance(self) -> float:
        assert self._loaded is not None
        return self._loaded.config.default_layout_guidance

    def validate(self, params: GenerationParams) -> GenerationParams:
        from ember.pipeline import validate

        return validate(params)

    def run(self, items: list[WorkItem], on_step: StepFn) -> list[np.ndarray]:
        """Generate every item of a compatible batch -> (B_i, H, W, 3) uint8 per item."""
        import torch

        from ember.images import tensor_to_uint8
        from ember.pipeline import Inputs, decode_latents

        with self._lock:
            if items[0].model and items[0].model != self._info.title:
                self._load(self.lookup(items[0].model))
            loaded = self._loaded

            def tensor(a: np.ndarray | None) -> torch.Tensor | None:
                if a is None:
                    return None
                return torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)[None]

            inputs = [Inputs(init_image=tensor(i.init), mask=tensor(i.mask)) for i in items]

            def callback(i: int, total: int, x, denoised) -> None:
                previews = None
                every = self._preview_every
                if every and (i + 1) % every == 0 and i + 1 < total:
                    previews = list(tensor_to_uint8(decode_latents(loaded, denoised)))
                on_step(i + 1, total, previews)

            outs = generate_batch(loaded, [i.params for i in items], inputs, callback=callback)
            return [tensor_to_uint8(o) for o in outs]

    def record(self, item: WorkItem, index: int) -> ImageRecord:
        import torch

        from ember import __version__

        init_sha, mask_sha = item.input_sha256()
        info = self._info
        return ImageRecord(
            params=dataclasses.replace(item.params, seed=item.params.seed + index, batch=1),
            model_name=info.name,
            model_path=info.path,
            model_sha256=info.sha256,
            model_hash=info.short_hash,
            ember_version=__version__,
            torch_version=torch.__version__,
            dtype=self._dtype,
            device="cpu",
            mode=item.mode,
            init_image_sha256=init_sha,
            mask_sha256=mask_sha,
        )
