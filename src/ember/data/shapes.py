"""The shapes world: a procedural, CC0 text-to-image dataset with exact ground truth.

Scenes are 64x64 RGB images of 1-4 flat shapes (circle, square, triangle, star, heart, cross) in the
ten GenEval colours on a plain background. Captions cover GenEval's six categories (Ghosh et al.
2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"): single object,
two objects, counting, colours, position and colour attribution.

A fixed set of compositions (``HELD_OUT_PAIRS`` colour-shape pairs and ``HELD_OUT_RELATIONS``
shape-relation-shape triples) never occurs in the ``train`` split, so an evaluator can measure
compositional generalisation on them (``ember.eval.geneval``'s ``held-out`` split).

Randomness: sample ``i`` of a split is drawn from ``np.random.default_rng((seed, split_id, i))``, so
any sample can be regenerated on its own and generation is deterministic given the seed.
On-disk layout: see ``docs/datasets.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "2"  # 2: mirrored two-object captions; category weights
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down: exact area antialiasing

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

# The ten GenEval colours, chosen far apart in RGB so that a nearest-colour detector is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 230, 30),
    "green": (40, 170, 60),
    "blue": (35, 75, 230),
    "purple": (140, 50, 190),
    "pink": (255, 140, 205),
    "brown": (125, 75, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
# Backgrounds: the palette plus gray; white is the most common.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLOURS, "gray": (128, 128, 128)}
BACKGROUND_WEIGHTS = {name: 1.0 for name in BACKGROUNDS} | {"white": 8.0, "black": 2.0, "gray": 2.0}
# An object colour must be at least this far (RGB Euclidean) from the background colour.
MIN_CONTRAST = 100.0

SIZES = {"small": 16.0, "large": 24.0}  # bounding-box side in pixels at 64x64
GAP = 4.0  # minimum pixels between two objects' boxes, so blurred objects never merge
MARGIN = 2.0  # minimum pixels between a box and the image border

RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PHRASINGS = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}")

# Held out of the training split: one colour per shape, six distinct colours.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("blue", "triangle"),
        ("yellow", "heart"),
        ("green", "cross"),
        ("purple", "circle"),
        ("orange", "square"),
    }
)
# (shape A, relation, shape B); the converse statement (B, converse, A) is held out with it.
HELD_OUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("triangle", "above", "circle"), ("star", "left of", "heart"), ("cross", "below", "square")}
)
SPLITS = ("train", "held-out")
POSITION_THRESHOLD = 0.1  # GenEval's value


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one shape; ``colour`` None means the caption leaves it unsaid."""

    shape: str
    colour: str | None
    count: int = 1


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for. ``relation`` relates objects[0] to objects[1] (position only)."""

    category: str
    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None = None


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    colour: str
    size: str
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)


# ----------------------------------------------------------------------------- geometry


def shape_outline(shape: str) -> np.ndarray:
    """Polygon (K, 2) of ``shape`` filling the unit box [0, 1]^2, y pointing down."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "square":
        pts = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    elif shape == "triangle":
        pts = np.array([[0.5, 0], [1, 1], [0, 1]], float)
    elif shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)  # fat arms survive 16 px and blur
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    elif shape == "cross":
        a, b = 0.3, 0.7  # arm width 0.4 of the box
        pts = np.array(
            [[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b], [b, 1], [a, 1], [a, b], [0, b]]
            + [[0, a], [a, a]],
            float,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    lo, hi = pts.min(0), pts.max(0)
    return (pts - lo) / (hi - lo)


_OUTLINES = {s: shape_outline(s) for s in SHAPES}


def _draw(draw: ImageDraw.ImageDraw, shape: str, bbox, fill, scale: float) -> None:
    x0, y0, x1, y1 = (v * scale for v in bbox)
    pts = _OUTLINES[shape] * [x1 - x0, y1 - y0] + [x0, y0]
    draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)


def render_objects(
    objects: list[PlacedObject], background: str, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Draw ``objects`` on a plain ``background``: (H, W, 3) uint8, antialiased by supersampling."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw(draw, obj.shape, obj.bbox, COLOURS[obj.colour], SUPERSAMPLE * image_size / IMAGE_SIZE)
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))


def render_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Soft coverage mask (height, width) in [0, 1] of ``shape`` filling the whole box."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    _draw(ImageDraw.Draw(img), shape, (0, 0, width, height), 255, s)
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), np.float32) / 255.0


def relation_between(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> set[str]:
    """Position of box ``a`` relative to box ``b`` by GenEval's rule (``relative_position``).

    The centre offset is shrunk by ``POSITION_THRESHOLD`` times the summed box sizes; a relation
    holds when the shrunk offset's component along it exceeds half the offset length.
    """
    ba, bb = np.asarray(a, float).reshape(2, 2), np.asarray(b, float).reshape(2, 2)
    offset = ba.mean(0) - bb.mean(0)
    dims = (ba[1] - ba[0]) + (bb[1] - bb[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


# ----------------------------------------------------------------------------- scene sampling


def is_held_out(spec: SceneSpec) -> bool:
    """Whether ``spec`` uses any held-out colour-shape pair or relation triple."""
    if any((o.colour, o.shape) in HELD_OUT_PAIRS for o in spec.objects):
        return True
    if spec.relation is not None:
        a, b = spec.objects[0].shape, spec.objects[1].shape
        r = spec.relation
        return (a, r, b) in HELD_OUT_RELATIONS or (b, CONVERSE[r], a) in HELD_OUT_RELATIONS
    return False


def _pick_background(rng: np.random.Generator, colours: list[str]) -> str | None:
    names = [
        n
        for n in BACKGROUNDS
        if all(
            np.linalg.norm(np.subtract(BACKGROUNDS[n], COLOURS[c])) >= MIN_CONTRAST for c in colours
        )
    ]
    if not names:
        return None
    w = np.array([BACKGROUND_WEIGHTS[n] for n in names])
    return names[rng.choice(len(names), p=w / w.sum())]


def sample_spec(rng: np.random.Generator, category: str | None = None) -> SceneSpec:
    """Draw a random scene spec of ``category`` (random when None); no split filtering."""
    while True:
        cat = category or CATEGORIES[rng.integers(len(CATEGORIES))]
        colours = list(COLOURS)
        relation = None
        if cat in ("single_object", "colors"):
            objs = [ObjectSpec(SHAPES[rng.integers(6)], colours[rng.integers(10)])]
        elif cat == "counting":
            n = int(rng.integers(2, 5))
            objs = [ObjectSpec(SHAPES[rng.integers(6)], colours[rng.integers(10)], n)]
        else:
            s = rng.choice(6, 2, replace=False)
            if cat == "color_attr":
                c = rng.choice(10, 2, replace=False)
            else:
                c = rng.integers(10, size=2)
            objs = [ObjectSpec(SHAPES[s[k]], colours[c[k]]) for k in range(2)]
            if cat == "position":
                relation = RELATIONS[rng.integers(4)]
        background = _pick_background(rng, [o.colour for o in objs])
        if background is not None:
            return SceneSpec(cat, tuple(objs), background, relation)


def sample_split_spec(
    rng: np.random.Generator, split: str, category: str | None = None
) -> SceneSpec:
    """A spec for ``split``: ``train`` never uses a held-out composition, ``held-out`` always."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    for _ in range(10_000):
        spec = sample_spec(rng, category)
        if is_held_out(spec) == (split == "held-out"):
            return spec
    raise RuntimeError(f"could not sample a {split} spec for category {category}")


def layout_scene(
    spec: SceneSpec, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> list[PlacedObject]:
    """Place the objects of ``spec`` without overlap; position scenes satisfy the relation clearly.

    Position scenes must show exactly the stated relation under ``relation_between`` (never a
    diagonal that GenEval would also read as a second relation).
    """
    flat = [(o.shape, o.colour or "") for o in spec.objects for _ in range(o.count)]
    scale = image_size / IMAGE_SIZE
    for _ in range(1000):
        placed: list[PlacedObject] = []
        # Three or four objects go to distinct quadrants (random placement jams); fewer roam free.
        cells = rng.permutation(4) if len(flat) >= 3 else None
        for k, (shape, colour) in enumerate(flat):
            size = "large" if rng.random() < 0.5 else "small"
            side = SIZES[size] * rng.uniform(0.9, 1.1) * scale
            if cells is None:
                lo, hi = np.array([MARGIN, MARGIN]), np.full(2, image_size - MARGIN - side)
            else:
                half = image_size / 2
                cell = np.array([cells[k] % 2, cells[k] // 2]) * half
                lo = cell + np.where(cell == 0, MARGIN, GAP / 2)
                hi = cell + half - np.where(cell == 0, GAP / 2, MARGIN) - side
            x0, y0 = rng.uniform(lo, hi)
            box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
            if any(_boxes_close(box, p.bbox, GAP) for p in placed):
                break
            placed.append(PlacedObject(shape, colour, size, box))
        else:
            if spec.relation is None or relation_between(placed[0].bbox, placed[1].bbox) == {
                spec.relation
            }:
                return placed
    raise RuntimeError(f"could not lay out {spec}")


def _boxes_close(a, b, gap: float) -> bool:
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


# ----------------------------------------------------------------------------- captions


def _phrase(o: ObjectSpec, with_colour: bool = True) -> str:
    colour = f"{o.colour} " if (o.colour and with_colour) else ""
    if o.count == 1:
        word = f"{colour}{o.shape}"
        return ("an " if word[0] in "aeiou" else "a ") + word
    return f"{NUMBER_WORDS[o.count]} {colour}{PLURALS[o.shape]}"


def describe(spec: SceneSpec, with_colour: bool = True, with_background: bool = True) -> str:
    """The canonical caption, e.g. "a red circle left of a blue square on a white background"."""
    parts = [_phrase(o, with_colour) for o in spec.objects]
    text = f"{parts[0]} {spec.relation} {parts[1]}" if spec.relation else " and ".join(parts)
    return text + (f" on a {spec.background} background" if with_background else "")


def mirrored(spec: SceneSpec) -> SceneSpec | None:
    """The same scene stated the other way round, or None for one-object scenes.

    "A left of B" becomes "B right of A"; "A and B" becomes "B and A". Both describe the same image,
    so a model sees that a relation binds to the objects, not to the order of the words.
    """
    if len(spec.objects) != 2:
        return None
    relation = CONVERSE[spec.relation] if spec.relation else None
    return SceneSpec(spec.category, spec.objects[::-1], spec.background, relation)


def caption_variants(spec: SceneSpec, rng: np.random.Generator, mirror: bool = True) -> list[str]:
    """Canonical caption first, then one random phrasing (prefix, optional background/colours),
    then (``mirror``) for two-object scenes the canonical caption of the mirrored statement."""
    drop_colour = spec.category in ("single_object", "two_object") and rng.random() < 0.15
    alt = describe(spec, with_colour=not drop_colour, with_background=rng.random() < 0.7)
    alt = PHRASINGS[rng.integers(len(PHRASINGS))].format(alt)
    other = mirrored(spec) if mirror else None
    variants = [describe(spec), alt] + ([describe(other)] if other else [])
    return list(dict.fromkeys(variants))


# ----------------------------------------------------------------------------- generation


def category_probabilities(weights: dict[str, float] | None) -> np.ndarray | None:
    """Normalised probabilities over ``CATEGORIES`` (unnamed categories weigh 1); None: uniform."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {list(CATEGORIES)}")
    w = np.array([float(weights.get(c, 1.0)) for c in CATEGORIES])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"category weights must be >= 0 and not all 0, got {weights}")
    return w / w.sum()


def generate_sample(
    seed: int,
    split: str,
    index: int,
    probs: np.ndarray | None = None,
    mirror: bool = True,
    relations: bool = False,
) -> tuple[np.ndarray, dict]:
    """Sample ``index`` of ``split``: the image (64, 64, 3) uint8 and its ground-truth record.

    ``probs`` (from ``category_probabilities``) draws the category first; None keeps them uniform.
    ``mirror=False`` leaves out the mirrored captions (generator version 1's captions).
    ``relations=True`` adds ``relation_captions`` to two-object scenes (the image is unchanged).
    """
    spec, objects, rng = _scene(seed, split, index, probs)
    return _record(spec, objects, rng, mirror, relations)


def _scene(
    seed: int, split: str, index: int, probs: np.ndarray | None
) -> tuple[SceneSpec, list[PlacedObject], np.random.Generator]:
    """Scene ``index`` of ``split`` laid out, and its generator (captions draw from it next)."""
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    category = None if probs is None else CATEGORIES[rng.choice(len(CATEGORIES), p=probs)]
    spec = sample_split_spec(rng, split, category)
    return spec, layout_scene(spec, rng), rng


def relation_captions(
    spec: SceneSpec, objects: list[PlacedObject], rng: np.random.Generator, mirror: bool = True
) -> list[str]:
    """Captions that state where the two objects of a two-object or colour-attribution scene
    stand ("a red circle left of a blue square ..." and, with ``mirror``, its mirror), read off
    the laid-out boxes.

    One of the relations ``relation_between`` finds (two for a diagonal), or none when the
    objects are level or the statement would use a held-out relation triple, so the train split
    still never names one. Position scenes already state theirs; other categories get none.
    """
    if spec.category not in ("two_object", "color_attr"):
        return []
    found = sorted(relation_between(objects[0].bbox, objects[1].bbox))
    if not found:
        return []
    stated = replace(spec, relation=found[int(rng.integers(len(found)))])
    if is_held_out(stated):
        return []
    return [describe(stated)] + ([describe(mirrored(stated))] if mirror else [])


def _record(
    spec: SceneSpec,
    objects: list[PlacedObject],
    rng: np.random.Generator,
    mirror: bool,
    relations: bool,
) -> tuple[np.ndarray, dict]:
    image = render_objects(objects, spec.background)
    truth = {
        "category": spec.category,
        "background": spec.background,
        "spec": scene_spec_to_dict(spec),
        "objects": [asdict(o) for o in objects],
        "relations": [
            [i, sorted(relation_between(a.bbox, b.bbox)), j]
            for i, a in enumerate(objects)
            for j, b in enumerate(objects)
            if i != j
        ],
    }
    captions = caption_variants(spec, rng, mirror)
    if relations:
        captions += relation_captions(spec, objects, rng, mirror)
    return image, {"captions": captions, "truth": truth}


def relation_twin(
    spec: SceneSpec, objects: list[PlacedObject]
) -> tuple[SceneSpec, list[PlacedObject]]:
    """The minimal pair of a position scene: the same objects, sizes, colours and background, with
    the boxes reflected across the image's vertical axis (left of / right of) or horizontal axis
    (above / below) and each shape still drawn upright, so only the relation changes (to its
    converse). A model can tell the two apart only by reading the relation words."""
    if spec.relation is None:
        raise ValueError(f"only position scenes have a relation twin, got {spec.category!r}")
    horizontal = spec.relation in ("left of", "right of")
    s = float(IMAGE_SIZE)
    twin = []
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        box = (s - x1, y0, s - x0, y1) if horizontal else (x0, s - y1, x1, s - y0)
        twin.append(PlacedObject(o.shape, o.colour, o.size, box))
    return SceneSpec(spec.category, spec.objects, spec.background, CONVERSE[spec.relation]), twin


def generate_samples(
    seed: int,
    split: str,
    n: int,
    probs: np.ndarray | None = None,
    mirror: bool = True,
    twins: bool = False,
    relations: bool = False,
):
    """Yield ``n`` samples ``(image, record)`` of ``split``. Without ``twins`` row i is
    ``generate_sample(seed, split, i)``. With ``twins`` every position scene is followed by its
    ``relation_twin`` (its record's truth names the row it twins under ``twin_of``), so position
    scenes come in minimal pairs; ``n`` counts both. Twins double the share of position images:
    a position weight of 0.5 (``category_probabilities({"position": 0.5})``) keeps it at 1/6.
    ``relations`` adds ``relation_captions`` (``generate_sample``)."""
    index = 0
    row = 0
    while row < n:
        spec, objects, rng = _scene(seed, split, index, probs)
        index += 1
        yield _record(spec, objects, rng, mirror, relations)
        row += 1
        if twins and spec.relation is not None and row < n:
            tspec, tobjects = relation_twin(spec, objects)
            image, rec = _record(tspec, tobjects, rng, mirror, relations)
            rec["truth"]["twin_of"] = row - 1
            yield image, rec
            row += 1


def scene_spec_to_dict(spec: SceneSpec) -> dict:
    return asdict(spec)


def scene_spec_from_dict(d: dict) -> SceneSpec:
    return SceneSpec(
        d["category"], tuple(ObjectSpec(**o) for o in d["objects"]), d["background"], d["relation"]
    )


def licence_record(seed: int) -> dict:
    return {
        "spdx": "CC0-1.0",
        "source": f"ember shapes generator v{GENERATOR_VERSION}, seed {seed}",
        "attribution": "ember procedural",
    }


def generate_shapes(
    out_dir: str | Path,
    n: int,
    seed: int,
    split: str = "train",
    write_png: bool = True,
    weights: dict[str, float] | None = None,
    mirror: bool = True,
    twins: bool = False,
    relations: bool = False,
) -> Path:
    """Write ``n`` shapes-world samples of ``split`` to ``out_dir`` in ember's dataset format.

    ``weights`` makes some categories more frequent (e.g. ``{"position": 2}``; others weigh 1).
    ``mirror=False`` leaves out the mirrored two-object captions, as generator version 1 did.
    ``twins=True`` follows every position scene with its relation twin (``generate_samples``).
    ``relations=True`` also captions two-object scenes with where their objects stand
    (``relation_captions``).

    Produces ``images/NNNNNN.png``, ``images.npy`` ((n, 64, 64, 3) uint8, row i = manifest line i,
    memory-mappable), ``manifest.jsonl`` (captions, licence, ground truth under ``truth``),
    ``LICENSE.json`` and ``dataset.json``. See docs/datasets.md.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    probs = category_probabilities(weights)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    lic = licence_record(seed)
    with open(out / "manifest.jsonl", "w") as manifest:
        for i, (image, rec) in enumerate(
            generate_samples(seed, split, n, probs, mirror, twins, relations)
        ):
            images[i] = image
            name = f"images/{i:06d}.png"
            if write_png:
                Image.fromarray(image).save(out / name, compress_level=1)
            row = {
                "file": name,
                "caption": rec["captions"],
                "license": lic["spdx"],
                "source": lic["source"],
                "attribution": lic["attribution"],
                "truth": rec["truth"],
            }
            manifest.write(json.dumps(row) + "\n")
    images.flush()
    del images
    (out / "LICENSE.json").write_text(json.dumps(lic, indent=2) + "\n")
    info = {
        "name": "ember-shapes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "n": n,
        "mirrored_captions": mirror,
        "relation_twins": twins,
        "relation_captions": relations,
        "category_probabilities": {
            c: round(float(probs[k]) if probs is not None else 1 / len(CATEGORIES), 4)
            for k, c in enumerate(CATEGORIES)
        },
        "image_size": IMAGE_SIZE,
        "array": "images.npy",
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
        "shapes": SHAPES,
        "held_out_pairs": sorted(map(list, HELD_OUT_PAIRS)),
        "held_out_relations": sorted(map(list, HELD_OUT_RELATIONS)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
