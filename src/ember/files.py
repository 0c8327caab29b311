"""File helpers every part of ember shares: one way to hash a file, one way to write atomically."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(*paths: str | Path, skip: int = 0) -> str:
    """Hex sha256 of the bytes of `paths`, read in order (several files hash as one stream),
    each from byte `skip` on."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            f.seek(skip)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | Path]) -> str:
    return sha256_file(*paths)


def safetensors_data_sha256(path: str | Path) -> str:
    """sha256 of a `.safetensors` file's tensor data, after its JSON header: the hash A1111 shows
    for LoRAs and embeddings ("addnet" hash), unchanged by edits to the metadata."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return sha256_file(path, skip=8 + header)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; on success it replaces `path` (fsynced), so readers
    see the old file or the new one, never a mix, and a kill mid-write leaves the old file intact.
    On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` by `data` atomically (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
