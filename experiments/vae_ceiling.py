"""How much of the shapes-world GenEval score a VAE allows: score its reconstructions of ground truth.

    .venv/bin/python experiments/vae_ceiling.py [MODEL_OR_VAE.safetensors] [--seeds 2] [--emoji DATA]
        [--by-background]

A diffusion model decodes through its VAE, so the VAE's round trip of perfect renders is a ceiling
on what the model can score. With `--emoji DATA` (an `ember data emoji` folder) it also scores the
round trip of the emoji eval's 100 prompted emoji, as `ember eval emoji` scores generated ones.
`--by-background` also prints each background's mean score (prompts, score): the L1 loss weighs an
edge by its contrast, so a VAE can keep shapes on white and lose them on a mid-tone background.
"""

import argparse
import collections
from pathlib import Path

import torch

from ember.catalog import DEFAULT_MODEL
from ember.checkpoints import CONFIG_KEY
from ember.config import ModelConfig, get_preset
from ember.eval.commands import EmojiSample
from ember.eval.geneval import PROMPT_SETS, evaluate, render_spec
from ember.safetensors_io import check_safetensors
from ember.train.vae import load_vae


def load_file_vae(path: str) -> torch.nn.Module:
    """The VAE of a model or VAE file, built from the file's own config."""
    meta = check_safetensors(path).get("__metadata__") or {}
    config = (
        ModelConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else get_preset("ember-small")
    )
    return load_vae(path, config)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--emoji", default="", help="emoji dataset folder: score its round trip too")
    ap.add_argument("--by-background", action="store_true", help="score each background apart")
    args = ap.parse_args()
    vae = load_file_vae(args.model)
    for split, prompts in PROMPT_SETS.items():
        images = {}
        for p in prompts:
            batch = torch.stack(
                [torch.from_numpy(render_spec(p.spec, s)) for s in range(args.seeds)]
            )
            x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                y = vae.decode(vae.encode(x).mode())
            images[p.prompt] = list(
                ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            )
        r = evaluate(images)
        cats = ", ".join(f"{k} {v:.2f}" for k, v in r["per_category"].items())
        print(f"{split}: overall {r['overall']:.3f} ({cats})")
        if args.by_background:
            by_bg = collections.defaultdict(list)
            for p in prompts:
                by_bg[p.spec.background].append(r["per_prompt"][p.prompt])
            means = [f"{bg} {sum(v) / len(v):.2f} ({len(v)})" for bg, v in sorted(by_bg.items())]
            print("  by background: " + ", ".join(means))
    if args.emoji:
        sample = EmojiSample(Path(args.emoji))
        x = torch.from_numpy(sample.ref_images[sample.chosen]).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            y = vae.decode(vae.encode(x / 127.5 - 1).mode())
        images = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        r = sample.score(images)
        print(f"emoji: top-1 {r['top1']:.2f}, top-5 {r['top5']:.2f}, median rank of the prompted "
              f"emoji {r['median_rank']:.0f} of {r['candidates']} ({r['n']} emoji)")  # fmt: skip


if __name__ == "__main__":
    main()
