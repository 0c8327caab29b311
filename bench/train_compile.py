"""Does `ember train --compile` pay for its compile? The real training command, eager vs compiled.

    .venv/bin/python bench/train_compile.py TASK DATA OUT [--steps 150] [--rounds 1] -- [TRAIN ARGS]

Runs `ember train TASK DATA OUT/<mode>-<round>` with the given arguments and `--stop-at STEPS`
(nothing else changes: same data, seed, schedule), eager and with `--compile`, one after the other
(never side by side: two runs on one machine slow each other), each with an empty compile cache
(as a user's first run). The U-Net's latent/text caches are built once and copied, not timed. From
each run's metrics.jsonl it takes the median time per step over the windows after the first (the
first holds the compile and the warm-up) and the time of that first window; it then prints the
speed-up and the step at which the compile has paid for itself. Example (the default model's
U-Net stage):

    .venv/bin/python bench/train_compile.py unet runs/dm/unet-data /tmp/tc -- --preset ember-small-z8p \\
        --vae VAE.safetensors --steps 12500 --batch-size 64 --lr 8e-4 --warmup-steps 200 \\
        --min-snr-gamma 5 --bf16 auto
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

EMBER = Path(sys.executable).with_name("ember")


def run(task: str, data: str, run_dir: Path, steps: int, extra: list[str], cache: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    if cache.is_dir():  # the U-Net's latent/text caches: built once, not timed
        shutil.copytree(cache, run_dir / "cache")
    cmd = [str(EMBER), "train", task, data, str(run_dir), *extra, "--stop-at", str(steps),
           "--log-every", "10", "--checkpoint-every", "0", "--sample-every", "0"]  # fmt: skip
    # A fresh inductor cache per run: the compile is timed as a user's first run would pay it.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor-cache")}
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, env=env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Each row covers the steps since the previous one; elapsed_s is the loop's own clock.
    spans = [
        (b["step"] - a["step"], b["elapsed_s"] - a["elapsed_s"])
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    per_step = statistics.median(t / n for n, t in spans)
    return {"first_window_s": rows[0]["elapsed_s"], "first_window_steps": rows[0]["step"],
            "s_per_step": per_step, "total_s": rows[-1]["elapsed_s"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("task", choices=["unet", "vae"])
    ap.add_argument("data")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--cache", type=Path, help="a U-Net run's cache/ folder to reuse (else built once)"
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    results: dict[str, list[dict]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for mode, flags in (("eager", []), ("compiled", ["--compile"])):
            cache = args.cache or args.out / "eager-0" / "cache"
            out = run(
                args.task, args.data, args.out / f"{mode}-{r}", args.steps, extra + flags, cache
            )
            results[mode].append(out)
            print(f"round {r} {mode}: {json.dumps(out)}", flush=True)
    med = {m: statistics.median(x["s_per_step"] for x in v) for m, v in results.items()}
    first = {m: statistics.median(x["first_window_s"] for x in v) for m, v in results.items()}
    n0 = results["eager"][0]["first_window_steps"]
    overhead = (first["compiled"] - first["eager"]) - n0 * (med["compiled"] - med["eager"])
    gain = med["eager"] - med["compiled"]
    print(f"\nmachine: {platform.processor() or platform.machine()}; ember train {args.task} "
          f"{' '.join(extra)}")  # fmt: skip
    print("| mode | s/step (median, after the first window) | first window (s) |")
    print("| --- | ---: | ---: |")
    for m in med:
        print(f"| {m} | {med[m]:.3f} | {first[m]:.1f} for {n0} steps |")
    print(f"\nspeed-up {med['eager'] / med['compiled']:.2f}x; compile overhead about {overhead:.0f} s, "
          + (f"repaid after about {overhead / gain:.0f} steps" if gain > 0 else "never repaid"))  # fmt: skip


if __name__ == "__main__":
    main()
