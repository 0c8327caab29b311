"""`python -m ember.train vae|unet ...` (what the tests and `torchrun -m` launch)."""

from __future__ import annotations

import sys

from ember.train.run import main_train_unet, main_train_vae


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("vae", "unet"):
        print("usage: python -m ember.train {vae,unet} DATA RUN_DIR [options]", file=sys.stderr)
        return 2
    return (main_train_vae if argv[0] == "vae" else main_train_unet)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
