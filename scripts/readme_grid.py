"""Draw the README's grid: prompts the bundled default model draws well, and prompts it fails.

    .venv/bin/python scripts/readme_grid.py [-o docs/images/grid.png]

Each image is made by `ember generate PROMPT --seed 0 --dtype fp32` (the same command a user runs;
seed 0 is the CLI's default, fp32 makes the grid the same on every CPU), so the grid shows
what a user gets, not the best of several seeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GOOD = [
    "a woman: red hair, noto style",
    "a green triangle right of a pink heart",
    "four orange stars",
    "a smiling face with smiling eyes, twemoji style",
]
BAD = [
    "a slice of pizza, twemoji style",  # an emoji seen too rarely in training: a red blob
    "a dog, twemoji style",  # the same
    "a cat sitting on a sofa",  # nothing like it in the training data
    "a yellow star above a purple heart",  # two stars, not one
]

TILE = 96  # pixels per image (the model draws 64x64; scaled up for reading)
LABEL_H = 40  # room for two or three lines of caption under each tile
ROW_TITLE_W = 70


def generate(prompt: str, out: Path) -> Image.Image:
    """Run the ember CLI exactly as a user would, and read the PNG back."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ember.cli", "generate", prompt, "--seed", "0"]
    cmd += ["--dtype", "fp32", "-q", "-o", str(out)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return Image.open(out).convert("RGB")


def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/images/grid.png"))
    a = ap.parse_args()

    rows = [("draws\nwell", GOOD), ("fails", BAD)]
    cols = max(len(prompts) for _, prompts in rows)
    grid = Image.new("RGB", (ROW_TITLE_W + cols * TILE, len(rows) * (TILE + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    title_font = ImageFont.load_default(size=13)
    with tempfile.TemporaryDirectory() as tmp:
        for r, (title, prompts) in enumerate(rows):
            y = r * (TILE + LABEL_H)
            draw.multiline_text((6, y + TILE // 2 - 14), title, fill="black", font=title_font)
            for c, prompt in enumerate(prompts):
                image = generate(prompt, Path(tmp) / f"{r}-{c}.png")
                x = ROW_TITLE_W + c * TILE
                grid.paste(image.resize((TILE, TILE), Image.LANCZOS), (x, y))
                label = "\n".join(wrap(prompt, 19))
                draw.multiline_text((x + 3, y + TILE + 2), label, fill="black", font=font)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # A palette keeps the file a few tens of kB; the tiles are flat colours.
    grid.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(a.out, optimize=True)
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
