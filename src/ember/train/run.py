"""Entry points: `ember train vae|unet` (also `python -m ember.train vae|unet`, torchrun-ready).

`run_train_vae(cfg, hooks)` / `run_train_unet(cfg, hooks)` return a process exit code:
0 done (or stopped by a signal after saving), 2 bad input, 3 diverged (non-finite losses).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ember.config import ModelConfig, get_preset
from ember.train.card import build_card, write_card
from ember.train.config import EmberError, TrainConfig, parse_train_args
from ember.train.data import TrainData, load_train_data
from ember.train.loop import (
    EXIT_DIVERGED,
    Dist,
    TrainHooks,
    TrainingDiverged,
    TrainTask,
    init_dist,
    run_training,
    set_threads,
)

TaskBuilder = Callable[[TrainConfig, object, TrainData, Dist], TrainTask]


def with_text_layer(mcfg: ModelConfig, text_layer: str) -> ModelConfig:
    """`mcfg` reading the text encoder at `text_layer` ("last", "penultimate", "N"; "" = as is)."""
    if not text_layer:
        return mcfg
    layer: str | int = int(text_layer) if text_layer.strip().isdigit() else text_layer.strip()
    try:
        text = dataclasses.replace(mcfg.text, layer=layer)
    except ValueError as exc:
        raise EmberError(f"--text-layer: {exc}") from None
    return dataclasses.replace(mcfg, text=text)


def _run(
    cfg: TrainConfig, build: TaskBuilder, task_name: str, hooks: TrainHooks | None = None
) -> int:
    d = init_dist()
    try:
        set_threads(cfg, d)
        mcfg = with_text_layer(get_preset(cfg.preset), cfg.text_layer)
        data = load_train_data(cfg.data, cfg.image_size or mcfg.size, cfg.allow_unlicensed)
        task = build(cfg, mcfg, data, d)
        progress, final = run_training(task, cfg, d, hooks)
        if d.is_main:
            export = task.finish(final, Path(cfg.run_dir))
            card = build_card(
                task=task_name,
                model_config=json.loads(task.model_config.to_json()),
                train_config=json.loads(cfg.to_json()),
                data=data,
                progress=progress,
                world=d.world,
                device=d.device.type,
                bf16=bool(progress.extra.get("bf16")),
                export=export,
                cache_seconds=getattr(task, "cache_seconds", None),
            )
            write_card(Path(cfg.run_dir), card)
            print(f"done: {export.get('export')}", file=sys.stderr)
        d.barrier()
        return 0
    except EmberError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except SystemExit as exc:  # signal-triggered stop after a checkpoint
        return int(exc.code or 0)
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _build_vae(cfg: TrainConfig, mcfg, data: TrainData, d: Dist) -> TrainTask:
    from ember.train.vae import VAETask

    return VAETask(cfg, mcfg, data, d.device)


def _build_unet(cfg: TrainConfig, mcfg, data: TrainData, d: Dist) -> TrainTask:
    from ember.train.unet import UNetTask

    if not cfg.vae:
        raise EmberError("--vae PATH is required (a VAE from `ember train vae`)")
    return UNetTask(cfg, mcfg, data, d)


def run_train_vae(cfg: TrainConfig, hooks: TrainHooks | None = None) -> int:
    return _run(cfg, _build_vae, "vae", hooks)


def run_train_unet(cfg: TrainConfig, hooks: TrainHooks | None = None) -> int:
    return _run(cfg, _build_unet, "unet", hooks)


def _main(argv: list[str] | None, task: str, run: Callable[[TrainConfig], int]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = parse_train_args(argv, task)
    except EmberError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


def main_train_vae(argv: list[str] | None = None) -> int:
    """`ember train vae DATA RUN_DIR [options]`."""
    return _main(argv, "vae", run_train_vae)


def main_train_unet(argv: list[str] | None = None) -> int:
    """`ember train unet DATA RUN_DIR --vae PATH [options]`."""
    return _main(argv, "unet", run_train_unet)
