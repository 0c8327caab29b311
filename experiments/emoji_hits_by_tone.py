"""Split an emoji eval's hits by whether the prompted emoji has skin-tone variants in the data.

    .venv/bin/python experiments/emoji_hits_by_tone.py EVAL_DIR/report.json EMOJI_DATA

`ember eval emoji` prompts for plain emoji only, but the U-Net's training data also holds each
person emoji in five skin tones: the same drawing (outline, hair, clothes) in six colourings, so
those emoji are seen about six times as often as the others. If recognition is bounded by how often
an emoji is seen, the hits gather on them. Prints hits / prompts for each group.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path, help="report.json of `ember eval emoji`")
    ap.add_argument("data", type=Path, help="the eval's --data (an `ember data emoji` folder)")
    args = ap.parse_args()
    # A variant's caption is its plain emoji's with the tone appended ("..., noto style, medium
    # skin tone"), so the plain captions of emoji with variants are those captions minus the tone.
    toned = set()
    for line in (args.data / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        tone = row["emoji"]["tone"]
        if tone is not None and row["emoji"]["background"] == "white":
            toned.add(row["caption"][0].removesuffix(f", {tone}"))
    counts = {True: [0, 0], False: [0, 0]}
    for prompt, hit in json.loads(args.report.read_text())["per_prompt"].items():
        group = counts[prompt in toned]
        group[0] += bool(hit)
        group[1] += 1
    for has_tones, (hits, n) in sorted(counts.items(), reverse=True):
        label = "with skin-tone variants" if has_tones else "without"
        print(f"{label:24s} {hits:3d} / {n:3d} recognised ({hits / max(n, 1):.2f})")


if __name__ == "__main__":
    main()
