"""Peak memory of loading an SDXL single file, against the size of the loaded weights.

    .venv/bin/python bench/sdxl_load_memory.py [--scale full|small] [--file-dtype fp16] [--dtype bf16]

Writes a random-weight SDXL-architecture file in Stability's layout (`--scale full`: SDXL 1.0 base,
6.9 GB in fp16, and as much free memory again to write it; `small`: the same topology at a fifth of
the width with small text encoders, about 0.2 GB) to ~/.cache/ember-bench, then loads it with
`ember.checkpoints.load_model` in a fresh process and reports that process's peak RSS (VmHWM)
above its RSS before loading (its imports done), and that over the loaded weights' bytes. The issue's target: at most
1.3x. Loading builds the model on the meta device and assigns the file's tensors, converted to the
weights' dtype one tensor at a time as they are read, so the peak is the converted weights and a
tensor more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

CACHE = Path.home() / ".cache" / "ember-bench"


def small_config():
    from ember import config as C

    unet = dataclasses.replace(
        C.SDXL_UNET, model_channels=64, num_head_channels=16, context_dim=128 + 256,
        adm_in_channels=256 + 6 * 256,
    )  # fmt: skip
    clip = dataclasses.replace(C.SDXL_CLIP_L, hidden_size=128, intermediate_size=512, num_heads=2)
    big_g = dataclasses.replace(
        C.OPENCLIP_BIGG, hidden_size=256, intermediate_size=1024, num_heads=4, projection_dim=256
    )
    return C.ModelConfig("sdxl-small-bench", unet, C.SDXL_VAE, clip, text_2=big_g, size=1024)


def write_model(scale: str, file_dtype: str) -> Path:
    """The random-weight file (made once per scale and dtype)."""
    import torch

    from ember import config as C
    from ember.models.ldm import LatentDiffusion
    from ember.models.text import build_text_encoder
    from ember.safetensors_io import save_safetensors
    from ember.sdxl_files import internal_to_sgm

    path = CACHE / f"sdxl-random-{scale}-{file_dtype}.safetensors"
    if path.exists():
        return path
    cfg = C.get_preset("sdxl") if scale == "full" else small_config()
    with torch.device("meta"):
        model = LatentDiffusion(cfg, *[build_text_encoder(t) for t in cfg.text_encoders()])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[file_dtype]
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(dtype)
          for k, v in model.state_dict().items()}  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    save_safetensors(internal_to_sgm(sd, cfg, {}), path, {"format": "pt"})
    return path


def worker(path: str, dtype: str) -> None:
    """Load once in this (fresh) process; print the measurements as JSON."""
    import torch
    from common import proc_status
    from transformers import CLIPTextModel  # noqa: F401 - code the loader imports, not weights

    from ember.checkpoints import load_model
    from ember.device import resolve_dtype

    before = proc_status("VmRSS")
    loaded = load_model(path, dtype=resolve_dtype(dtype))
    weights = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    peak = proc_status("VmHWM")
    print(json.dumps({"weights": weights, "peak_above_start": peak - before,
                      "torch": torch.__version__}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=["full", "small"], default="small")
    p.add_argument("--file-dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--worker", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    from common import machine

    path = write_model(a.scale, a.file_dtype)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(path), a.dtype],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    r = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"{machine()}; torch {r['torch']}")
    print("| file | loaded as | file GiB | weights GiB | peak RSS above start, GiB | / weights |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {path.name} | {a.dtype} | {path.stat().st_size / gib:.2f} | {r['weights'] / gib:.2f} "
          f"| {r['peak_above_start'] / gib:.2f} | {r['peak_above_start'] / r['weights']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
