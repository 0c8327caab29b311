"""What the approximate speed levers buy and cost: token merging (`--tome`) and DeepCache
(`--deepcache`), each against ember's own exact image of the same seed and settings.

    .venv/bin/python bench/levers.py [--threads 2] [--rounds 3] [--out FILE.md]
    .venv/bin/python bench/levers.py --size 256 --steps 4 --rounds 1    # a smoke run

Part 1, speed and cost: the SD 1.5 architecture with random weights (the folder `bench/speed.py`
builds in --cache), --size (512) square, one image, bf16 weights where the CPU has native bf16
(else fp32, as `--dtype auto`), for two recipes: dpm20 (--steps DPM++ 2M, cfg 7, the full VAE) and
lcm4 (4 steps LCM, cfg 1, TAESD: the few-step recipe of `bench/fewstep.py` without its LoRA, which
changes no timing here). Rows: exact, tome 0.3, tome 0.5, deepcache 2, deepcache 3, and tome 0.5
with deepcache 2. Each row makes one warm-up image (its quality image: the timed ones are the same
pixels), then the rows are interleaved round by round in one process, so load on the machine hits
all alike; seconds per image are medians over --rounds.

Part 2, cost on a trained model: the bundled default model (ember-small, 64x64, its own defaults:
20 steps DPM++ 2M, cfg 5, layout guidance 2) over --quality-images prompts x seeds, the same rows.
Random SD weights make a picture whose PSNR says how far the levers move the network's output,
not how much a viewer would notice; the trained model's images are the better guide to that.

Quality columns: PSNR (dB) of the decoded 8-bit image against the exact one, and the mean absolute
pixel difference (/255), averaged over the images of the row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from common import machine, write_report

PROMPT = "a photograph of an astronaut riding a horse"
# Prompts the bundled model was trained for: shapes, a relation (layout guidance acts), emoji.
SMALL_PROMPTS = (
    "a red circle left of a blue square",
    "three red squares on a white background",
    "a slice of pizza, twemoji style",
    "an orange heart above a blue circle",
)


@dataclass(frozen=True)
class Lever:
    label: str
    tome: float = 0.0
    deepcache: int = 1


LEVERS = (
    Lever("exact"),
    Lever("tome 0.3", tome=0.3),
    Lever("tome 0.5", tome=0.5),
    Lever("deepcache 2", deepcache=2),
    Lever("deepcache 3", deepcache=3),
    Lever("tome 0.5 + deepcache 2", tome=0.5, deepcache=2),
)


@dataclass(frozen=True)
class Recipe:
    title: str
    sampler: str
    steps: int
    cfg: float
    taesd: bool = False


def recipes(steps: int) -> dict[str, Recipe]:
    return {
        "dpm20": Recipe(f"{steps} steps DPM++ 2M, cfg 7, full VAE", "dpmpp_2m", steps, 7.0),
        "lcm4": Recipe("4 steps LCM, cfg 1, TAESD", "lcm", 4, 1.0, taesd=True),
    }


def quality(images: list[np.ndarray], exact: list[np.ndarray]) -> tuple[float, float]:
    """(mean PSNR in dB, mean absolute difference / 255) of uint8 images against the exact ones."""
    psnrs, diffs = [], []
    for a, b in zip(images, exact, strict=True):
        err = a.astype(np.float64) - b.astype(np.float64)
        mse = float((err**2).mean())
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
        diffs.append(float(np.abs(err).mean()) / 255)
    return statistics.mean(psnrs), statistics.mean(diffs)


def run_rows(service, params_of, rounds: int) -> dict[str, dict]:
    """Per lever: its images (one per entry of `params_of(lever)`) and seconds per image."""
    from ember.service import Request

    def make(lever: Lever) -> list[np.ndarray]:
        return [img.pixels for p in params_of(lever) for img in service.generate([Request(p)])[0]]

    rows = {lever.label: {"images": make(lever), "times": []} for lever in LEVERS}  # warm-up
    for _ in range(rounds):
        for lever in LEVERS:
            n = len(params_of(lever))
            t = time.perf_counter()
            make(lever)
            rows[lever.label]["times"].append((time.perf_counter() - t) / n)
    return rows


def table(rows: dict[str, dict], lead: str) -> list[str]:
    exact = rows["exact"]
    base = statistics.median(exact["times"]) if exact["times"] else math.nan
    out = []
    for label, row in rows.items():
        sec = statistics.median(row["times"]) if row["times"] else math.nan
        db, mad = quality(row["images"], exact["images"])
        psnr_text = "exact" if math.isinf(db) else f"{db:.1f}"
        out.append(
            f"| {lead} | {label} | {sec:.3f} | {base / sec:.2f}x | {psnr_text} | {mad:.4f} |"
        )
    return out


HEAD = [
    "| recipe | lever | s / image | speed-up | PSNR vs exact (dB) | mean abs diff (/255) |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="steps of the dpm20 recipe")
    ap.add_argument("--recipes", default="dpm20,lcm4")
    ap.add_argument("--quality-images", type=int, default=8,
                    help="bundled model: images per row (prompts x seeds); 0 skips the part")  # fmt: skip
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch
    from fewstep import taesd_folder
    from speed import sd15_folder

    from ember.catalog import DEFAULT_MODEL
    from ember.service import GenerationService
    from ember.settings import GenerationParams

    torch.set_num_threads(a.threads)
    where = machine()
    a.cache.mkdir(parents=True, exist_ok=True)
    sd15 = sd15_folder(a.cache)
    service = GenerationService("auto", embeddings_dir=a.cache / "no-embeddings")
    dtype = str(service.dtype).removeprefix("torch.")
    lines = [
        "# The approximate levers: speed and cost against ember's exact image",
        "",
        f"Command: `.venv/bin/python bench/levers.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {where}; {a.threads} threads, {dtype} weights.",
        "",
        f"SD 1.5 architecture, random weights, {a.size}x{a.size}, one image, seed 0, medians of "
        f"{a.rounds} interleaved rounds. Random weights: the PSNR says how far each lever moves "
        "the network's output, not how visible that is (part 2 below).",
        "",
        *HEAD,
    ]
    all_recipes = recipes(a.steps)
    for name in [r for r in a.recipes.split(",") if r]:
        r = all_recipes[name]
        service.load(sd15, vae=taesd_folder(a.cache) if r.taesd else None)
        base = GenerationParams(
            prompt=PROMPT, sampler=r.sampler, steps=r.steps, cfg=r.cfg, width=a.size,
            height=a.size, seed=0,
        )  # fmt: skip
        rows = run_rows(service, lambda lv, b=base: [replace(b, tome=lv.tome,
                        deepcache=lv.deepcache)], a.rounds)  # fmt: skip
        lines += table(rows, f"{name}: {r.title}")
        print("\n".join(lines[-len(LEVERS) :]), file=sys.stderr, flush=True)
    if a.quality_images > 0:
        service.load(DEFAULT_MODEL)
        n = a.quality_images
        per_prompt = math.ceil(n / len(SMALL_PROMPTS))
        base = [GenerationParams(prompt=p, seed=s) for s in range(per_prompt)
                for p in SMALL_PROMPTS][:n]  # fmt: skip
        rows = run_rows(service, lambda lv: [replace(p, tome=lv.tome, deepcache=lv.deepcache)
                                             for p in base], a.rounds)  # fmt: skip
        lines += [
            "",
            f"The bundled model (ember-small, 64x64, its defaults: 20 steps DPM++ 2M, cfg 5, layout "
            f"guidance 2), {n} images per row ({len(SMALL_PROMPTS)} prompts x {per_prompt} "
            f"seed{'s' if per_prompt > 1 else ''}), "
            "quality averaged over them; ToMe merges at its 8x8 level (it has no attention at the "
            "16x16 latent's own resolution):",
            "",
            *HEAD,
            *table(rows, "ember-small 64x64"),
        ]
    write_report("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
