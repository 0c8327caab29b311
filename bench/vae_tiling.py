"""Tiled against whole VAE decoding (issue 37): seconds, peak memory and how close the pixels are.

    .venv/bin/python bench/vae_tiling.py [--sizes 512 1024 2048] [--vae sd taesd] [--dtype auto]
                                         [--threads 2] [--quality] [--out bench/vae-tiling.md]

Memory and speed: SD's VAE architecture (and TAESD's, `--vae taesd`) with random weights (seeded),
one random latent per size, decoded whole and tiled (`ember.models.vae_tiling`, the default tiles)
with the weights in `--dtype` (auto: bf16 where the CPU has native bf16, as `ember generate`).
Each decode runs in its own process: build, one small warm-up decode (the prepacked weights are
made), then the timed decode. "peak" is the rise of the process's peak RSS (VmHWM, reset after the
warm-up) during the decode, so it counts activations and not the weights; "estimate" is what
`vae_tiling.peak_bytes` predicts for the whole decode, which `--vae-tiling auto` weighs against the
free memory. PSNR compares the tiled image with the whole one (pixels in [-1, 1], peak-to-peak 2).

`--quality`: the bundled model's trained VAE (the only trained one that ships) on a 512x768 crop
of its evaluation sheet: PSNR of tiled against whole decodes for tiles of 64 and 96 latent pixels
(SD's 512 and 768 image pixels); random weights say little about how visible tiling is.

A 2048x2048 whole decode in fp32 takes about 12 GiB and minutes on two cores; --sizes 256 512 is a
quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, proc_status, spawn_worker, write_report


def build(vae: str):
    import torch

    from ember.config import PRESETS
    from ember.models.taesd import TAESDConfig, TinyAutoencoder
    from ember.models.vae import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(PRESETS["sd15"].vae) if vae == "sd" else TinyAutoencoder(TAESDConfig())


def worker(a: argparse.Namespace) -> None:
    """One decode in this (fresh) process; JSON on the last line."""
    import torch

    from ember.device import resolve_dtype
    from ember.models import vae_tiling

    torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype)
    vae = build(a.vae).eval().to(dtype)
    f = vae.cfg.downsample
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8, dtype=dtype))  # warm-up: prepacks the weights
        z = torch.randn(1, 4, a.size // f, a.size // f, generator=torch.Generator().manual_seed(1))
        z = z.to(dtype)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = proc_status("VmRSS")
        start = time.perf_counter()
        pixels = vae_tiling.decode_tiled(vae, z) if a.tiled else vae.decode(z).float()
        seconds = time.perf_counter() - start
        peak = proc_status("VmHWM") - before
    torch.save(pixels, a.out)
    estimate = vae_tiling.peak_bytes(vae, a.size, a.size, dtype)
    print(json.dumps({"seconds": seconds, "peak": peak, "estimate": estimate,
                      "dtype": str(dtype).removeprefix("torch.")}))  # fmt: skip


def psnr(a, b) -> float:
    import torch

    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


def memory_table(a: argparse.Namespace) -> str:
    import torch

    mib = 2**20
    rows = ["| VAE | size | dtype | whole s | tiled s | whole peak MiB | tiled peak MiB "
            "| estimate MiB | PSNR tiled/whole dB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for vae in a.vae:
            for size in a.sizes:
                r, images = {}, {}
                for mode in ("whole", "tiled"):
                    out = Path(tmp) / f"{vae}-{size}-{mode}.pt"
                    r[mode] = spawn_worker(
                        sys.executable, __file__, "--worker", vae=vae, size=size, dtype=a.dtype,
                        threads=a.threads, tiled=mode == "tiled", out=out,
                    )  # fmt: skip
                    images[mode] = torch.load(out)
                w, t = r["whole"], r["tiled"]
                rows.append(
                    f"| {vae} | {size}x{size} | {w['dtype']} | {w['seconds']:.1f} | "
                    f"{t['seconds']:.1f} | {w['peak'] / mib:.0f} | {t['peak'] / mib:.0f} | "
                    f"{w['estimate'] / mib:.0f} | {psnr(images['tiled'], images['whole']):.1f} |"
                )
    return "\n".join(rows)


def quality_table() -> str:
    import numpy as np
    import torch
    from PIL import Image

    from ember.catalog import DEFAULT_MODEL
    from ember.models import vae_tiling
    from ember.vae_files import load_vae

    vae = load_vae(DEFAULT_MODEL).module
    sheet = Image.open(DEFAULT_MODEL.parent / "eval-geneval-held-out.png").convert("RGB")
    pixels = np.asarray(sheet)[:512, :768]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().contiguous() / 127.5 - 1
    rows = [f"bundled VAE ({DEFAULT_MODEL.name}, {vae.cfg.downsample}x), a 768x512 crop, fp32",
            "| tile (latent px) | overlap | PSNR tiled/whole dB |", "| ---: | ---: | ---: |"]  # fmt: skip
    with torch.no_grad():
        z = vae.encode(x).mean
        whole = vae.decode(z)
        for tile, overlap in ((64, 16), (96, 16), (96, 0)):
            tiled = vae_tiling.decode_tiled(vae, z, tile, overlap)
            rows.append(f"| {tile} | {overlap} | {psnr(tiled, whole):.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--vae", nargs="+", choices=["sd", "taesd"], default=["sd"])
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="also the bundled VAE's PSNR table")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's ember, in the driver and the workers
    if a.worker:
        a.vae = a.vae[0]
        worker(a)
        return
    parts = [f"# VAE decode, whole and tiled\n\n{machine()}; {a.threads} threads\n",
             memory_table(a)]  # fmt: skip
    if a.quality:
        parts.append("\n" + quality_table())
    write_report("\n".join(parts) + "\n", a.out)


if __name__ == "__main__":
    main()
