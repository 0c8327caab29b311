"""ember's common on-disk dataset format: a folder with ``manifest.jsonl`` and images.

Every source (shapes world, emoji, a user's own folder) is written in this one format, described in
``docs/datasets.md``. Licences are enforced here: an item without a licence (its own ``license``
field or the folder's ``LICENSE.json``) is refused unless the caller explicitly allows it, and then
it is counted so the model card can say so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
LICENCE_FILES = ("LICENSE.json", "license.json")
ARRAY_FILE = "images.npy"  # optional (N, H, W, 3) uint8, row i = manifest line i
UNLICENSED = "unlicensed"


class DatasetError(ValueError):
    """A dataset folder that cannot be used as it stands (bad manifest, missing licences)."""


@dataclass(frozen=True)
class Licence:
    spdx: str
    source: str = ""
    attribution: str = ""


@dataclass
class Item:
    file: str  # relative to the dataset root
    captions: list[str]
    licence: Licence | None
    meta: dict = field(default_factory=dict)  # every other manifest field, e.g. shapes' ``truth``
    row: int = 0  # line number in the manifest (= row of images.npy)


class Dataset:
    """The usable items of a dataset folder, with what was skipped and how it is licensed."""

    def __init__(
        self,
        root: Path,
        items: list[Item],
        skipped: list[dict],
        unlicensed_count: int,
        array: np.ndarray | None = None,
    ):
        self.root = root
        self.items = items
        self.skipped = skipped  # [{"file", "error"}] for unreadable images
        self.unlicensed_count = unlicensed_count
        self.array = array

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def load_image(self, i: int) -> np.ndarray:
        """Item ``i`` as (H, W, 3) uint8; transparent images are composited onto white."""
        item = self.items[i]
        if self.array is not None:
            return np.array(self.array[item.row])  # a writable copy of the memory-mapped row
        with Image.open(self.root / item.file) as img:
            return to_rgb(img)

    def licence_summary(self) -> list[dict]:
        """[{spdx, attribution, count, sources, example_sources}] grouped by licence and credit line.

        Model cards list this; per-file sources (one per emoji) are counted, with a few examples.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        for it in self.items:
            lic = it.licence or Licence(UNLICENSED)
            groups.setdefault((lic.spdx, lic.attribution), []).append(lic.source)
        rows = []
        for (spdx, attribution), sources in groups.items():
            distinct = list(dict.fromkeys(sources))
            rows.append({"spdx": spdx, "attribution": attribution, "count": len(sources),
                         "sources": len(distinct), "example_sources": distinct[:3]})  # fmt: skip
        return sorted(rows, key=lambda r: -r["count"])


def to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8, alpha composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.array(img.convert("RGB"))


def _read_licence(row: dict) -> Licence | None:
    spdx = row.get("license") or row.get("spdx")
    if not spdx:
        return None
    return Licence(str(spdx), str(row.get("source", "")), str(row.get("attribution", "")))


def _read_manifest(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or "file" not in row or "caption" not in row:
            raise DatasetError(f"{path}:{n}: each line needs 'file' and 'caption'")
        rows.append(row)
    return rows


def load_dataset(path: str | Path, allow_unlicensed: bool = False) -> Dataset:
    """Read a dataset folder in ember's format.

    Each item's licence is its own ``license``/``source``/``attribution`` fields, else the folder's
    ``LICENSE.json`` (``{"spdx", "source", "attribution"}``). Items with neither are refused with a
    ``DatasetError`` unless ``allow_unlicensed``, in which case they are kept and counted in
    ``unlicensed_count``. Unreadable images are logged, skipped and listed in ``skipped``. When an
    ``images.npy`` array with one row per manifest line is present, it is used instead of the files.
    """
    root = Path(path)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DatasetError(f"{root} has no {MANIFEST}; see docs/datasets.md for the format")
    rows = _read_manifest(manifest)
    default = None
    for name in LICENCE_FILES:
        if (root / name).is_file():
            default = _read_licence(json.loads((root / name).read_text()))
            break

    items = []
    for n, row in enumerate(rows):
        captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{manifest}:{n + 1}: 'caption' must be a string or list of strings")
        meta = {
            k: v
            for k, v in row.items()
            if k not in ("file", "caption", "license", "spdx", "source", "attribution")
        }
        items.append(Item(row["file"], captions, _read_licence(row) or default, meta, n))

    unlicensed = [it.file for it in items if it.licence is None]
    if unlicensed and not allow_unlicensed:
        raise DatasetError(
            f"{len(unlicensed)} of {len(items)} items have no licence (no 'license' field and no "
            f"LICENSE.json in {root}), e.g. {', '.join(unlicensed[:5])}; add licences, or pass "
            "allow_unlicensed=True (--allow-unlicensed) to train on them and record it"
        )

    array = None
    if (root / ARRAY_FILE).is_file():
        array = np.load(root / ARRAY_FILE, mmap_mode="r")
        if array.ndim != 4 or array.shape[0] != len(rows) or array.shape[-1] != 3:
            log.warning("%s: ignoring %s of shape %s", root, ARRAY_FILE, array.shape)
            array = None

    skipped: list[dict] = []
    if array is None:  # the files are the data: check each one can be decoded
        kept = []
        for it in items:
            try:
                with Image.open(root / it.file) as img:
                    img.verify()
                kept.append(it)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                log.warning("%s: unreadable image %s (%s); skipping it", root, it.file, e)
                skipped.append({"file": it.file, "error": str(e)})
        items = kept
    if skipped:
        log.warning("%s: skipped %d of %d images as unreadable", root, len(skipped), len(rows))
    n_unlicensed = sum(it.licence is None for it in items)
    return Dataset(root, items, skipped, n_unlicensed, array)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """(image (3, H, W) float in [-1, 1], caption) pairs for training.

    Items with several captions get one chosen at random from ``(seed, epoch, index)``, so a given
    index always yields the same caption within an epoch; set ``epoch`` to vary it across epochs.
    Images are centre-cropped to square and resized to ``size`` when given and different.
    """

    def __init__(self, dataset: Dataset, size: int | None = None, seed: int = 0):
        self.dataset = dataset
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        captions = self.dataset[i].captions
        rng = np.random.default_rng((self.seed, self.epoch, i))
        caption = captions[int(rng.integers(len(captions)))]
        image = self.dataset.load_image(i)
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            image = _crop_resize(image, self.size)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # (3, H, W)
        return x / 127.5 - 1.0, caption


def _crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(image[top : top + s, left : left + s])
    return np.array(img.resize((size, size), Image.Resampling.LANCZOS))
