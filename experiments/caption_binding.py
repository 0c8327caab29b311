"""Does a model's denoiser use relation and colour-binding words? A diffusion-classifier probe.

    .venv/bin/python experiments/caption_binding.py [MODEL.safetensors ...] [--seeds 4] [--draws 32]

For each GenEval prompt of the position and colour-attribution categories, ground-truth renders of
its scene are noised at random timesteps and denoised under the true caption and under a minimally
wrong one (position: the converse relation, "left of" -> "right of"; colour attribution: the two
colours swapped), with the same noise and timesteps. A model that reads those words predicts the
true scene better under the true caption (Li et al. 2023, "Your Diffusion Model is Secretly a
Zero-Shot Classifier"). Reported per category: how often the true caption has the lower loss
(0.5 = the words are ignored) and the mean relative loss gap, overall and per timestep band (where
in the schedule the words change the prediction). Unlike GenEval scores, this separates
models early in training and needs no sampling.
"""

import argparse
import dataclasses
import itertools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_MODEL, load  # noqa: E402 (experiments/common.py)

from ember.data.shapes import CONVERSE, SceneSpec, describe  # noqa: E402
from ember.diffusion.losses import DiffusionLoss  # noqa: E402
from ember.eval.geneval import PROMPT_SETS, render_spec  # noqa: E402
from ember.prompts import encode_prompts  # noqa: E402

CATEGORIES = ("position", "color_attr")


def flipped(spec: SceneSpec) -> SceneSpec:
    """The minimally wrong scene: converse relation, or the two objects' colours swapped."""
    if spec.category == "position":
        return dataclasses.replace(spec, relation=CONVERSE[spec.relation])
    a, b = spec.objects
    swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    return dataclasses.replace(spec, objects=swapped)


def by_timestep(per_t: list[tuple[int, float, float]], edges=(50, 250, 450, 650, 850, 950)) -> dict:
    """Where in the noise schedule the words matter: per timestep band, how often a single draw's
    loss is lower under the true caption, and the band's relative loss gap in percent."""
    out = {}
    for lo, hi in itertools.pairwise(edges):
        band = [(a, b) for t, a, b in per_t if lo <= t < hi]
        if band:
            true, wrong = np.array(band).T
            out[f"t{lo}-{hi}"] = {
                "true_caption_wins": float(np.mean(true < wrong)),
                "gap_percent": 100 * float((wrong.sum() - true.sum()) / true.sum()),
                "draws": len(band),
            }
    return out


@torch.no_grad()
def probe(model: str, split: str, seeds: int, draws: int) -> dict:
    loaded = load(model)
    unet, vae = loaded.model.model.diffusion_model, loaded.model.first_stage_model
    encoder, cfg = loaded.model.cond_stage_model, loaded.config
    loss_fn = DiffusionLoss(cfg.schedule, prediction=cfg.schedule.prediction)
    report = {"model": model, "split": split, "seeds": seeds, "draws": draws}
    for category in CATEGORIES:
        wins, gaps, per_t = [], [], []  # per_t: (t, true loss, wrong loss) of every draw
        for p in [p for p in PROMPT_SETS[split] if p.spec.category == category]:
            captions = (describe(p.spec), describe(flipped(p.spec)))
            ctx = torch.cat([encode_prompts(c, "", loaded.tokenizer, encoder)[0] for c in captions])
            for s in range(seeds):
                pixels = torch.tensor(render_spec(p.spec, seed=s)).permute(2, 0, 1)[None]
                x0 = vae.encode(pixels.float() / 127.5 - 1).mean * cfg.vae.scaling_factor
                x0 = x0.expand(draws, -1, -1, -1)  # (draws, C, h, w)
                gen = torch.Generator().manual_seed(1000 * s + 7)
                t = torch.randint(50, 950, (draws,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                x_t = loss_fn.add_noise(x0, noise, t)
                true_draws, wrong_draws = (
                    loss_fn(unet(x_t, t.float(), c[None].expand(draws, -1, -1)), x0, noise, t)
                    for c in ctx
                )
                per_t += zip(t.tolist(), true_draws.tolist(), wrong_draws.tolist(), strict=True)
                true_loss, wrong_loss = true_draws.mean().item(), wrong_draws.mean().item()
                wins.append(true_loss < wrong_loss)
                gaps.append((wrong_loss - true_loss) / true_loss)
        report[category] = {
            "true_caption_wins": float(np.mean(wins)),
            "mean_gap_percent": 100 * float(np.mean(gaps)),
            "scenes": len(wins),
            "by_timestep": by_timestep(per_t),
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=[str(DEFAULT_MODEL)])
    ap.add_argument("--split", default="in-distribution", choices=sorted(PROMPT_SETS))
    ap.add_argument("--seeds", type=int, default=4, help="renders per prompt")
    ap.add_argument("--draws", type=int, default=32, help="(timestep, noise) draws per render")
    args = ap.parse_args()
    for model in args.models:
        print(json.dumps(probe(model, args.split, args.seeds, args.draws)))


if __name__ == "__main__":
    main()
