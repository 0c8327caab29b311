"""Helpers for the server tests: a fast stand-in engine, a tiny real model, and app factories.

`FakeEngine` implements `ember.server.engine.Engine` without a network: each image is seeded noise,
so server behaviour (queue, batching, auth, limits, durability) is tested in milliseconds. The real
engine is exercised by the tests that use `tiny_model_path`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from ember.config import PRESETS, ModelConfig
from ember.errors import EmberError
from ember.images import ImageRecord
from ember.server.engine import ModelInfo, WorkItem
from ember.service import GeneratedImage
from ember.settings import GenerationParams, lora_selection


class FakeEngine:
    """Deterministic images from seeds; `step_delay` seconds per step; records every batch.

    Steps wait while `gate` is clear, so a test can hold the worker mid-job without timing.
    """

    def __init__(
        self, step_delay: float = 0.0, size: int = 64, guidance: float = 7.0, layout: float = 0.0
    ) -> None:
        self.step_delay = step_delay
        self.size = size
        self.guidance = guidance
        self.layout = layout
        self.batches: list[list[str]] = []
        self._models = [
            ModelInfo("fake-a", "/models/fake-a.safetensors", "a" * 64, "a" * 10),
            ModelInfo("fake-b", "/models/fake-b.safetensors", "b" * 64, "b" * 10),
        ]
        self._current = self._models[0]
        self._vae: str | None = None
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def refresh(self) -> list[ModelInfo]:
        return self.models()

    def current(self) -> ModelInfo:
        return self._current

    def select(self, title: str) -> ModelInfo:
        for m in self._models:
            if title in (m.title, m.name):
                self._current = m
                return m
        raise EmberError(f"unknown model {title!r}")

    def config(self) -> ModelConfig:
        """A stand-in model config: what the server reads for its defaults."""
        return dataclasses.replace(
            PRESETS["tiny"], size=self.size, guidance=self.guidance, layout_guidance=self.layout
        )

    def loras(self) -> dict[str, Path]:
        return {"style": Path("/loras/style.safetensors")}

    def refresh_loras(self) -> dict[str, Path]:
        return self.loras()

    def vaes(self) -> dict[str, Path]:
        return {"taesd": Path("/vae/taesd")}

    def current_vae(self) -> str | None:
        return self._vae

    def select_vae(self, name: str | None) -> None:
        if name is not None and name not in self.vaes():
            raise EmberError(f"unknown VAE {name!r}")
        self._vae = name

    def check_loras(self, params: GenerationParams) -> None:
        for choice in lora_selection(params):
            if choice.name not in self.loras():
                raise EmberError(f"LoRA not found: {choice.name}")

    def run(self, items: list[WorkItem], on_step) -> list[list[GeneratedImage]]:
        self.batches.append([i.job_id for i in items])
        p = items[0].params
        for step in range(p.steps):
            self.gate.wait(timeout=30)
            time.sleep(self.step_delay)
            n = sum(i.params.batch for i in items)
            previews = [np.zeros((p.height, p.width, 3), np.uint8)] * n if step % 2 else None
            on_step(step + 1, p.steps, previews)
        return [
            [
                GeneratedImage(pixels, self.record(i, k))
                for k, pixels in enumerate(self.pixels(i.params))
            ]
            for i in items
        ]

    @staticmethod
    def pixels(params: GenerationParams) -> np.ndarray:
        out = []
        for k in range(params.batch):
            rng = np.random.default_rng(params.seed + k)
            out.append(rng.integers(0, 256, (params.height, params.width, 3), dtype=np.uint8))
        return np.stack(out)

    def record(self, item: WorkItem, index: int) -> ImageRecord:
        info = self._current
        return ImageRecord(
            params=dataclasses.replace(item.params, seed=item.params.seed + index, batch=1),
            model_name=info.name, model_path=info.path, model_sha256=info.sha256,
            model_hash=info.short_hash, ember_version="test", torch_version="none",
            dtype="fp32", device="cpu", mode=item.mode,
        )  # fmt: skip


def make_settings(data_dir: Path, **kw):
    from ember.server.app import Settings

    kw.setdefault("batch_window", 0.0)
    return Settings(data_dir=data_dir, **kw)


def transformers_initialised_clip(cfg):
    """ember's CLIP encoder holding the weights transformers' `CLIPTextModel` draws from the
    global generator, drawn exactly as it does (ember's CLIP was that class when the references in
    tests/data/same-images were made and the tiny models' fp32 batching was checked; the U-Net's
    weights come from the generator after it)."""
    import torch
    from transformers import CLIPTextModel

    from ember.models.text import build_text_encoder, clip_text_config

    drawn = CLIPTextModel(clip_text_config(cfg)).state_dict()
    with torch.device("meta"):
        encoder = build_text_encoder(cfg)
    encoder.transformer.text_model.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in drawn.items()}, strict=True, assign=True
    )
    return encoder


def make_tiny_model(path: Path) -> Path:
    """A tiny random-weight single-file model (preset `tiny`, 64x64)."""
    import torch

    from ember.checkpoints import LoadedModel, save_single_file
    from ember.config import get_preset
    from ember.models.ldm import LatentDiffusion
    from ember.models.tokenizer import build_tokenizer

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, transformers_initialised_clip(cfg.text)).eval()
    loaded = LoadedModel(model, build_tokenizer(cfg.text), cfg, str(path), "tiny", "", "")
    save_single_file(loaded, path)
    return path


def wait_for(fn, timeout: float = 20.0, interval: float = 0.02):
    """Poll `fn` until it returns something truthy."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    data_dir: Path,
    *,
    model: Path | None = None,
    step_delay: float = 0.0,
    queue: str | None = None,
    lease: float = 30.0,
):
    """`ember serve` in a subprocess (real engine with `model`, else FakeEngine) -> (proc, url);
    `queue` a shared queue's URL, `lease` its lease in seconds."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [sys.executable, __file__, str(data_dir), str(port), str(model or ""), str(step_delay),
           queue or "", str(lease)]  # fmt: skip
    # the tests folder for this module, and whatever PYTHONPATH names the ember being tested
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, interval=0.1)
    return proc, url


def _serve(data_dir: str, port: str, model: str, step_delay: str, queue: str, lease: str) -> None:
    import uvicorn

    from ember.server.app import create_app
    from ember.server.engine import ModelEngine

    engine = (
        ModelEngine([], Path(model), preview_every=2) if model else FakeEngine(float(step_delay))
    )
    settings = make_settings(
        Path(data_dir), batch_window=0.02, queue=queue or None, lease=float(lease)
    )
    uvicorn.run(create_app(settings, engine), host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    import sys

    _serve(*sys.argv[1:7])
