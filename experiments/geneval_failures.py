"""Why a model's GenEval images fail: each failing image's detections against its prompt, tallied.

    .venv/bin/python experiments/geneval_failures.py [MODEL.safetensors] [--split in-distribution]
        [--images-per-prompt 4] [--cfg 5] [--vae-round-trip]

Generates exactly as `ember eval geneval` does (same prompts, seeds, sampler) and, for every image
the scorer rejects, prints the reason: a named shape drawn as another one (e.g. a small star that
comes out round), swapped colours, a miscount, or both shapes present with the relation wrong.
`--vae-round-trip` scores the model's VAE round trip of ground-truth renders instead of generated
images, so the two tallies show which failures the VAE already causes.
"""

import argparse
import collections
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_MODEL, generate_images, load  # noqa: E402 (experiments/common.py)

from ember.eval.geneval import PROMPT_SETS, detect, render_spec, score  # noqa: E402


def reason(image: np.ndarray, spec) -> str:
    """One line naming what a rejected image got wrong."""
    dets = detect(image)
    got = sorted({(d.shape, d.colour) for d in dets})
    want = sorted({(o.shape, o.colour) for o in spec.objects})
    if spec.category == "counting":
        o = spec.objects[0]
        n = sum(d.shape == o.shape and d.colour == o.colour for d in dets)
        return f"count: want {o.count}, got {n} of {len(dets)} objects"
    if spec.category == "position":
        shapes = {d.shape for d in dets}
        if all(o.shape in shapes for o in spec.objects):
            return "both shapes drawn, relation wrong"
        missing = [o.shape for o in spec.objects if o.shape not in shapes]
        return f"shape missing: {missing} (drawn: {sorted(shapes)})"
    want_shapes = {s for s, _ in want}
    got_shapes = {s for s, _ in got}
    if want_shapes <= got_shapes:
        return f"colours wrong: want {want}, got {got}"
    return f"shape missing: {sorted(want_shapes - got_shapes)} (drawn: {sorted(got_shapes)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="in-distribution", choices=list(PROMPT_SETS))
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--layout-guidance", type=float, help="default: the model's")
    ap.add_argument("--vae-round-trip", action="store_true")
    args = ap.parse_args()
    loaded = load(args.model)
    prompts = PROMPT_SETS[args.split]
    k = args.images_per_prompt
    if args.vae_round_trip:
        gt = np.stack([render_spec(p.spec, s) for p in prompts for s in range(k)])
        x = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            vae = loaded.model.first_stage_model
            y = vae.decode(vae.encode(x.to(loaded.dtype)).mode()).float()
        images = list(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    else:
        texts = [p.prompt for p in prompts for _ in range(k)]
        seeds = [i for _ in prompts for i in range(k)]
        images = generate_images(loaded, texts, seeds, cfg=args.cfg, layout_guidance=args.layout_guidance)
    tally = collections.Counter()
    failed = collections.Counter()
    for i, image in enumerate(images):
        spec = prompts[i // k].spec
        if not score(image, spec):
            failed[spec.category] += 1
            tally[(spec.category, reason(image, spec))] += 1
    n = len(images) // len({p.spec.category for p in prompts})
    for cat in failed:
        print(f"{cat}: {failed[cat]} of {n} images fail")
        for (c, why), count in tally.most_common():
            if c == cat:
                print(f"  {count:3d}  {why}")


if __name__ == "__main__":
    main()
