"""Where one emoji's own drawing ranks among the emoji eval's references, for a few seeds.

    .venv/bin/python experiments/emoji_prompt_rank.py DATA CODE [--model M] [--seeds 1 2 3 4]

For each style, generates the emoji's first caption (e.g. CODE 1f355: "a slice of pizza, twemoji
style") with the eval's settings (`ember eval emoji`: dpmpp_2m, 20 steps, the model's cfg) and
prints, per seed, the rank of the prompted drawing among every emoji on white in DATA in the eval's
feature space (0 = nearest, what the eval counts as recognised) and the nearest reference. The
eval scores a fixed sample; this follows one named emoji, such as the README quickstart's pizza.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data", type=Path, help="an `ember data emoji` folder (the eval's --data)")
    ap.add_argument("code", help="the emoji's unified code, e.g. 1f355")
    ap.add_argument("--model", help="default: the bundled model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--cfg", type=float, help="default: the model's")
    a = ap.parse_args()

    import numpy as np
    from common import generate_images, load  # experiments/common.py

    from ember.data.folder import load_dataset
    from ember.eval.commands import EmojiSample, features

    sample = EmojiSample(a.data)
    refs = [j for j, (code, _) in enumerate(sample.keys) if code.lower() == a.code.lower()]
    if not refs:
        raise SystemExit(f"no emoji on white with code {a.code} in {a.data}")
    captions = {it.file: it.captions[0] for it in load_dataset(a.data).items}
    loaded = load(a.model)
    for j in refs:
        prompt = captions[sample.ref_files[j]]
        images = np.stack(generate_images(loaded, [prompt] * len(a.seeds), a.seeds, cfg=a.cfg))
        dist = ((features(images)[:, None, :] - sample.ref_feats[None]) ** 2).sum(-1)
        order = np.argsort(dist, axis=1)
        ranks = [int(np.flatnonzero(row == j)[0]) for row in order]
        nearest = [sample.ref_files[row[0]] for row in order]
        print(f"{prompt!r} (cfg {a.cfg or 'the model default'}), seeds {a.seeds}: ranks {ranks}; nearest {nearest}")


if __name__ == "__main__":
    main()
