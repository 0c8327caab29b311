"""`ember data shapes|emoji`: build the licensed training sets."""

from __future__ import annotations

import argparse
import sys
import time

from ember.errors import EmberError


def add_data(sub) -> None:
    p = sub.add_parser("data", help="build training datasets (shapes world, emoji)")
    dsub = p.add_subparsers(dest="data_command", metavar="DATASET", required=True)

    s = dsub.add_parser(
        "shapes",
        help="procedural 64x64 scenes with ground truth (CC0)",
        description="Write N scenes of the shapes world with captions and ground truth. The "
        "held-out compositions never appear in the train split.",
    )
    s.add_argument("out", help="output folder (ember dataset format, see docs/datasets.md)")
    s.add_argument("--n", type=int, default=50000, help="number of images (default 50000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=["train", "held-out"], default="train")
    s.add_argument("--no-png", action="store_true", help="write only images.npy, not PNG files")
    s.add_argument(
        "--weights",
        default="",
        metavar="CAT=W,...",
        help="make categories more or less frequent, e.g. position=2,color_attr=1.5 (others 1)",
    )
    s.add_argument(
        "--no-mirror-captions",
        action="store_true",
        help="leave out the mirrored two-object captions (B right of A for A left of B), as "
        "generator version 1 did",
    )
    s.add_argument(
        "--relation-twins",
        action="store_true",
        help="follow every position scene with its twin: the same objects with their boxes "
        "reflected so that the relation is the converse (minimal pairs for learning relations); "
        "twins double the share of position images, --weights position=0.5 keeps it at 1/6",
    )
    s.add_argument(
        "--relation-captions",
        action="store_true",
        help="also caption two-object and colour-attribution scenes with where their objects "
        "stand (a red circle left of a blue square), read off the boxes; images unchanged",
    )
    s.set_defaults(run=run_shapes)

    e = dsub.add_parser(
        "emoji",
        help="Noto (Apache-2.0) and Twemoji (CC-BY-4.0) emoji with captions",
        description="Fetch the pinned emoji-datasource packages with `npm pack` into a cache (the "
        "only ember command that uses the network) and write an image-caption dataset.",
    )
    e.add_argument("out")
    e.add_argument("--cache", help="where the npm tarballs are kept (default ~/.cache/ember/emoji)")
    e.add_argument(
        "--backgrounds", default="white,blue,yellow,pink", help="comma-separated colours"
    )
    e.add_argument("--limit", type=int, help="keep only the first N emoji of each set")
    e.add_argument("--no-skin-tones", action="store_true", help="drop skin-tone variants")
    e.set_defaults(run=run_emoji)

    m = dsub.add_parser(
        "merge",
        help="combine dataset folders into one (licences kept per item)",
        description="Write a dataset folder whose manifest covers every source folder.",
    )
    m.add_argument("out")
    m.add_argument("sources", nargs="+")
    m.add_argument("--max-captions", type=int, help="keep each item's first N captions")
    m.set_defaults(run=run_merge)


def _fresh(out: str) -> None:
    from pathlib import Path

    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise EmberError(f"{out} exists and is not empty; choose a new folder")


def run_shapes(args: argparse.Namespace) -> int:
    from ember.data.shapes import generate_shapes

    if args.n < 1:
        raise EmberError(f"--n must be at least 1, got {args.n}")
    weights = _parse_weights(args.weights)
    _fresh(args.out)
    start = time.perf_counter()
    generate_shapes(
        args.out,
        args.n,
        args.seed,
        split=args.split,
        write_png=not args.no_png,
        weights=weights,
        mirror=not args.no_mirror_captions,
        twins=args.relation_twins,
        relations=args.relation_captions,
    )
    print(f"ember: {args.n} scenes in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(args.out)
    return 0


def _parse_weights(text: str) -> dict[str, float]:
    from ember.data.shapes import category_probabilities

    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")  # no "=": value is "", which float() refuses
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise EmberError(f"--weights: expected CATEGORY=NUMBER, got {part!r}") from None
    try:
        category_probabilities(weights)
    except ValueError as e:
        raise EmberError(f"--weights: {e}") from None
    return weights


def run_emoji(args: argparse.Namespace) -> int:
    from ember.data.emoji import build_emoji_dataset

    _fresh(args.out)
    backgrounds = tuple(b.strip() for b in args.backgrounds.split(",") if b.strip())
    try:
        build_emoji_dataset(
            args.out,
            cache_dir=args.cache,
            backgrounds=backgrounds,
            limit=args.limit,
            skin_tones=not args.no_skin_tones,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise EmberError(str(exc)) from None
    print(args.out)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ember.data.merge import merge_datasets

    if args.max_captions is not None and args.max_captions < 1:
        raise EmberError(f"--max-captions must be at least 1, got {args.max_captions}")
    merge_datasets(args.out, args.sources, max_captions=args.max_captions)
    print(args.out)
    return 0
