"""Eager against `ember compile`'s package, side by side: the bundled model and SD 1.5.

    python bench/compiled.py [--models default,sd15] [--threads 2] [--rounds 3] [-o FILE.md]

Each model is compiled once into a private cache (its compile time and its own eager/compiled
timing of a batch-2 pass are reported), then worker processes time the same requests with the
package (EMBER_COMPILED=1) and without (0), in interleaved rounds, medians:
- the bundled default model, 64x64, 20 steps DPM++ 2M, its own cfg: one image warm, 8 images
  per batch warm (images/s), and `ember generate` from process start to PNG;
- SD 1.5 (random weights, ~/.cache/ember-bench/sd15-random), 512x512: 1 step cfg 1 (the Turbo
  recipe's U-Net work) and 4 steps cfg 7, warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import generate_command, machine, sd15_folder, spawn_worker, threads_env, write_report

PROMPT = "a slice of pizza, twemoji style"
CASES = {  # model -> [(label, size, steps, cfg or None for the model's, batch)]
    "default": [("1 image, 20 steps", 64, 20, None, 1), ("8 images, 20 steps", 64, 20, None, 8)],
    "sd15": [("1 step, cfg 1", 512, 1, 1.0, 1), ("4 steps, cfg 7", 512, 4, 7.0, 1)],
}


def model_path(name: str, cache: Path) -> Path:
    from ember.catalog import DEFAULT_MODEL

    return DEFAULT_MODEL if name == "default" else sd15_folder(cache)


def worker(a: argparse.Namespace) -> None:
    """Load once, one warm-up, then --images timed requests -> JSON on the last line."""
    import torch

    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams

    torch.set_num_threads(a.threads)
    service = GenerationService("auto")
    service.load(a.worker)
    params = GenerationParams(prompt=PROMPT, steps=a.steps, cfg=a.cfg, batch=a.batch,
                              width=a.size, height=a.size, seed=0)  # fmt: skip
    first = service.generate([Request(params)])[0][0]
    times = []
    for _ in range(a.images):
        start = time.perf_counter()
        service.generate([Request(params)])
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times),
                      "compiled": first.record.compiled_unet is not None}))  # fmt: skip


def compile_model(path: Path, size: int, threads: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "ember.cli", "compile", "--model", str(path), "--size",
           f"{size}x{size}", "--keep-slower", "-q"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**threads_env(threads), **env})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    info = json.loads(next(Path(env["EMBER_CACHE"], "compiled").glob("*.json")).read_text())
    return {**info, "wall": time.perf_counter() - start}


def cold_start(path: Path, threads: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = generate_command(PROMPT, str(path), Path(tmp) / "x.png")
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**threads_env(threads), **env})
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="default,sd15")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=3, help="timed requests per worker")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument("-o", "--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    for flag, kind in (("--size", int), ("--steps", int), ("--cfg", float), ("--batch", int)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    lines = [f"# Eager against `ember compile`\n\nMachine: {machine()}; {a.threads} threads, "
             f"{a.rounds} interleaved rounds, medians.\n"]  # fmt: skip
    rows = ["| model | request | eager (s) | compiled (s) | speed-up |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    notes = []
    for name in a.models.split(","):
        path = model_path(name, a.cache)
        with tempfile.TemporaryDirectory() as cache:
            env = {"EMBER_CACHE": cache}
            size = CASES[name][0][1]
            info = compile_model(path, size, a.threads, env)
            notes.append(f"- {name}: compiled in {info['compile_seconds']:.0f} s; `ember compile`'s "
                         f"own batch-2 pass: eager {info['eager_ms']:.1f} ms, compiled "
                         f"{info['compiled_ms']:.1f} ms")  # fmt: skip
            for label, size, steps, cfg, batch in CASES[name]:
                runs = {"0": [], "1": []}
                for _ in range(a.rounds):
                    for flag in runs:
                        os.environ.update(env, EMBER_COMPILED=flag)
                        r = spawn_worker(sys.executable, __file__, worker=str(path), size=size,
                                         steps=steps, cfg=cfg, batch=batch, images=a.images,
                                         threads=a.threads)  # fmt: skip
                        assert r["compiled"] == (flag == "1"), r
                        runs[flag].append(r["seconds"])
                eager, fast = statistics.median(runs["0"]), statistics.median(runs["1"])
                what = (
                    f"{label} ({batch / eager:.1f} vs {batch / fast:.1f} img/s)"
                    if batch > 1
                    else label
                )
                rows.append(f"| {name} | {what} | {eager:.3f} | {fast:.3f} | {eager / fast:.2f}x |")
            if name == "default":
                cold = {f: [] for f in ("0", "1")}
                for _ in range(a.rounds):
                    for flag in cold:
                        cold[flag].append(
                            cold_start(path, a.threads, {**env, "EMBER_COMPILED": flag})
                        )
                e, c = statistics.median(cold["0"]), statistics.median(cold["1"])
                rows.append(f"| {name} | `ember generate` process start to PNG | {e:.2f} | {c:.2f} | {e / c:.2f}x |")  # fmt: skip
        os.environ.pop("EMBER_CACHE", None)
        os.environ.pop("EMBER_COMPILED", None)
    write_report("\n".join(lines + rows + [""] + notes) + "\n", a.out)


if __name__ == "__main__":
    main()
