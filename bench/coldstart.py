"""Where `ember generate`'s cold start goes: imports (python -X importtime) and the rest.

    .venv/bin/python bench/coldstart.py MODEL.safetensors --out bench/profile-coldstart.md

Runs the CLI once with -X importtime and once under cProfile (each its own process) and writes
the slowest top-level imports and the slowest ember functions by cumulative time.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import generate_command, machine, threads_env, write_report

PROMPT = "a red circle left of a blue square"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    env = threads_env(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cli = generate_command(PROMPT, a.model, f"{tmp}/a.png", dtype=a.dtype)[1:]  # after python
        t = time.perf_counter()
        subprocess.run([sys.executable, *cli], env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t
        proc = subprocess.run([sys.executable, "-X", "importtime", *cli], env=env, check=True,
                              capture_output=True, text=True)  # fmt: skip
        stats_file = f"{tmp}/stats"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", stats_file, *cli], env=env,
                       check=True, capture_output=True)  # fmt: skip
        stats = pstats.Stats(stats_file)
    # top-level imports (no indentation in the module column), by cumulative microseconds
    tops = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        if parts[1].strip().isdigit() and parts[2].startswith(" ") and parts[2][1] != " ":
            tops.append((int(parts[1]), parts[2].strip()))
    tops.sort(reverse=True)
    total_import = sum(us for us, _ in tops) / 1e6
    funcs = []
    for (file, line, fn), (_, _, _, cum, _) in stats.stats.items():
        if "/ember/" in file and "<module>" not in fn:
            funcs.append((cum, f"{Path(file).name}:{line}({fn})"))
    funcs.sort(reverse=True)
    lines = [
        "# Profile: `ember generate` cold start",
        "",
        f"Command: `.venv/bin/python bench/coldstart.py MODEL --dtype {a.dtype} --threads "
        f"{a.threads}`. Machine: {machine()}.",
        "",
        f"Process start to PNG written: **{wall:.2f} s**; top-level imports: {total_import:.2f} s.",
        "",
        "| top-level import (cumulative, first importer) | s |",
        "| --- | ---: |",
        *[f"| {name} | {us / 1e6:.2f} |" for us, name in tops[:8]],
        "",
        "| ember function (cumulative, cProfile; includes imports it triggers) | s |",
        "| --- | ---: |",
        *[f"| {name} | {cum:.2f} |" for cum, name in funcs[:12]],
        "",
    ]
    write_report("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
