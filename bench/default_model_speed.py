"""Warm latency of the bundled default model: one 64x64 image, 20 steps DPM++ 2M, cfg 7.

Loads the shipped file once per dtype, makes one warm-up image, then times --images images and
prints the median and each time. Usage: python bench/default_model_speed.py [--threads 2] [--images 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ember.checkpoints import load_model
from ember.cli import DEFAULT_MODEL
from ember.config import GenerationParams
from ember.pipeline import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = GenerationParams(prompt="a slice of pizza, twemoji style", sampler="dpmpp_2m",
                              steps=20, cfg=7.0, width=64, height=64, batch=1, seed=0)  # fmt: skip
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_model(str(DEFAULT_MODEL), dtype=dtype)
        generate(loaded, params)  # warm-up
        times = []
        for _ in range(a.images):
            t = time.perf_counter()
            generate(loaded, params)
            times.append(time.perf_counter() - t)
        print(
            f"{name}: median {statistics.median(times):.3f} s  ({', '.join(f'{t:.3f}' for t in times)})"
        )


if __name__ == "__main__":
    main()
