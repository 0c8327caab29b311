"""Training data in memory: images as one uint8 tensor, captions, and the licence facts.

`ember.data.folder.load_dataset` reads and licence-checks the folder (docs/datasets.md); here
the usable images are decoded once into an (N, 3, S, S) uint8 tensor (a 64x64 dataset of 50k
images is 600 MB), so no DataLoader workers are needed. Unreadable images are counted for the
model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.data.folder import DatasetError, _crop_resize, load_dataset
from ember.train.config import EmberError


@dataclass
class TrainData:
    """Images (N, 3, S, S) uint8 and per-image caption variants."""

    images: torch.Tensor
    captions: list[list[str]]
    sources: list[dict[str, Any]] = field(default_factory=list)  # licence summary for the card
    unlicensed: int = 0
    skipped_corrupt: int = 0
    path: str = ""
    files: list[str] = field(default_factory=list)  # each image's path in the dataset

    def __len__(self) -> int:
        return self.images.shape[0]


def load_train_data(path: str | Path, size: int, allow_unlicensed: bool) -> TrainData:
    """Load a dataset folder (`ember.data.folder.load_dataset`) into memory at `size` pixels."""
    try:
        ds = load_dataset(path, allow_unlicensed=allow_unlicensed)
    except DatasetError as exc:
        raise EmberError(str(exc)) from None
    images, captions, files, corrupt = [], [], [], len(ds.skipped)
    for i in range(len(ds)):
        try:
            image = ds.load_image(i)
        except Exception:  # noqa: BLE001 - verify() passed but decoding failed: still corrupt
            corrupt += 1
            continue
        if image.shape[:2] != (size, size):
            image = _crop_resize(image, size)
        images.append(image)
        captions.append(list(ds[i].captions))
        files.append(ds[i].file)
    if not images:
        raise EmberError(f"no readable images in {path} ({corrupt} corrupt)")
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    return TrainData(
        images=tensor,
        captions=captions,
        sources=ds.licence_summary(),
        unlicensed=ds.unlicensed_count,
        skipped_corrupt=corrupt,
        path=str(path),
        files=files,
    )


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
