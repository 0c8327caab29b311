"""Write the emoji eval's own 100 emoji as a training set: a diagnostic, never a shipped model's data.

    .venv/bin/python experiments/emoji_subset.py runs/dm/emoji runs/emoji-100

Fine-tuning a model on exactly the emoji that `ember eval emoji` prompts for measures how many views
of an emoji the U-Net needs before the eval recognises it (capacity and learning speed, with data
scarcity taken out). It is the test set, so a model trained on it says nothing about generalisation.
Items keep their licence, source and attribution; captions are the eval's prompts.

`--include CODE` adds one named emoji (both styles, on white), e.g. the quickstart's pizza (1f355),
to see how many views that one needs.

`--extra N` adds N other emoji on white (seeded, their first caption), so the same views of the
eval's 100 can be compared while the U-Net learns more emoji beside them: whether learning one
emoji is slowed by learning others (interference, capacity) or only by how often it is seen.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ember.eval.commands import EmojiSample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path, help="an `ember data emoji` folder (the eval's --data)")
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--extra", type=int, default=0, help="other emoji on white to add beside the 100"
    )
    ap.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="CODE",
        help="also add this emoji's plain images on white, both styles (unified code, e.g. 1f355)",
    )
    args = ap.parse_args()
    sample = EmojiSample(args.data)
    rows = {json.loads(line)["file"]: json.loads(line)
            for line in (args.data / "manifest.jsonl").read_text().splitlines()}  # fmt: skip
    out_rows = []

    def add(row: dict) -> None:
        dst = args.out / row["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.data / row["file"], dst)
        out_rows.append(row)

    for j, prompt in zip(sample.chosen, sample.prompts, strict=True):
        add(dict(rows[sample.ref_files[j]], caption=[prompt]))
    others = sorted(set(sample.ref_files) - {sample.ref_files[j] for j in sample.chosen})
    for file in np.random.default_rng(0).permutation(others)[: args.extra].tolist():
        add(dict(rows[file], caption=rows[file]["caption"][:1]))
    for code in args.include:
        name = f"{code.lower()}_white.png"
        found = [f for f in sorted(set(sample.ref_files)) if f.split("/")[-1] == name]
        if not found:
            raise SystemExit(f"no plain emoji on white with code {code} in {args.data}")
        for file in found:
            if file not in {r["file"] for r in out_rows}:
                add(dict(rows[file], caption=rows[file]["caption"][:1]))
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    print(
        f"{args.out}: {len(out_rows)} emoji ({len(out_rows) - len(sample.chosen)} beside the eval's)"
    )


if __name__ == "__main__":
    main()
