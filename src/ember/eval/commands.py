"""`ember eval geneval|emoji`: generate for a fixed prompt set, score, write a JSON report and a sheet."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ember.errors import EmberError

EMOJI_SAMPLE = 100
EMOJI_SEED = 20261128  # fixed forever: changing it changes which emoji are scored
VALIDATION_SEED = 20261203  # the validation sample's, drawn from the emoji the test sample leaves
FEATURE_SIDE = 16


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model (GenEval-style shapes, emoji recognition)")
    esub = p.add_subparsers(dest="eval_command", metavar="SUITE", required=True)

    g = esub.add_parser(
        "geneval",
        help="GenEval-style compositional score on the shapes world",
        description="Generate images for the fixed shapes-world prompt set and score each like "
        "GenEval (six categories; overall = unweighted mean of the categories).",
    )
    g.add_argument("--split", choices=["held-out", "in-distribution"], default="held-out")
    g.add_argument("--images-per-prompt", type=int, default=4)
    _common(g)
    g.set_defaults(run=run_geneval)

    e = esub.add_parser(
        "emoji",
        help="how often a generated emoji's nearest dataset image is the prompted one",
        description=f"For a fixed sample of {EMOJI_SAMPLE} emoji, generate one image each from its "
        "caption and find the nearest image among every emoji on white, of both styles (in "
        f"{FEATURE_SIDE}x{FEATURE_SIDE} RGB space); a hit is the prompted emoji in the prompted "
        "style. Report top-1 and top-5 accuracy.",
    )
    e.add_argument("--data", required=True, help="the emoji dataset folder (`ember data emoji`)")
    e.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="test: the fixed sample the model card reports; validation: another fixed sample, "
        "disjoint from it, for choosing settings (e.g. a checkpoint) without looking at the test",
    )
    _common(e)
    e.set_defaults(run=run_emoji)


def _common(p) -> None:
    from ember.settings import add_generation_args

    p.add_argument("--model", help="model to score (default: the bundled model)")
    add_generation_args(p, ("sampler", "steps", "cfg", "layout_guidance", "seed"))
    p.add_argument("--batch", type=int, default=16, help="images per U-Net batch")
    p.add_argument("-o", "--out", default="eval-out", help="folder for report.json and sheet.png")


def _generate(service, base, prompts: list[str], seeds: list[int], args) -> list[np.ndarray]:
    """One image per (prompt, seed), `args.batch` requests per U-Net batch."""
    import dataclasses

    from ember.service import Request

    out: list[np.ndarray] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), args.batch):
        chunk = zip(
            prompts[start : start + args.batch], seeds[start : start + args.batch], strict=True
        )
        reqs = [Request(dataclasses.replace(base, prompt=p, seed=s)) for p, s in chunk]
        for images in service.generate(reqs):
            out.extend(image.pixels for image in images)
        rate = len(out) / (time.perf_counter() - started)
        print(
            f"\rember eval: {len(out)}/{len(prompts)} images ({rate:.1f}/s)",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    return out


def _load(args):
    """The scoring service with the model loaded, and the settings every image shares."""
    from ember.catalog import resolve_model_path
    from ember.service import GenerationService
    from ember.settings import params_from_args

    if getattr(args, "images_per_prompt", 1) < 1:
        raise EmberError("--images-per-prompt must be at least 1")
    if not 1 <= args.batch <= 64:
        raise EmberError(f"--batch {args.batch} is not allowed: use 1 to 64")
    service = GenerationService("fp32")
    service.load(resolve_model_path(args.model))
    return service, service.prepare(params_from_args(args))


def _write(out: Path, report: dict, sheet) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    sheet.save(out / "sheet.png")
    print(out / "report.json")


def run_geneval(args: argparse.Namespace) -> int:
    from ember.eval.geneval import PROMPT_SETS, contact_sheet, evaluate

    service, base = _load(args)
    prompts = PROMPT_SETS[args.split]
    k = args.images_per_prompt
    texts = [p.prompt for p in prompts for _ in range(k)]
    seeds = [base.seed + i for _ in prompts for i in range(k)]
    images = _generate(service, base, texts, seeds, args)
    by_prompt = {p.prompt: images[i * k : (i + 1) * k] for i, p in enumerate(prompts)}
    report = evaluate(by_prompt)
    report.update(_settings(service.model, base, split=args.split, images_per_prompt=k))
    print(json.dumps({"overall": report["overall"], **report["per_category"]}, indent=2))
    first = [by_prompt[p.prompt][0] for p in prompts]
    _write(Path(args.out), report, contact_sheet(first, [p.prompt for p in prompts]))
    return 0


def _settings(loaded, base, **extra) -> dict:
    return {
        "model": loaded.name,
        "model_sha256": loaded.sha256,
        "sampler": base.sampler,
        "steps": base.steps,
        "cfg": base.cfg,
        "layout_guidance": base.layout_guidance,
        "seed": base.seed,
        **extra,
    }


def features(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 768) mean colour of each 4x4 cell.

    The eval asks whether a generated image shows the prompted emoji; a small model's errors are in
    fine detail, while the identity of an emoji at 64 px is carried by its coarse colour layout.
    """
    n, h, w, c = images.shape
    f = FEATURE_SIDE
    x = images.reshape(n, f, h // f, f, w // f, c).astype(np.float32).mean(axis=(2, 4)) / 255.0
    return x.reshape(n, -1)


class EmojiSample:
    """The emoji eval's fixed sample and its reference set (every emoji on white in `data`).

    `prompts[n]` asks for reference `chosen[n]`; `score(images)` finds each image's nearest
    reference in the feature space and reports how often it is the prompted emoji. The "test"
    split is the sample the model card reports; "validation" is a second fixed sample of the
    emoji without skin tones that the test sample does not hold.
    """

    def __init__(self, data: Path, split: str = "test") -> None:
        from ember.data.folder import load_dataset

        if not (data / "manifest.jsonl").exists():
            raise EmberError(f"{data} is not an emoji dataset (run `ember data emoji {data}`)")
        ds = load_dataset(data)
        refs = [(i, it) for i, it in enumerate(ds.items)
                if it.meta.get("emoji", {}).get("background") == "white"]  # fmt: skip
        if not refs:
            raise EmberError(f"{data} has no emoji on a white background")
        self.ref_files = [it.file for _, it in refs]  # relative to `data`
        self.keys = [(it.meta["emoji"]["unified"], it.file.split("/")[1]) for _, it in refs]
        self.ref_images = np.stack([ds.load_image(i) for i, _ in refs])  # (R, 64, 64, 3)
        self.ref_feats = features(self.ref_images)
        plain = [j for j, (_, it) in enumerate(refs) if it.meta["emoji"].get("tone") is None]
        self.split = split
        self.chosen = _draw(plain, EMOJI_SEED)
        if split == "validation":
            rest = sorted(set(plain) - set(self.chosen))
            if not rest:
                raise EmberError(f"{data} has no emoji outside the test sample to validate on")
            self.chosen = _draw(rest, VALIDATION_SEED)
        self.prompts = [_caption(refs[j][1]) for j in self.chosen]

    def score(self, images: np.ndarray) -> dict:
        """(N, 64, 64, 3) uint8, one per prompt -> top-1/top-5 report (with per-prompt hits)."""
        dist = ((features(images)[:, None, :] - self.ref_feats[None]) ** 2).sum(-1)  # (N, R)
        order = np.argsort(dist, axis=1)
        keys, chosen = self.keys, self.chosen
        top1 = [keys[order[n, 0]] == keys[j] for n, j in enumerate(chosen)]
        top5 = [keys[j] in {keys[m] for m in order[n, :5]} for n, j in enumerate(chosen)]
        # where the prompted emoji ranks among all references (0 = nearest): progress below top-1
        ranks = [int(np.flatnonzero(order[n] == j)[0]) for n, j in enumerate(chosen)]
        return {
            "top1": float(np.mean(top1)),
            "top5": float(np.mean(top5)),
            "median_rank": float(np.median(ranks)),
            "n": len(chosen),
            "split": self.split,
            "candidates": len(keys),
            "chance_top1": 1 / len(keys),
            "feature_space": f"{FEATURE_SIDE}x{FEATURE_SIDE} mean RGB, L2",
            "per_prompt": {p: bool(t) for p, t in zip(self.prompts, top1, strict=True)},
        }


def run_emoji(args: argparse.Namespace) -> int:
    from ember.eval.geneval import contact_sheet

    sample = EmojiSample(Path(args.data), args.split)
    prompts = sample.prompts
    service, base = _load(args)
    seeds = [base.seed + n for n in range(len(prompts))]
    images = np.stack(_generate(service, base, prompts, seeds, args))
    report = sample.score(images) | _settings(service.model, base)
    keys = ("top1", "top5", "median_rank", "n", "candidates")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    labels = [("OK " if report["per_prompt"][p] else "-- ") + p for p in prompts]
    _write(Path(args.out), report, contact_sheet(list(images), labels, columns=10))
    return 0


def _draw(pool: list[int], seed: int) -> list[int]:
    """A fixed sample of up to EMOJI_SAMPLE reference indices from `pool`, sorted."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pool, size=min(EMOJI_SAMPLE, len(pool)), replace=False).tolist())


def _caption(item) -> str:
    return item.captions[0]
