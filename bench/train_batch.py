"""Images per second of one U-Net training step at several batch sizes (and memory layouts).

    .venv/bin/python bench/train_batch.py [--preset ember-small-z8p] [--batches 64,128,256]
        [--channels-last] [--sides 16,8] [--rounds 3] [--images 1024]

One step = forward in bf16 autocast (fp32 where the CPU lacks bf16) + backward + clipped AdamW, as
`ember train` does, on random latents of the preset's shape with 32x384 text states. The cases run
interleaved, `--rounds` times, each for about `--images` images after a warm-up step (`bench/train_step.py`'s timing); the table
gives each case's median images/s over its rounds and its ratio to the first case. More images per
second is only half of a recipe: a larger batch takes fewer optimizer steps for the same images.
`--sides` also times latents of other sides (8 = the latents of 32x32 images: the cost per image of
a lower-resolution training phase).
"""

import argparse
import platform
import statistics

import torch
from train_step import time_steps  # the same timed step (bench/ is on sys.path when run)

from ember.config import get_preset
from ember.models.unet import UNetModel
from ember.train.loop import bf16_fast


def step_case(model, batch: int, shape: tuple, context_dim: int, channels_last: bool):
    """`train_step.time_steps`'s loss closure on random latents of `shape` and text states."""
    x = torch.randn(batch, *shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 32, context_dim)
    t = torch.randint(0, 1000, (batch,)).float()
    return lambda: model(x, t, ctx).float().square().mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="ember-small-z8p")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--channels-last", action="store_true", help="also each batch channels-last")
    ap.add_argument("--sides", default="", help="latent sides to time (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mcfg = get_preset(args.preset)
    cfg = mcfg.unet
    side = mcfg.size // 2 ** (len(mcfg.vae.ch_mult) - 1)  # latent side
    model = UNetModel(cfg)
    bf16 = bf16_fast(torch.device("cpu"))
    layouts = [False, True] if args.channels_last else [False]
    sides = [int(x) for x in args.sides.split(",")] if args.sides else [side]
    cases = [(b, cl, s) for s in sides for b in map(int, args.batches.split(",")) for cl in layouts]
    rates: dict[tuple[int, bool, int], list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for batch, cl, s in cases:
            model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            loss_fn = step_case(model, batch, (cfg.in_channels, s, s), cfg.context_dim, cl)
            rate = batch / time_steps(model, loss_fn, bf16, max(2, args.images // batch))
            rates[(batch, cl, s)].append(rate)
            print(f"  {s}x{s} batch {batch}{' channels-last' if cl else ''}: {rate:.1f} img/s",
                  flush=True)  # fmt: skip
    print(f"\n{args.preset} U-Net training step, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, bf16 autocast {bf16}, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| latent | batch | layout | images/s | vs first |\n| --- | ---: | --- | ---: | ---: |")
    base = statistics.median(rates[cases[0]])
    for batch, cl, s in cases:
        med = statistics.median(rates[(batch, cl, s)])
        layout = "channels-last" if cl else "contiguous"
        print(f"| {s}x{s} | {batch} | {layout} | {med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
