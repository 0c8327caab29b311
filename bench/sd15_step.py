"""Seconds per sampling step (one cond+uncond U-Net pass) of the SD 1.5 architecture at 512x512.

    .venv/bin/python bench/sd15_step.py [--size 512] [--reps 3] [--threads 2]

Random weights of the exact architecture; fp32 and bf16 (bf16 only where the CPU has it natively).
Prints the median of --reps passes after one warm-up, per dtype.
"""

import argparse
import platform
import statistics
import time

import torch

from ember.config import get_preset
from ember.device import native_bf16
from ember.models.unet import UNetModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset("sd15").unet
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False)
    h = args.size // 8
    x = torch.randn(2, 4, h, h)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, cfg.context_dim)
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    )
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    for dtype in dtypes:
        model = unet.to(dtype)
        times = []
        with torch.no_grad():
            for i in range(args.reps + 1):
                start = time.perf_counter()
                model(x.to(dtype), t.to(dtype), ctx.to(dtype))
                if i:
                    times.append(time.perf_counter() - start)
        print(f"SD 1.5 {args.size}x{args.size} {dtype}: {statistics.median(times):.2f} s per cfg step "
              f"(median of {args.reps})")  # fmt: skip


if __name__ == "__main__":
    main()
