"""Warm latency of the bundled default model: one 64x64 image, 20 steps DPM++ 2M, cfg 7.

Loads the shipped file once per dtype, makes one warm-up image, then times --images images and
prints the median and each time. Usage: python bench/default_model_speed.py [--threads 2] [--images 5]
[--prompt P] [--layout-guidance S ...] (several strengths are timed side by side; layout guidance
only acts on prompts that name a relation, such as "a red circle left of a blue square", or start
with a count of three, such as "three red squares on a white background").
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ember.catalog import DEFAULT_MODEL
from ember.checkpoints import load_model
from ember.pipeline import generate
from ember.settings import GenerationParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--prompt", default="a slice of pizza, twemoji style")
    ap.add_argument("--layout-guidance", type=float, nargs="+", default=[0.0])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = GenerationParams(prompt=a.prompt, sampler="dpmpp_2m",
                              steps=20, cfg=7.0, width=64, height=64, batch=1, seed=0)  # fmt: skip
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_model(str(DEFAULT_MODEL), dtype=dtype)
        settings = [dataclasses.replace(params, layout_guidance=s) for s in a.layout_guidance]
        for p in settings:
            generate(loaded, p)  # warm-up
        times: dict[float, list[float]] = {p.layout_guidance: [] for p in settings}
        for _ in range(a.images):  # interleaved, so that load on the machine hits all alike
            for p in settings:
                t = time.perf_counter()
                generate(loaded, p)
                times[p.layout_guidance].append(time.perf_counter() - t)
        for strength, ts in times.items():
            print(
                f"{name}, layout guidance {strength}: median {statistics.median(ts):.3f} s  "
                f"({', '.join(f'{t:.3f}' for t in ts)})"
            )


if __name__ == "__main__":
    main()
