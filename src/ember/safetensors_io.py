"""safetensors files: a validated read (the header checked against the file's size) and an atomic write.

Every model file ember reads or writes goes through here, single files and diffusers folders alike.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ember.errors import EmberError
from ember.files import atomic_path

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header against its size; return the parsed header.

    safetensors' own errors are terse; this names the problem so a user knows the file is at fault.
    """
    path = Path(path)
    if not path.exists():
        raise EmberError(f"model file not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise EmberError(
            f"{path.name} is a pickled checkpoint, which can run arbitrary code when loaded; ember "
            f"reads only .safetensors. Convert it safely with: ember convert {path} OUT.safetensors"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EmberError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EmberError(f"{path}: not a safetensors file or truncated (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EmberError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EmberError(f"{path}: not a safetensors file (header is not a JSON object)")
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise EmberError(f"{path}: malformed safetensors metadata (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise EmberError(f"{path}: malformed safetensors entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= data_len:
            raise EmberError(
                f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                f"{data_len}); the file is truncated or corrupt"
            )
        if end - begin != count * width:
            raise EmberError(f"{path}: tensor {name!r} size does not match its shape and dtype")
        spans.append((begin, end))
    spans.sort()
    for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise EmberError(f"{path}: overlapping tensors in safetensors header")
    return header


def memory_to_load(paths: list[Path], width: int) -> int:
    """Bytes of memory loading these files' tensors takes at most, floats converted to `width`
    bytes each, one tensor at a time (so the larger of the file's size and the converted size)."""
    stored = converted = 0
    for path in paths:
        for name, info in check_safetensors(path).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            stored += end - begin
            count = (end - begin) // SAFETENSORS_DTYPES[info["dtype"]]
            converted += count * width if info["dtype"].startswith(("F", "BF")) else end - begin
    return max(stored, converted)


TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


def read_safetensors(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated read of all tensors and the string metadata.

    With `dtype`, floating-point tensors are converted to it as they are read, one at a time, from
    plain reads rather than a memory map: loading then holds the converted weights and one tensor
    more, not the whole file's mapped pages beside them (an fp16 SDXL file loaded as bf16 peaked
    at about twice its size the other way; bench/sdxl_load_memory.py).
    """
    header = check_safetensors(path)
    if dtype is not None:
        return _read_converted(Path(path), header, dtype), dict(header.get("__metadata__") or {})
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except SafetensorError as exc:  # what check_safetensors does not cover, e.g. unreadable bytes
        raise EmberError(f"{path}: unreadable safetensors file ({exc})") from None
    return tensors, dict(header.get("__metadata__") or {})


def _read_converted(path: Path, header: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(x) for x in info["data_offsets"])
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if end > begin and f.readinto(memoryview(raw.numpy())) != end - begin:
                raise EmberError(f"{path}: tensor {name!r} could not be read in full")
            tensor = raw.view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            tensors[name] = tensor
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    """Write atomically (`ember.files.atomic_path`): a kill mid-write leaves the old file intact."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
