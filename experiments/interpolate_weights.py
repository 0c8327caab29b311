"""Interpolate a fine-tuned ember model's U-Net back towards the model it started from.

    .venv/bin/python experiments/interpolate_weights.py BASE.safetensors TUNED.safetensors ALPHA OUT.safetensors

Writes OUT = BASE + ALPHA * (TUNED - BASE) on the U-Net's floating-point weights (the `model.*`
tensors of a single-file checkpoint); every other tensor (VAE, anything else) and the file's
metadata come from BASE. ALPHA 0 gives BASE back, 1 gives TUNED's U-Net. This is the weight-space
ensembling of WiSE-FT: a fine-tune that teaches something new (the emoji) at the cost of something
old (the shapes) keeps more of the old at an ALPHA between, which docs/training.md measures
("The budget's last minutes") with `ember eval emoji` and `ember eval geneval` on each OUT.
"""

import argparse
import sys

from safetensors import safe_open
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("alpha", type=float)
    ap.add_argument("out")
    args = ap.parse_args()
    out = {}
    with safe_open(args.base, "pt") as base, safe_open(args.tuned, "pt") as tuned:
        metadata = base.metadata()
        tuned_keys = set(tuned.keys())
        for key in base.keys():
            x = base.get_tensor(key)
            if key.startswith("model.") and x.is_floating_point():
                if key not in tuned_keys:
                    sys.exit(
                        f"interpolate_weights: {args.tuned} has no tensor {key}; not the same architecture"
                    )
                y = tuned.get_tensor(key)
                if y.shape != x.shape:
                    sys.exit(
                        f"interpolate_weights: {key} is {tuple(y.shape)} in {args.tuned}, {tuple(x.shape)} in {args.base}"
                    )
                x = (x.float() + args.alpha * (y.float() - x.float())).to(x.dtype)
            out[key] = x.contiguous()
    save_file(out, args.out, metadata=metadata)
    print(
        f"wrote {args.out}: {args.base} + {args.alpha} x ({args.tuned} - {args.base}) on the U-Net"
    )


if __name__ == "__main__":
    main()
