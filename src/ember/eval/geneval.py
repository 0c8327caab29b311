"""GenEval for the shapes world: fixed prompt sets, an exact detector, GenEval's scoring rules.

GenEval (Ghosh et al. 2023) scores a text-to-image model by detecting the objects in its images and
checking them against the prompt, per category: single object, two objects, counting, colours,
position and colour attribution; the overall score is the unweighted mean of the six. Real GenEval
uses a Mask2Former detector and CLIP colour classification; in the shapes world the objects are
flat shapes in known colours, so a small classical detector is exact:

1. the background colour is the median of the border pixels;
2. objects are the connected components of pixels far (in RGB) from the background;
3. an object's colour is the palette colour nearest to the mean of its core pixels (the rim is
   an antialiased blend with the background, so it is left out); its mask is where the pixel is
   more than half-way from the background to that colour;
4. the mask, cropped and scaled to a fixed grid, is matched (IoU) against templates of the six
   shapes drawn by the shapes renderer, sharp and blurred.

Two prompt sets (``PROMPT_SETS``): ``in-distribution`` uses only training compositions and
``held-out`` only the compositions kept out of training (``ember.data.shapes.HELD_OUT_*``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ember.data.shapes import (
    CATEGORIES,
    COLOURS,
    CONVERSE,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    SceneSpec,
    describe,
    layout_scene,
    relation_between,
    render_mask,
    render_objects,
    sample_split_spec,
)

EVAL_SPLITS = {"in-distribution": "train", "held-out": "held-out"}
PROMPTS_PER_CATEGORY = 12
PROMPT_SEED = 20231017  # fixed forever: changing it changes every reported score
TEMPLATE_GRID = 24
MIN_AREA_FRACTION = 24 / 4096  # components smaller than this fraction of the image are noise
MIN_SHAPE_IOU = 0.5  # below this a blob is reported with shape "unknown"
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background; objects are >= 100 away

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)  # (10, 3)


@dataclass(frozen=True)
class Detection:
    shape: str  # one of SHAPES, or "unknown"
    colour: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive
    area: int  # pixels
    score: float = 1.0  # template IoU of the chosen shape


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    spec: SceneSpec
    split: str

    @property
    def category(self) -> str:
        return self.spec.category


# ----------------------------------------------------------------------------- prompt sets


def build_prompt_set(split: str, per_category: int = PROMPTS_PER_CATEGORY) -> list[EvalPrompt]:
    """The fixed prompt set of an eval split: ``per_category`` distinct prompts per category."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown eval split {split!r}; expected one of {list(EVAL_SPLITS)}")
    rng = np.random.default_rng((PROMPT_SEED, list(EVAL_SPLITS).index(split)))
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()  # across categories too: a prompt's text must name one category
    for category in CATEGORIES:
        n = 0
        while n < per_category:
            spec = sample_split_spec(rng, EVAL_SPLITS[split], category)
            text = describe(spec)
            if text not in seen:
                seen.add(text)
                prompts.append(EvalPrompt(text, spec, split))
                n += 1
    return prompts


PROMPT_SETS: dict[str, list[EvalPrompt]] = {s: build_prompt_set(s) for s in EVAL_SPLITS}


def render_spec(spec: SceneSpec, seed: int = 0, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """A ground-truth render of ``spec`` with the shapes-world renderer: (H, W, 3) uint8."""
    objects = layout_scene(spec, np.random.default_rng(seed), image_size)
    return render_objects(objects, spec.background, image_size)


# ----------------------------------------------------------------------------- detector


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative ``labels``: (H, W) root index, -1 elsewhere.

    Min-label propagation with pointer jumping (each pixel adopts its root's label), so it takes
    a logarithmic number of passes in the component diameter rather than one per pixel.
    """
    h, w = labels.shape
    mask = labels >= 0
    big = h * w
    root = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = root.copy()
        for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1)):
            nb_root = np.roll(root, step, axis)
            nb_label = np.roll(labels, step, axis)
            edge = [slice(None)] * 2
            edge[axis] = 0 if step == 1 else -1
            nb_root[tuple(edge)] = big  # no wrap-around
            same = mask & (nb_label == labels)
            new = np.where(same, np.minimum(new, nb_root), new)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[np.minimum(new, big)], big)  # pointer jumping
        if np.array_equal(new, root):
            return np.where(mask, root, -1)
        root = new


def _resample(mask: np.ndarray, size: int = TEMPLATE_GRID) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def _crop_to_content(mask: np.ndarray) -> np.ndarray:
    """Crop to the rows and columns holding the mask, trimming outer ones with a single pixel.

    The trim keeps a noise pixel stuck to an outline from stretching the box that the mask is
    scaled by; templates go through the same crop, so thin tips are treated alike.
    """
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        ys, xs = np.nonzero(mask)
        rows, cols = ys, xs
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, r, mode="edge")
    pad = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 0, pad)
    return np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, pad)


@cache
def _templates() -> tuple[np.ndarray, list[str]]:
    """(T, G, G) shape masks at both sizes, sharp and blurred, thresholded, cropped and scaled."""
    bank, names = [], []
    for shape in SHAPES:
        for side in SIZES.values():
            s = int(round(side))
            soft = np.pad(render_mask(shape, s, s), 4)
            for sigma in (0.0, 1.0):
                m = _blur(soft, sigma) if sigma else soft
                bank.append(_resample(_crop_to_content(m > 0.5)))
                names.append(shape)
    return np.stack(bank), names


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape for a binary object mask by soft IoU against the template bank."""
    bank, names = _templates()
    x = _resample(_crop_to_content(mask))[None]  # (1, G, G)
    iou = np.minimum(bank, x).sum((1, 2)) / np.maximum(bank, x).sum((1, 2))
    best = int(iou.argmax())
    return (names[best] if iou[best] >= MIN_SHAPE_IOU else "unknown"), float(iou[best])


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a shapes-world image (H, W, 3) uint8, largest first."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    x = image.astype(np.float32)
    h, w, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    bg = np.median(border, axis=0)  # (3,)
    dist = np.linalg.norm(x - bg, axis=-1)  # (H, W)

    comp = _components(np.where(dist > FOREGROUND_DISTANCE, 0, -1))
    min_area = max(4, int(MIN_AREA_FRACTION * h * w))
    roots, counts = np.unique(comp[comp >= 0], return_counts=True)
    d = _PALETTE - bg  # (10, 3) blend directions from the background
    usable = np.linalg.norm(d, axis=1) > FOREGROUND_DISTANCE
    found = []
    for root, area in zip(roots, counts, strict=True):
        if area < min_area:
            continue
        blob = comp == root
        # Colour from the blob's core (the pixels farthest from the background, i.e. not the
        # antialiased rim), averaged so that pixel noise cancels, then the nearest palette colour.
        far = dist[blob]
        core = x[blob][far >= 0.8 * np.percentile(far, 90)].mean(0)
        gap = np.linalg.norm(_PALETTE - core, axis=1)
        gap[~usable] = np.inf
        c = int(gap.argmin())
        # Mask: where the pixel is at least half-way from the background to that colour.
        alpha = ((x - bg) @ d[c]) / (d[c] @ d[c])  # (H, W)
        mask = blob & (alpha > 0.5)
        if mask.sum() < min_area:
            continue
        ys, xs = np.nonzero(mask)
        shape, iou = classify_shape(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        found.append(Detection(shape, _PALETTE_NAMES[c], bbox, int(mask.sum()), iou))
    return sorted(found, key=lambda det: -det.area)


# ----------------------------------------------------------------------------- scoring


def _matches(dets: Iterable[Detection], shape: str, colour: str | None) -> list[Detection]:
    return [d for d in dets if d.shape == shape and (colour is None or d.colour == colour)]


def score(image: np.ndarray, spec: SceneSpec) -> bool:
    """Whether ``image`` satisfies ``spec`` under GenEval's rule for its category.

    single_object / two_object: each named shape present (colour not checked); counting: exactly
    ``count`` objects of that shape and colour; colors: an object of that shape and colour;
    position: both shapes present and the relation holds between some pair of them (GenEval's
    ``relative_position``); color_attr: both objects present with their colours.
    """
    dets = detect(image)
    cat = spec.category
    objs = spec.objects
    if cat in ("single_object", "two_object"):
        return all(_matches(dets, o.shape, None) for o in objs)
    if cat == "counting":
        o = objs[0]
        return len(_matches(dets, o.shape, o.colour)) == o.count
    if cat in ("colors", "color_attr"):
        return all(_matches(dets, o.shape, o.colour) for o in objs)
    if cat == "position":
        a_s, b_s = _matches(dets, objs[0].shape, None), _matches(dets, objs[1].shape, None)
        return any(spec.relation in relation_between(a.bbox, b.bbox) for a in a_s for b in b_s)
    raise ValueError(f"unknown category {cat!r}; expected one of {CATEGORIES}")


def checked_content(spec: SceneSpec) -> tuple:
    """What ``score``'s rule for this category looks at; equal keys are the same request."""
    o = spec.objects
    if spec.category in ("single_object", "two_object"):
        return (spec.category, frozenset(x.shape for x in o))
    if spec.category == "position":
        a, r, b = o[0].shape, spec.relation, o[1].shape
        return (spec.category, min((a, r, b), (b, CONVERSE[r], a)))
    return (spec.category, frozenset((x.shape, x.colour, x.count) for x in o))


def _lookup() -> dict[str, SceneSpec]:
    return {p.prompt: p.spec for prompts in PROMPT_SETS.values() for p in prompts}


def evaluate(
    images_by_prompt: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    specs: Mapping[str, SceneSpec] | None = None,
) -> dict:
    """Score images per prompt: ``{"overall", "per_category", "per_prompt", "n_images"}``.

    ``images_by_prompt`` maps an eval prompt (from ``PROMPT_SETS``, or ``specs`` when given) to one
    image or a list of images. Each category's score is the mean over its images; ``overall`` is
    the unweighted mean over the categories present (all six for a full prompt set), as in GenEval.
    """
    specs = specs if specs is not None else _lookup()
    per_cat: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    per_prompt = {}
    for prompt, images in images_by_prompt.items():
        if prompt not in specs:
            raise ValueError(f"prompt {prompt!r} is not in the eval prompt set")
        spec = specs[prompt]
        batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        results = [score(np.asarray(im), spec) for im in batch]
        per_cat[spec.category] += results
        per_prompt[prompt] = float(np.mean(results)) if results else math.nan
    means = {c: float(np.mean(v)) for c, v in per_cat.items() if v}
    return {
        "overall": float(np.mean(list(means.values()))) if means else math.nan,
        "per_category": means,
        "per_prompt": per_prompt,
        "n_images": sum(len(v) for v in per_cat.values()),
    }


# ----------------------------------------------------------------------------- viewing


def contact_sheet(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    columns: int = 8,
    scale: int = 2,
) -> Image.Image:
    """Images in a grid, each upscaled ``scale`` times with its label wrapped underneath."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    h, w = images[0].shape[:2]
    tw, th = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    lines = 3 if labels else 0
    cell_h = th + lines * 11 + 4
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (tw + 4), rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % columns) * (tw + 4), (i // columns) * cell_h
        tile = Image.fromarray(np.asarray(im, np.uint8)).resize((tw, th), Image.Resampling.NEAREST)
        sheet.paste(tile, (x + 2, y + 2))
        if labels:
            text = labels[i]
            for k in range(lines):
                draw.text(
                    (x + 2, y + th + 3 + 11 * k), text[k * chars : (k + 1) * chars], (0, 0, 0), font
                )
    return sheet
