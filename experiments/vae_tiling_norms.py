"""How much closer to the whole decode could tiled decoding come, and at what price?

    .venv/bin/python experiments/vae_tiling_norms.py [--tiles 64 96] [--overlap 16]

A tiled decode (`ember.models.vae_tiling`) differs from the whole one because each tile's group
norms take their statistics from the tile alone and its mid-block attention sees only the tile.
On the bundled model's trained VAE (a 768x512 crop of its evaluation sheet, fp32) this measures
the PSNR against the whole decode of:
  per-tile        what ember ships
  oracle norms    every group norm given the whole image's statistics, taken from the whole
                  decode: the ceiling of fixing the norms (it needs the whole activations, which is
                  what tiling avoids)
  two-pass norms  a first tiled pass sums each norm's statistics over the tiles (overlaps counted
                  twice), a second decodes with them: bounded memory, twice the time
  global mid      the mid block (and its attention) run on the whole latent, the rest tiled
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ember.catalog import DEFAULT_MODEL  # noqa: E402
from ember.models import vae_tiling  # noqa: E402
from ember.models.layers import GroupNorm32  # noqa: E402
from ember.vae_files import load_vae  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


class Norms:
    """Replaces GroupNorm32.forward: "record" each call's statistics (in call order, which is the
    same in every tile), "sum" them over tiles, or "use" given ones instead of the input's own."""

    def __init__(self) -> None:
        self.mode, self.k, self.stats, self.sums = "off", 0, [], {}
        self.original = GroupNorm32.forward
        norms = self

        def forward(module, x):
            return norms.forward(module, x)

        GroupNorm32.forward = forward

    def forward(self, module, x):
        if self.mode == "off":
            return self.original(module, x)
        b, c, h, w = x.shape
        xg = x.float().reshape(b, module.num_groups, -1)
        k, self.k = self.k, self.k + 1
        if self.mode == "record":
            self.stats.append((xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)))
            return self.original(module, x)
        if self.mode == "sum":
            s = self.sums.setdefault(k, [0.0, 0.0, 0])
            s[0], s[1], s[2] = (
                s[0] + xg.sum(-1, keepdim=True),
                s[1] + xg.pow(2).sum(-1, keepdim=True),
                s[2] + xg.shape[-1],
            )
            return self.original(module, x)
        mean, var = self.stats[k]
        y = ((xg - mean) / torch.sqrt(var + module.eps)).reshape(b, c, h, w)
        return y * module.weight[:, None, None] + module.bias[:, None, None]

    def from_sums(self) -> None:
        self.stats = [(s1 / n, s2 / n - (s1 / n) ** 2) for s1, s2, n in
                      (self.sums[k] for k in sorted(self.sums))]  # fmt: skip
        self.sums = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[64, 96])
    p.add_argument("--overlap", type=int, default=16)
    a = p.parse_args()
    vae = load_vae(DEFAULT_MODEL).module
    sheet = Image.open(DEFAULT_MODEL.parent / "eval-geneval-held-out.png").convert("RGB")
    pixels = np.asarray(sheet)[:512, :768]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().contiguous() / 127.5 - 1
    norms = Norms()
    f, dec = vae.cfg.downsample, vae.decoder

    def decode(z: torch.Tensor) -> torch.Tensor:
        norms.k = 0
        return vae.decode(z)

    def upper(h: torch.Tensor) -> torch.Tensor:  # the decoder after its mid block
        for stage in reversed(dec.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return dec.conv_out(F.silu(dec.norm_out(h)))

    print("| tile | per-tile | oracle norms | two-pass norms | global mid |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        z = vae.encode(x).mean
        grid = z.shape[-2:]
        norms.mode = "record"
        whole = decode(z)
        oracle = norms.stats
        for tile in a.tiles:

            def tiled(fn, h=z, tile=tile):
                return vae_tiling.run_tiled(fn, h, grid, 1, f, tile, a.overlap)

            norms.mode = "off"
            plain = tiled(decode)
            norms.mode, norms.stats = "use", oracle
            with_oracle = tiled(decode)
            norms.mode = "sum"
            tiled(decode)
            norms.from_sums()
            norms.mode = "use"
            two_pass = tiled(decode)
            norms.mode = "off"
            mid = dec.mid(dec.conv_in(vae.post_quant_conv(z)))
            global_mid = tiled(upper, mid)
            print(f"| {tile} | {psnr(plain, whole):.1f} | {psnr(with_oracle, whole):.1f} | "
                  f"{psnr(two_pass, whole):.1f} | {psnr(global_mid, whole):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
