"""Prepacked oneDNN convolutions: speed bought with memory. ember with EMBER_PREPACK=1 vs =0.

    .venv/bin/python bench/prepack_memory.py [MODEL] [--dtype fp32] [--size 256] [--steps 4]

MODEL defaults to the random-weight SD 1.5 folder that bench/speed.py leaves in its cache. Each
configuration runs in its own process (bench/speed.py's ember worker), interleaved, `--rounds`
times: load, one warm-up image, then `--images` pairs of a 2-step and a timed --steps image (DPM++
2M, cfg 7). Reports the median image time and the process's peak RSS (VmHWM, loading included). A prepacked conv keeps a second copy of its weight in
oneDNN's blocked layout, so the difference in peak memory is about the size of the conv weights
in the run's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "ember-bench" / "sd15-random"
SPEED = Path(__file__).with_name("speed.py")  # its `--worker ember` does one measurement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    if not Path(a.model).exists():
        raise SystemExit(
            f"{a.model} not found: run bench/speed.py once (it builds it) or pass MODEL"
        )
    args = [sys.executable, str(SPEED), "--worker", "ember", "--model", a.model,
            "--dtype", a.dtype, "--size", str(a.size), "--steps", str(a.steps),
            "--images", str(a.images), "--threads", str(a.threads)]  # fmt: skip
    results: dict[str, list[dict]] = {"1": [], "0": []}
    for _ in range(a.rounds):
        for flag, out in results.items():
            env = {**os.environ, "EMBER_PREPACK": flag, "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{Path(a.model).name}, {a.dtype}, {a.size}x{a.size}, {a.steps} steps DPM++ 2M cfg 7; "
          f"{platform.machine()}, {a.threads} threads; medians of {a.rounds} processes")  # fmt: skip
    print("| EMBER_PREPACK | image (s) | peak RSS (MiB) |")
    print("| --- | ---: | ---: |")
    for flag, out in results.items():
        image = statistics.median(statistics.median(r["image"]) for r in out)
        peak = statistics.median(r["peak_rss_mb"] for r in out)
        print(f"| {flag} | {image:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
