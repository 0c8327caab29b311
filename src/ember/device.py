"""Where the model runs and in which precision: the CPU's features and the weights' dtype."""

from __future__ import annotations

import functools

import torch

from ember.errors import EmberError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS); read
    once: the compiled-U-Net lookup asks on every generation."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str = "cpu") -> bool:
    """True where bf16 arithmetic runs in hardware: CUDA with bf16, or a CPU with AVX512-BF16 or
    AMX tiles. Elsewhere oneDNN emulates bf16, which is slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype for `name`: "fp32", "bf16", or "auto" (bf16 only where `native_bf16`).

    bf16 weights keep GroupNorm, softmax, the sampler and the VAE output in fp32; measured on the
    decoded image it stays >= 30 dB PSNR of fp32 (bench/results.md, tests/test_bf16.py).
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise EmberError(f"dtype {name!r} is not allowed: use auto, fp32 or bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (Linux' MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: int, what: str, dtype: torch.dtype) -> None:
    """EmberError when `need` bytes are more than this machine has free: a clear line before
    loading, rather than the kernel's OOM killer half-way through."""
    free = available_memory()
    if free is None or need <= free:
        return
    hint = " (--dtype bf16 halves it)" if dtype == torch.float32 else ""
    raise EmberError(
        f"{what} needs about {need / 2**30:.1f} GiB of memory in {dtype_name(dtype)}{hint}; this "
        f"machine has {free / 2**30:.1f} GiB available"
    )
