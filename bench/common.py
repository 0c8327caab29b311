"""What the speed, cold-start and profile benchmarks share: the machine line, the `ember generate`
command they time, one U-Net pass's inputs and FLOPs, and writing a markdown report.

Imported by sibling scripts (`python bench/X.py` puts bench/ on sys.path); torch is imported
lazily so that a driver process stays small.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """CPU model, cores, the ISA flags that decide ember's dtype, RAM, versions and load."""
    cpu = "unknown CPU"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores ({' '.join(isa)}), {mem:.0f} GiB RAM; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


def generate_command(prompt: str, model: str, out: str | Path, *, dtype: str = "auto",
                     steps: int | None = None) -> list[str]:  # fmt: skip
    """`python -m ember.cli generate ...`: what a user's first image runs, cold start included."""
    cmd = [sys.executable, "-m", "ember.cli", "generate", prompt, "--model", str(model),
           "--dtype", dtype, "-q", "-o", str(out)]  # fmt: skip
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return cmd


def threads_env(threads: int) -> dict[str, str]:
    """The environment for a CLI child limited to `threads` OpenMP threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def unet_inputs(cfg, size: int, dtype=None):
    """(x, t, context) of one U-Net pass on a cond+uncond batch of 2, as sampling with cfg runs it."""
    import torch

    h = size // cfg.vae.downsample
    x = torch.randn(2, cfg.unet.in_channels, h, h, dtype=dtype)  # (2, C, h, h)
    length = 77 if cfg.text.kind == "clip" else cfg.text.max_length
    ctx = torch.randn(2, length, cfg.unet.context_dim, dtype=dtype)  # (2, L, D)
    return x, torch.full((2,), 500.0, dtype=dtype), ctx


def count_flops(cfg, size: int) -> dict[str, int]:
    """FLOPs of one U-Net pass on a cond+uncond batch and one VAE decode, counted on the meta
    device (shapes only: no weights, no arithmetic, and the plain conv path the counter knows)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ember.models.unet import UNetModel
    from ember.models.vae import AutoencoderKL

    with torch.device("meta"), torch.no_grad():
        unet, vae = UNetModel(cfg.unet), AutoencoderKL(cfg.vae)
        x, t, ctx = unet_inputs(cfg, size)
        with FlopCounterMode(display=False) as fc:
            unet(x, t, ctx)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(x[:1, : cfg.vae.embed_dim])
        return {"unet": unet_flops, "vae": fc.get_total_flops()}


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes: `VmRSS`, or `VmHWM`, the peak RSS of this process's
    own address space (`ru_maxrss` is carried across fork + exec, so a worker started by a large
    parent would report the parent's size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_report(text: str, out: Path | None) -> None:
    """Write the markdown to `out` (and name it), or print it."""
    if out:
        out.write_text(text)
        print(out)
    else:
        print(text)


def spawn_worker(python: str, script: str, *lead: str, **kw) -> dict:
    """Run `script` under `python` as a worker (`--name value` per keyword; True is a bare flag,
    a list several values, None and False nothing) with bench/ on its path; the JSON object on
    the last line of its stdout."""
    import json
    import subprocess

    cmd = [python, script, *lead]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        if v is True:
            cmd.append(flag)
        elif isinstance(v, list):
            cmd += [flag, *map(str, v)]
        elif v is not None and v is not False:
            cmd += [flag, str(v)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"worker failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
