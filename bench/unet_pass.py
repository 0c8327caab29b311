"""One cfg pass of the bundled U-Net (batch 2, 16x16 latents, fp32) as `ember generate` runs it
(eager, convolutions prepacked for oneDNN), eager without the prepacking, and under torch.compile
(inductor with freezing, which prepacks on its own; the prepacked path would break its graph at
every convolution), beside the machine's fp32 matmul rate: is a slow image the code or the CPU?

    .venv/bin/python bench/unet_pass.py [--threads 2] [--passes 40] [--no-compile]

Prints the median milliseconds of each (after warm-up; the compile's own time is printed too) and
the GFLOP/s of a 2048x2048 matmul, the most this CPU gives the U-Net's convolutions and linears.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_ms(fn, passes: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()

    import torch
    import torch._inductor.config as inductor_config

    from ember.checkpoints import load_model
    from ember.cli import DEFAULT_MODEL
    from ember.models import layers

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    n = 2048
    m1, m2 = torch.randn(n, n), torch.randn(n, n)
    ms = _median_ms(lambda: m1 @ m2, 10)
    print(f"fp32 matmul {n}x{n}: {2 * n**3 / ms / 1e6:.1f} GFLOP/s ({a.threads} threads)")

    loaded = load_model(DEFAULT_MODEL, dtype=torch.float32)
    cfg = loaded.config
    unet = loaded.model.model.diffusion_model
    side = 64 // cfg.vae.downsample  # the bundled model's 64x64 images
    x = torch.randn(2, cfg.unet.in_channels, side, side)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim)
    ms = _median_ms(lambda: unet(x, t, ctx), a.passes)
    print(f"U-Net cfg pass, eager (prepacked convolutions, as shipped): {ms:.1f} ms")
    layers.PREPACK = False
    ms = _median_ms(lambda: unet(x, t, ctx), a.passes)
    print(f"U-Net cfg pass, eager without prepacking: {ms:.1f} ms")
    if not a.no_compile:
        inductor_config.freezing = True
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        compiled(x, t, ctx)
        first = time.perf_counter() - t0
        ms = _median_ms(lambda: compiled(x, t, ctx), a.passes)
        print(
            f"U-Net cfg pass, torch.compile with freezing: {ms:.1f} ms (first call {first:.0f} s)"
        )


if __name__ == "__main__":
    main()
