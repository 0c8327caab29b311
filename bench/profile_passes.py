"""Where the time of one U-Net pass and one VAE decode goes: a torch.profiler summary as markdown.

    .venv/bin/python bench/profile_passes.py MODEL --size 256 --dtype bf16 --out bench/profile-sd15-256.md

MODEL is a single file or diffusers folder (bench/speed.py leaves random-weight ones in its
--cache). The U-Net runs on a cond+uncond batch of 2, as in sampling with cfg.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import count_flops, machine, unet_inputs, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    import torch
    from torch.profiler import profile

    from ember.checkpoints import load_model
    from ember.device import DTYPES

    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    loaded = load_model(a.model, dtype=dtype)
    cfg = loaded.config
    unet, vae = loaded.model.model.diffusion_model, loaded.model.first_stage_model
    x, t, ctx = unet_inputs(cfg, a.size, dtype)
    z = x[:1, : cfg.vae.embed_dim]
    parts = {"U-Net pass (batch 2)": lambda: unet(x, t, ctx), "VAE decode": lambda: vae.decode(z)}
    lines = [
        f"# Profile: {cfg.name} at {a.size}x{a.size}, {a.dtype}, {a.threads} thread(s)",
        "",
        f"Command: `.venv/bin/python bench/profile_passes.py MODEL --size {a.size} --dtype {a.dtype} "
        f"--threads {a.threads}`. Machine: {machine()} (CPU self times are less disturbed by "
        "other load than wall).",
        "",
    ]
    counted = count_flops(cfg, a.size)
    flop_of = dict(zip(parts, (counted["unet"], counted["vae"]), strict=True))
    with torch.no_grad():
        for name, fn in parts.items():
            fn()  # warm-up (also packs the conv weights)
            wall = time.perf_counter()
            with profile() as prof:
                fn()
            wall = time.perf_counter() - wall
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
            flops = flop_of[name]
            lines += [
                f"## {name}: {flops / 1e9:.1f} GFLOP, {wall:.3f} s under the profiler "
                f"({flops / wall / 1e9:.0f} GFLOP/s)",
                "",
                "```",
                table.strip(),
                "```",
                "",
            ]
    write_report("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
