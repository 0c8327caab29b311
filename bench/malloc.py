"""glibc's malloc against tcmalloc, the one the `ember` command runs under where it is installed
(src/ember/process.py): the same ember work in processes that differ only in EMBER_TCMALLOC.

    .venv/bin/python bench/malloc.py [--rounds 3] [--threads 2] [--out FILE]

The rows, each a fresh process per round and malloc, interleaved round by round:
  turbo1, lcm4   bench/fewstep.py's ember worker (SD 1.5 architecture, random weights, 512x512,
                 TAESD): one warm image, its U-Net and VAE stages, `--images` per process
  vae512, vae1024  the SD VAE decode alone (random weights), warm, `--decodes` per process
  generate       `ember generate` turbo1 from process start to the PNG (the restart under
                 tcmalloc included)
Each row gives medians and the worker's peak RSS. Needs tcmalloc installed (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    machine,
    native_bf16,
    peak_rss_mb,
    spawn_worker,
    write_report,
)

MALLOCS = {"glibc": {"EMBER_TCMALLOC": "0"}, "tcmalloc": {"EMBER_TCMALLOC": "1"}}


def worker_vae(a: argparse.Namespace) -> dict:
    """The SD VAE decoder at `a.size`, in the dtype `ember generate` picks: `a.decodes` warm
    decodes after one."""
    import torch

    from ember.config import SD_VAE
    from ember.device import resolve_dtype
    from ember.models.vae import AutoencoderKL

    dtype = resolve_dtype("auto")
    torch.manual_seed(0)
    vae = AutoencoderKL(SD_VAE).to(dtype).eval().requires_grad_(False)
    z = torch.randn(1, 4, a.size // 8, a.size // 8, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(a.decodes + 1):
            t = time.perf_counter()
            vae.decode(z)
            times.append(time.perf_counter() - t)
    return {"first": times[0], "warm": times[1:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument("--rows", default="turbo1,lcm4,vae512,vae1024,generate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=3, help="warm images per fewstep worker")
    p.add_argument("--decodes", type=int, default=3, help="warm decodes per VAE worker")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the markdown table here (else stdout)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import json

        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps({**worker_vae(a), "peak_rss_mb": peak_rss_mb()}))
        return

    import fewstep

    from ember.process import find_tcmalloc

    if find_tcmalloc() is None:
        p.error("tcmalloc is not installed: bash scripts/install-tcmalloc.sh")
    rows = a.rows.split(",")
    files = fewstep.prepare(argparse.Namespace(cache=a.cache, openvino=False), rows)
    started = time.time()
    line = machine(with_malloc=False)
    res: dict[tuple[str, str], dict[str, list[float]]] = {}

    def add(row: str, m: str, **values) -> None:
        for k, v in values.items():
            res.setdefault((row, m), {}).setdefault(k, []).extend(v if isinstance(v, list) else [v])

    for rnd in range(a.rounds):
        for row in rows:
            for m, env in MALLOCS.items():
                print(f"bench: round {rnd + 1}/{a.rounds}: {row} {m}", file=sys.stderr, flush=True)
                if row in fewstep.RECIPES:
                    r = spawn_worker(
                        sys.executable, str(ROOT / "bench" / "fewstep.py"), "--t0",
                        repr(time.time()), extra_env=env, worker="ember", recipe=row,
                        model=files["sd15"], taesd=files["taesd"], lora=files["lora"],
                        embeddings=files["embeddings"], threads=a.threads, images=a.images,
                    )  # fmt: skip
                    add(row, m, warm=r["image"], unet=r["unet"], vae=r["vae"],
                        peak=r["peak_rss_mb"])  # fmt: skip
                elif row.startswith("vae"):
                    r = spawn_worker(sys.executable, __file__, extra_env=env, worker="vae",
                                     size=int(row[3:]), decodes=a.decodes, threads=a.threads)  # fmt: skip
                    add(row, m, first=r["first"], warm=r["warm"], peak=r["peak_rss_mb"])
                else:
                    (a.cache / "out").mkdir(exist_ok=True)
                    r = fewstep.run_cli(fewstep.RECIPES["turbo1"], files,
                                        a.cache / "out" / "malloc-cli.png", a.threads, env)  # fmt: skip
                    add(row, m, first=r["first"], peak=r["peak_rss_mb"])
    write_report(report(a, rows, res, line, started), a.out)


TITLES = {
    "turbo1": "SD-Turbo recipe, warm image (1 step, TAESD, 512x512)",
    "lcm4": "LCM 4 steps + LoRA, warm image (TAESD, 512x512)",
    "vae512": "SD VAE decode 512x512, warm",
    "vae1024": "SD VAE decode 1024x1024, warm",
    "generate": "`ember generate` SD-Turbo recipe, whole process",
}


def report(a, rows: list[str], res: dict, line: str, started: float) -> str:
    from ember.process import find_tcmalloc

    med = statistics.median
    dtype = "bf16" if native_bf16() else "fp32"
    out = [
        "# glibc malloc against tcmalloc, ember's work",
        "",
        f"Machine: {line}; tcmalloc: {find_tcmalloc()}.",
        f"Command: `.venv/bin/python bench/malloc.py {' '.join(sys.argv[1:])}` ({a.threads} "
        f"threads, {dtype}, medians over {a.rounds} interleaved rounds; each row's processes "
        "differ only in EMBER_TCMALLOC).",
        "",
        "| work | glibc (s) | tcmalloc (s) | speed-up | U-Net / VAE glibc (s) | U-Net / VAE tcmalloc (s) "
        "| peak RSS glibc / tcmalloc (MiB) |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in rows:
        g, t = res[(row, "glibc")], res[(row, "tcmalloc")]
        key = "warm" if "warm" in g else "first"
        stages = ["", ""]
        if "unet" in g:
            stages = [f"{med(x['unet']):.3f} / {med(x['vae']):.3f}" for x in (g, t)]
        out.append(
            f"| {TITLES[row]} | {med(g[key]):.3f} | {med(t[key]):.3f} | "
            f"{med(g[key]) / med(t[key]):.2f}x | {stages[0]} | {stages[1]} | "
            f"{max(g['peak']):.0f} / {max(t['peak']):.0f} |"
        )
    out += ["", f"Total benchmark time: {(time.time() - started) / 60:.1f} min.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
