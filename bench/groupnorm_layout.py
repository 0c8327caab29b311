"""GroupNorm on channels-last vs contiguous feature maps, per shape (why `GroupNorm32` reorders).

    .venv/bin/python bench/groupnorm_layout.py [--threads 1]

oneDNN convolutions return channels-last maps. PyTorch's CPU GroupNorm kernel is fast on those for
large maps but slow for small ones (few pixels, few channels per group), where copying to a
contiguous layout first wins. Prints microseconds per call (median of 5 rounds) for U-Net shapes
of ember-small (64x64 images) and SD 1.5 (512x512 images), fp32 and bf16.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(2, 64, 16, 16), (2, 128, 8, 8), (2, 128, 4, 4), (2, 640, 16, 16), (2, 1280, 8, 8),
          (2, 320, 32, 32), (2, 320, 64, 64), (1, 512, 64, 64)]  # fmt: skip


def per_call(f, n: int) -> float:
    for _ in range(3):
        f()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            f()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| shape (B, C, H, W) | dtype | channels-last (us) | contiguous() + norm (us) | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype).to(memory_format=torch.channels_last)
            w, b = torch.ones(shape[1]), torch.zeros(shape[1])
            n = max(5, int(2e6 // x.numel()))
            cl = per_call(lambda x=x, w=w, b=b: F.group_norm(x, 32, w, b, 1e-5), n)
            co = per_call(lambda x=x, w=w, b=b: F.group_norm(x.contiguous(), 32, w, b, 1e-5), n)
            name = str(dtype).removeprefix("torch.")
            print(f"| {shape} | {name} | {cl:.1f} | {co:.1f} | {cl / co:.2f} |")


if __name__ == "__main__":
    main()
