"""The server's view of the engine: models to choose from and one call that runs a batch of jobs.

The worker hands `Engine.run` a list of `WorkItem`s that share a batch key (same model, mode and
every setting `ember.settings` marks as shared); the engine returns each item's images with their
records. `ModelEngine` is `ember.service.GenerationService` plus the catalog of models the server
offers; tests substitute any object with the same methods (see `Engine`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ember.catalog import (
    ModelInfo,
    find_loras,
    find_models,
    find_vaes,
    lookup,
    resolve_lora_path,
    vae_dir,
)
from ember.config import ModelConfig
from ember.errors import EmberError
from ember.service import GeneratedImage, GenerationService, Request, StepFn
from ember.settings import GenerationParams, batch_key, lora_selection

__all__ = ["Engine", "ModelEngine", "ModelInfo", "WorkItem"]


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
        return (self.model, self.mode, *batch_key(self.params))

    def request(self) -> Request:
        return Request(self.params, self.init, self.mask)


class Engine(Protocol):
    """What the server needs from a model engine."""

    def models(self) -> list[ModelInfo]: ...
    def refresh(self) -> list[ModelInfo]: ...
    def current(self) -> ModelInfo: ...
    def select(self, title: str) -> ModelInfo: ...
    def config(self) -> ModelConfig: ...
    def loras(self) -> dict[str, Path]: ...
    def refresh_loras(self) -> dict[str, Path]: ...
    def check_loras(self, params: GenerationParams) -> None: ...
    def vaes(self) -> dict[str, Path]: ...
    def current_vae(self) -> str | None: ...
    def select_vae(self, name: str | None) -> None: ...
    def run(self, items: list[WorkItem], on_step: StepFn) -> list[list[GeneratedImage]]: ...


class ModelEngine:
    """The real engine: one model loaded at a time, shared by every request."""

    def __init__(
        self,
        model_paths: list[Path],
        default: Path | None = None,
        *,
        dtype: str = "fp32",
        preview_every: int = 4,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        vae: Path | None = None,
        preview_vae: Path | None = None,
    ) -> None:
        self._paths = model_paths
        self._vae = vae
        self._vae_dir = vae_dir()
        self._service = GenerationService(
            dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir, preview_vae=preview_vae
        )
        self._loras = find_loras(self._service.lora_dir)
        # A request's refiner is a model of the catalog, never a path it names.
        self._service.resolve_refiner = lambda name: Path(lookup(self._models, name).path)
        self._preview_every = preview_every
        self._lock = threading.RLock()
        self._models = find_models(model_paths + ([default] if default else []))
        if not self._models:
            raise EmberError("no models found; pass --model FILE or put models in the models dir")
        chosen = self._models[0]
        if default is not None:
            chosen = next(m for m in self._models if Path(m.path).resolve() == default.resolve())
        self._load(chosen)

    def vaes(self) -> dict[str, Path]:
        """The replacement VAEs of the VAE folder, by name (and a `--vae` given at start)."""
        found = find_vaes(self._vae_dir)
        if self._vae is not None:
            found.setdefault(Path(self._vae).stem, Path(self._vae))
        return found

    def current_vae(self) -> str | None:
        """The name of the replacement VAE in use; None: each model's own."""
        if self._vae is None:
            return None
        return next((n for n, p in self.vaes().items() if str(p) == str(self._vae)), None)

    def select_vae(self, name: str | None) -> None:
        """Use the VAE `name` of `vaes()` for every model; None: each model's own."""
        path = None
        if name is not None:
            found = self.vaes()
            if name not in found:
                names = ", ".join(found) or "none"
                raise EmberError(f"unknown VAE {name!r}; in {self._vae_dir}: {names}")
            path = found[name]
        with self._lock:
            self._service.use_vae(path)
            self._vae = path

    def _load(self, info: ModelInfo) -> None:
        self._service.load(info.path, vae=self._vae)
        self._info = info

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def refresh(self) -> list[ModelInfo]:
        with self._lock:
            self._models = find_models(self._paths + [Path(self._info.path)])
        return self.models()

    def current(self) -> ModelInfo:
        return self._info

    def select(self, title: str) -> ModelInfo:
        info = lookup(self._models, title)
        with self._lock:
            if info != self._info:
                self._load(info)
        return info

    def config(self) -> ModelConfig:
        return self._service.model.config

    def loras(self) -> dict[str, Path]:
        """The LoRAs of the LoRA folder, by name (as of the last refresh)."""
        return dict(self._loras)

    def refresh_loras(self) -> dict[str, Path]:
        self._loras = find_loras(self._service.lora_dir)
        return self.loras()

    def check_loras(self, params: GenerationParams) -> None:
        """EmberError (a 4xx) for a LoRA or a refiner the request names that is not there."""
        for choice in lora_selection(params):
            resolve_lora_path(choice.name, self._service.lora_dir)
        if params.refiner is not None:
            lookup(self._models, params.refiner)

    def run(self, items: list[WorkItem], on_step: StepFn) -> list[list[GeneratedImage]]:
        """Generate every item of a compatible batch -> each item's images with their records."""
        with self._lock:
            if items[0].model and items[0].model != self._info.title:
                self._load(lookup(self._models, items[0].model))
            return self._service.generate(
                [i.request() for i in items], on_step, preview_every=self._preview_every
            )
