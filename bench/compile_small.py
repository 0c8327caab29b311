"""Would torch.compile close ember-small's 64x64 latency gap? Eager vs inductor, one process.

    .venv/bin/python bench/compile_small.py [MODEL] [--dtype bf16] [--threads 2]

An experiment, not a shipped path: ember-small's U-Net pass is ~700 small ops (profile in
bench/profile-ember-small-64.md), so per-op overhead dominates and a compiled graph is the obvious
remedy. The U-Net is compiled with inductor (`freezing=True`, static shapes) with ember's own
prepacked convolutions switched off so that inductor sees plain convs. Prints the compile time and
the median 20-step image time (DPM++ 2M, cfg 5) eager before, compiled, and eager after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT = (
    Path(__file__).resolve().parents[1] / "src/ember/assets/default-model/ember-small.safetensors"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default=str(DEFAULT))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--images", type=int, default=7)
    a = p.parse_args()

    import torch
    import torch._inductor.config as inductor_config

    from ember.checkpoints import load_model
    from ember.models import prepack
    from ember.pipeline import generate
    from ember.settings import GenerationParams

    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    loaded = load_model(a.model, dtype=dtype)
    params = GenerationParams(prompt="a red circle", sampler="dpmpp_2m", steps=20, cfg=5.0,
                              width=64, height=64, seed=0)  # fmt: skip

    def image_time() -> float:
        generate(loaded, params)
        times = []
        for _ in range(a.images):
            start = time.perf_counter()
            generate(loaded, params)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    before = image_time()
    eager_unet = loaded.model.model.diffusion_model
    inductor_config.freezing = True
    prepack.PREPACK = False
    loaded.model.model.diffusion_model = torch.compile(eager_unet, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        generate(loaded, params)
        compile_s = time.perf_counter() - start
        compiled = image_time()
    loaded.model.model.diffusion_model = eager_unet
    prepack.PREPACK = True
    after = image_time()
    print(f"ember-small 64x64, {a.dtype}, {a.threads} threads, torch {torch.__version__}")
    print("| path | 20-step image (s) |")
    print("| --- | ---: |")
    print(f"| eager (before) | {before:.3f} |")
    print(f"| inductor, freezing (first image incl. compile: {compile_s:.0f} s) | {compiled:.3f} |")
    print(f"| eager (after) | {after:.3f} |")


if __name__ == "__main__":
    main()
