"""Merge several ember dataset folders into one, keeping every item's licence and source.

The merged folder links to the sources (no image is copied) and, when every source has the fast
`images.npy` array, writes one concatenated array so training reads a single memory map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ember.data.folder import ARRAY_FILE, LICENCE_FILES, MANIFEST
from ember.errors import EmberError


def _folder_licence(src: Path) -> dict | None:
    for name in LICENCE_FILES:
        if (src / name).exists():
            return json.loads((src / name).read_text())
    return None


def merge_datasets(
    out: str | Path, sources: list[str | Path], max_captions: int | None = None
) -> Path:
    """Write `out` with a manifest over all `sources` (each linked as `out/<i>-<name>`).

    `max_captions` keeps only each item's first N caption variants (fewer texts to encode).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EmberError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    arrays, rows, parts = [], [], []
    for i, src in enumerate(Path(s).resolve() for s in sources):
        if not (src / MANIFEST).exists():
            raise EmberError(f"{src} is not an ember dataset (no {MANIFEST})")
        link = f"{i}-{src.name}"
        os.symlink(src, out / link)
        default = _folder_licence(src)
        count = 0
        with open(src / MANIFEST) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                row["file"] = f"{link}/{row['file']}"
                if max_captions is not None and isinstance(row.get("caption"), list):
                    row["caption"] = row["caption"][:max_captions]
                if "license" not in row and default is not None:
                    row["license"] = default.get("spdx")
                    row.setdefault("source", default.get("source", ""))
                    row.setdefault("attribution", default.get("attribution", ""))
                rows.append(row)
                count += 1
        array = src / ARRAY_FILE
        arrays.append(np.load(array, mmap_mode="r") if array.exists() else None)
        if arrays[-1] is not None and len(arrays[-1]) != count:
            raise EmberError(f"{array} has {len(arrays[-1])} rows for {count} manifest lines")
        parts.append({"source": str(src), "items": count})
    with open(out / MANIFEST, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    shapes = {a.shape[1:] for a in arrays if a is not None}
    if arrays and all(a is not None for a in arrays) and len(shapes) == 1:
        merged = np.lib.format.open_memmap(
            out / ARRAY_FILE, mode="w+", dtype=np.uint8, shape=(len(rows), *shapes.pop())
        )
        at = 0
        for a in arrays:
            merged[at : at + len(a)] = a
            at += len(a)
        merged.flush()
    (out / "dataset.json").write_text(
        json.dumps({"name": out.name, "merged": parts}, indent=2) + "\n"
    )
    return out
