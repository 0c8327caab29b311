"""Where a VAE loses a shape on a given background: in its encoder or in its decoder.

    .venv/bin/python experiments/vae_background_probe.py [MODEL_OR_VAE.safetensors]

For each background, pairs of one-object scenes that differ only in the shape (a triangle, star,
square, heart or cross against a circle of the same colour, box and background; colours too close
to the background left out, as the shapes world does). Per background it prints the mean of:

- latent / pixel: how far apart the pair's latents (posterior means) are, per unit of how far apart
  their pixels are. A low value means the encoder merges the shapes.
- decoded / pixel: how far apart the pair's round trips are, per unit of the pixel distance. Below
  1, the round trip draws less of the difference than there was; where the latents stay apart but
  this falls, the decoder is what rounds the shapes.
- |z| and the round trip's mean L1 error.

`experiments/vae_ceiling.py --by-background` shows the score this costs.
"""

import argparse

import numpy as np
import torch
from vae_ceiling import load_file_vae  # a sibling script (experiments/ is on sys.path)

from ember.catalog import DEFAULT_MODEL
from ember.data.shapes import BACKGROUNDS, COLOURS, MIN_CONTRAST, PlacedObject, render_objects
from ember.train.data import to_pixels

SHAPES = ("triangle", "star", "square", "heart", "cross")
BOXES = ((22, 22, 42, 42), (8, 30, 24, 46))  # small objects, where shapes are lost first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--backgrounds", default="white,black,gray,green,blue")
    args = ap.parse_args()
    vae = load_file_vae(args.model)

    def pixels(image: np.ndarray) -> torch.Tensor:
        return to_pixels(torch.from_numpy(image.copy()).permute(2, 0, 1)[None])

    @torch.no_grad()
    def round_trip(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = vae.encode(x).mode()
        return z[0], vae.decode(z)[0]

    print("background  pairs  latent/pixel  decoded/pixel  |z|    L1 error")
    for bg in args.backgrounds.split(","):
        rows = []
        for colour in COLOURS:
            if np.linalg.norm(np.subtract(BACKGROUNDS[bg], COLOURS[colour])) < MIN_CONTRAST:
                continue
            for shape in SHAPES:
                for box in BOXES:
                    a = pixels(render_objects([PlacedObject(shape, colour, "small", box)], bg))
                    b = pixels(render_objects([PlacedObject("circle", colour, "small", box)], bg))
                    (za, ya), (zb, yb) = round_trip(a), round_trip(b)
                    dp = float((a - b).norm())
                    err = float((ya - a[0]).abs().mean())
                    rows.append(
                        (float((za - zb).norm()) / dp, float((ya - yb).norm()) / dp, za.norm(), err)
                    )
        lat, dec, zn, err = np.array(rows, dtype=float).mean(0)
        print(f"{bg:10s}  {len(rows):5d}  {lat:12.3f}  {dec:13.3f}  {zn:5.1f}  {err:.4f}")


if __name__ == "__main__":
    main()
