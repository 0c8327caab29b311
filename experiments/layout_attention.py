"""Which cross-attention layers know where a named object is being drawn?

    .venv/bin/python experiments/layout_attention.py [MODEL.safetensors] [--split in-distribution]
        [--images-per-prompt 4]

Generates the eval's position prompts as `ember eval geneval` does and records every cross-attention
layer's map at every step. For each image where the detector finds both named shapes, it asks per
layer and per quarter of the steps: does the attention centroid of the first shape's word lie on the
same side of the second's (along the relation's axis) as the detected shapes do? 50% is chance.
Layout guidance (`ember.diffusion.layout`) steers the layers that answer this well; it is off here.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_MODEL, load  # noqa: E402 (experiments/common.py)

from ember.diffusion.layout import record_attention  # noqa: E402
from ember.eval.geneval import PROMPT_SETS, detect  # noqa: E402
from ember.images import tensor_to_uint8  # noqa: E402
from ember.pipeline import generate  # noqa: E402
from ember.prompts import layout_from_prompt  # noqa: E402
from ember.settings import GenerationParams  # noqa: E402

AXIS = {"left of": 0, "right of": 0, "above": 1, "below": 1}


def centroid(probs: torch.Tensor) -> np.ndarray:
    """(x, y) in [-1, 1] of a square map's (N,) weights."""
    side = int(round(probs.numel() ** 0.5))
    grid = torch.linspace(-1, 1, side)
    m = probs.reshape(side, side) / probs.sum()
    return np.array([float((m.sum(0) * grid).sum()), float((m.sum(1) * grid).sum())])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="in-distribution", choices=list(PROMPT_SETS))
    ap.add_argument("--images-per-prompt", type=int, default=4)
    args = ap.parse_args()
    loaded = load(args.model)
    unet = loaded.model.model.diffusion_model
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    layers = [unet.get_submodule(n) for n in names]
    steps = 20
    agree: dict[tuple[int, int], list[bool]] = {}
    found = 0
    for ep in (p for p in PROMPT_SETS[args.split] if p.category == "position"):
        subject, obj = layout_from_prompt(ep.prompt, loaded.tokenizer)
        a_shape, b_shape = (o.shape for o in ep.spec.objects)
        axis = AXIS[ep.spec.relation]
        for seed in range(args.images_per_prompt):
            params = GenerationParams(
                prompt=ep.prompt, sampler="dpmpp_2m", steps=steps, cfg=loaded.config.default_cfg,
                seed=seed, width=64, height=64, layout_guidance=0.0,
            )  # fmt: skip
            with record_attention(layers) as maps:
                image = tensor_to_uint8(generate(loaded, params))[0]
            dets = detect(image)
            a = [d for d in dets if d.shape == a_shape]
            b = [d for d in dets if d.shape == b_shape]
            if not (a and b):
                continue
            found += 1
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a[0].bbox, b[0].bbox
            drawn = np.sign(np.array([ax0 + ax1 - bx0 - bx1, ay0 + ay1 - by0 - by1])[axis])
            for k, probs in enumerate(maps):
                step, layer = divmod(k, len(layers))
                cond = probs[-1]  # (N, L): the conditional half of the CFG batch comes last
                sa = cond[:, list(subject.tokens)].sum(-1)
                sb = cond[:, list(obj.tokens)].sum(-1)
                side = np.sign((centroid(sa) - centroid(sb))[axis])
                agree.setdefault((layer, step * 4 // steps), []).append(bool(side == drawn))
    print(f"{'layer':<40} " + " ".join(f"steps {q * 5}-{q * 5 + 4}" for q in range(4)))
    for i, name in enumerate(names):
        row = [np.mean(agree.get((i, q), [np.nan])) for q in range(4)]
        print(f"{name:<40} " + " ".join(f"{v:11.2f}" for v in row))
    print(f"images with both shapes found: {found}")


if __name__ == "__main__":
    main()
