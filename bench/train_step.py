"""Training-step time of ember-small's U-Net and VAE: fused SDPA vs explicit attention.

    .venv/bin/python bench/train_step.py [--threads 2] [--rounds 3] [--steps 6]

One step = forward in bf16 autocast (fp32 where the CPU lacks bf16) + backward + clipped AdamW, as
`ember train` does, on random data of the real shapes (U-Net: batch 64 of 16x16x4 latents with
32x384 text states; VAE: batch 32 of 64x64 images). The two attention paths run interleaved,
`--rounds` times; the table gives the median step time of each and the ratio. `sdpa` in
`ember.models.layers` takes the explicit path only below `SMALL_ATTENTION` query x key lengths;
here the limit is switched off (0) or raised to cover each model.
"""

import argparse
import platform
import statistics
import time

import torch

import ember.models.layers as layers
from ember.config import get_preset
from ember.models.unet import UNetModel
from ember.models.vae import AutoencoderKL
from ember.train.loop import bf16_fast


def unet_case(batch: int):
    cfg = get_preset("ember-small")
    model = UNetModel(cfg.unet)
    x = torch.randn(batch, 4, 16, 16)
    t = torch.randint(0, 1000, (batch,)).float()
    ctx = torch.randn(batch, 32, 384)
    return model, lambda: (model(x, t, ctx) - x).square().mean()


def vae_case(batch: int):
    cfg = get_preset("ember-small")
    model = AutoencoderKL(cfg.vae)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    return model, lambda: (model.decode(model.encode(x).sample()) - x).abs().mean()


def time_steps(model, loss_fn, bf16: bool, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = bf16_fast(torch.device("cpu"))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, bf16 autocast: {bf16}")  # fmt: skip
    print("| model (batch) | fused SDPA (s/step) | explicit attention (s/step) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    default = layers.SMALL_ATTENTION
    for name, build, batch, explicit_limit in [
        ("ember-small U-Net", unet_case, 64, default),
        ("ember-small VAE", vae_case, 32, 256 * 256),
    ]:
        torch.manual_seed(0)
        model, loss_fn = build(batch)
        fused, explicit = [], []
        for _ in range(args.rounds):
            for limit, out in [(0, fused), (explicit_limit, explicit)]:
                layers.SMALL_ATTENTION = limit
                out.append(time_steps(model, loss_fn, bf16, args.steps))
        layers.SMALL_ATTENTION = default
        f, e = statistics.median(fused), statistics.median(explicit)
        print(f"| {name} ({batch}) | {f:.3f} | {e:.3f} | {f / e:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
