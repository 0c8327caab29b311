"""Fused post-ops against separate ones (issue 37): the U-Net pass and the VAE decode, one process.

    .venv/bin/python bench/fused.py [--size 512] [--dtype bf16 fp32] [--rounds 6] [--threads 2]
                                    [--out FILE.md]

ember runs the transformer blocks' residual sums, GEGLU's GELU and product, the ResBlocks' skip
sums and the VAE blocks' sums inside the oneDNN GEMMs and convolutions (`prepack.Linear.fused`,
`prepack.Conv2d.fused`). This times the SD 1.5 architecture (random weights, `speed.py`'s folder
in --cache) both ways in the same process, alternating call by call so that a busy machine slows
both alike: "separate" swaps in the op-by-op path (the plain GEMM, then GELU, product or sum as
their own passes); the weights, inputs and everything else are shared. Medians of --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import machine, sd15_folder, unet_inputs, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    import torch

    from ember.checkpoints import load_model
    from ember.device import DTYPES
    from ember.models import prepack

    torch.set_num_threads(a.threads)
    fusable, conv_fused = prepack.Linear.fusable, prepack.Conv2d.fused

    def separate_conv(self, x, *, add=None, relu=False):
        y = conv_fused(self, x)
        y = y if add is None else y + add
        return torch.relu(y) if relu else y

    def use(fused: bool) -> None:
        prepack.Linear.fusable = fusable if fused else (lambda self, x: False)
        prepack.Conv2d.fused = conv_fused if fused else separate_conv

    def measure(name: str) -> list[str]:
        torch.manual_seed(0)
        loaded = load_model(sd15_folder(a.cache), dtype=DTYPES[name])
        cfg = loaded.config
        unet, vae = loaded.model.model.diffusion_model, loaded.model.first_stage_model
        x, t, ctx = unet_inputs(cfg, a.size, DTYPES[name])
        z = x[:1, : cfg.vae.embed_dim]
        parts = {
            "U-Net pass, batch 1 (cfg 1)": lambda: unet(x[:1], t[:1], ctx[:1]),
            "U-Net pass, batch 2 (cfg > 1)": lambda: unet(x, t, ctx),
            "VAE decode": lambda: vae.decode(z),
        }
        out = []
        with torch.no_grad():
            for part, fn in parts.items():
                times: dict[bool, list[float]] = {False: [], True: []}
                for fused in (False, True):
                    use(fused)
                    fn()  # warm-up: packs the weights for this path
                for _ in range(a.rounds):
                    for fused in (False, True):
                        use(fused)
                        start = time.perf_counter()
                        fn()
                        times[fused].append(time.perf_counter() - start)
                sep, fus = statistics.median(times[False]), statistics.median(times[True])
                out.append(f"| {part} | {name} | {sep:.3f} | {fus:.3f} | {sep / fus:.2f}x |")
                print(out[-1], flush=True)
        use(True)
        return out

    rows = [row for name in a.dtype for row in measure(name)]
    text = "\n".join([
        f"SD 1.5 architecture (random weights), {a.size}x{a.size}, {a.threads} threads, medians "
        f"of {a.rounds} alternating calls in one process:",
        "",
        "| part | dtype | separate ops (s) | fused (s) | speed-up |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/fused.py --size {a.size} "
        f"--dtype {' '.join(a.dtype)} --rounds {a.rounds} --threads {a.threads}`.",
    ])  # fmt: skip
    write_report(text, a.out)


if __name__ == "__main__":
    main()
