"""The generation settings: the one definition every front-end reads.

`GenerationParams` is the request: each field carries its help text, its allowed range and whether
requests must agree on it to share one U-Net batch. From those fields come the CLI flags
(`add_generation_args`), the job API's request model (`ember.server.app`), the batch key
(`batch_key`) and the checks (`validate`, against one set of ceilings, `Limits`). `resolve` fills in
what a request leaves to the model (size, guidance scale, layout guidance) and draws a random seed
for -1, once, before anything is generated or recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import typing
from dataclasses import dataclass, field
from typing import Any

from ember.config import ModelConfig
from ember.errors import EmberError

MAX_SEED = 2**32 - 1
# LCM's schedule is a subset of this many steps (diffusers' `original_inference_steps`).
LCM_ORIGINAL_STEPS = 50
# What a request that names no sampler or steps gets, unless its model recommends others.
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 20
# Sizes are multiples of this many pixels: the latent grid of every SD VAE (and ember's) is 1/8.
SIZE_MULTIPLE = 8
# ToMe keeps one token of each 2x2 window (`ember.models.tome.WINDOW`), so it can merge 3/4 at
# most; DeepCache's interval is bounded only so that a typo cannot pass for a setting.
TOME_MAX_RATIO = 0.75
DEEPCACHE_MAX_INTERVAL = 50


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings. The defaults are what the engine accepts at all; a server lowers them
    (`ember serve --max-steps/--max-pixels/--max-batch`)."""

    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 1000
    max_batch: int = 64
    max_prompt_chars: int = 100_000
    # the server's uploads
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # decoded uploads; PIL refuses bigger before decoding


# What the engine accepts at all.
ENGINE_LIMITS = Limits()
# A public server's defaults: a 1-megapixel image, 150 steps, 8 images per request.
SERVER_LIMITS = Limits(max_pixels=1024 * 1024, max_steps=150, max_batch=8, max_prompt_chars=4000)


def _setting(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    limit: str | None = None,
    shared: bool = False,
    flag: str | None = "",
    max_length: int | None = None,
    metavar: str | None = None,
) -> Any:
    """A field with its metadata: `lo`..`hi` the allowed range, or `limit` the `Limits` field that
    gives the upper bound; `shared`: requests in one U-Net batch must agree on it; `flag`: the CLI
    flag ("" = derived from the name, None = no flag of its own), `metavar` its value's name in
    `--help` (default: the flag's name)."""
    meta = {"help": help, "lo": lo, "hi": hi, "limit": limit, "shared": shared, "flag": flag,
            "max_length": max_length, "metavar": metavar}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA to merge into the model: a `.safetensors` path or a name in the LoRA folder, with its
    text-encoder and U-Net weights."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


MAX_LORA_WEIGHT = 100.0


def parse_lora(text: str) -> LoraChoice:
    """`PATH_OR_NAME[:WEIGHT]` or `PATH_OR_NAME:TE_WEIGHT:UNET_WEIGHT` (a Windows drive letter's
    colon is part of the path)."""
    parts = text.rsplit(":", 2)
    weights: list[float] = []
    while len(parts) > 1:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts)
    if not name or len(weights) > 2:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: use PATH[:WEIGHT] or PATH:TE:UNET")
    te = weights[0] if weights else 1.0
    return LoraChoice(name, te, weights[1] if len(weights) > 1 else te)


VAE_TILING = ("auto", "on", "off")

SAMPLER_HELP = (
    "euler, euler_a, heun, dpm2, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, ddim, lcm, unipc, or an A1111 "
    "name like 'DPM++ 2M Karras'"
)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines an image. Stored in each PNG's `ember` record.

    None in `width`, `height`, `cfg` and `layout_guidance` means "the model's" (`resolve`).
    """

    prompt: str = _setting(
        "", "what to draw; A1111 syntax (word:1.3), [word], BREAK", limit="max_prompt_chars",
        flag=None, max_length=100_000,
    )  # fmt: skip
    negative_prompt: str = _setting(
        "", "what to steer away from", limit="max_prompt_chars", flag="--negative",
        max_length=100_000,
    )  # fmt: skip
    sampler: str | None = _setting(
        None, SAMPLER_HELP + "; default: the model's, else dpmpp_2m", shared=True, max_length=64
    )
    schedule: str = _setting(
        "default",
        "sigma schedule: default, karras, exponential (sgm_uniform: default with trailing spacing)",
        shared=True, max_length=64,
    )  # fmt: skip
    steps: int | None = _setting(
        None, "sampling steps; default: the model's, else 20", lo=1, limit="max_steps", shared=True
    )
    timestep_spacing: str | None = _setting(
        None,
        "which training timesteps the default schedule samples, as diffusers names it: leading, "
        "linspace or trailing (SD-Turbo, A1111's sgm_uniform); default: the model's, else the "
        "sampler's customary one",
        shared=True, max_length=16,
    )  # fmt: skip
    cfg: float | None = _setting(
        None,
        "classifier-free guidance scale; default: the model's (5 for ember's own models, 7 for "
        "Stable Diffusion)",
        lo=0, hi=100, shared=True,
    )  # fmt: skip
    seed: int = _setting(0, "seed of image 0; image i uses seed+i; -1 = random", lo=-1, hi=MAX_SEED)
    width: int | None = _setting(
        None, "image width in pixels; default: the model's", lo=SIZE_MULTIPLE, limit="max_side",
        shared=True, flag=None,
    )  # fmt: skip
    height: int | None = _setting(
        None, "image height in pixels; default: the model's", lo=SIZE_MULTIPLE, limit="max_side",
        shared=True, flag=None,
    )  # fmt: skip
    original_width: int | None = _setting(
        None, "SDXL micro-conditioning: the original image width the model is told; default: the "
        "width", lo=1, hi=16384,
    )  # fmt: skip
    original_height: int | None = _setting(
        None, "SDXL micro-conditioning: the original image height; default: the height", lo=1,
        hi=16384,
    )  # fmt: skip
    crop_left: int = _setting(0, "SDXL micro-conditioning: crop left, in pixels", lo=0, hi=16384)
    crop_top: int = _setting(0, "SDXL micro-conditioning: crop top, in pixels", lo=0, hi=16384)
    batch: int = _setting(1, "images to make", lo=1, limit="max_batch")
    strength: float = _setting(0.75, "img2img/inpaint: how much to change", lo=0, hi=1, shared=True)
    clip_skip: int = _setting(1, "use the text encoder's N-th last layer", lo=1, hi=12)
    vae_tiling: str = _setting(
        "auto",
        "decode (and encode) the image in overlapping tiles, so that memory stays bounded at large "
        "sizes: on, off, or auto (tiles where decoding the image whole would take over half the "
        "free memory; the record says which ran)",
        max_length=8,
    )  # fmt: skip
    layout_guidance: float | None = _setting(
        None,
        "steer 'A left of / right of / above / below B' prompts to that layout, and 'three Xs ...' "
        "prompts to one X a quadrant; 0 = off; default: the model's (2 for ember's own models, "
        "off for Stable Diffusion)",
        lo=0, hi=10, shared=True,
    )  # fmt: skip
    eta: float | None = _setting(
        None, "noise of ancestral and SDE samplers; default 1 (0 for ddim)", lo=0, hi=10,
        shared=True,
    )  # fmt: skip
    refiner: str | None = _setting(
        None, "SDXL: a refiner model (a file, a diffusers folder or a name in the models folder) "
        "that takes over from the model for the last steps", shared=True, max_length=4096,
    )  # fmt: skip
    refiner_switch_at: float = _setting(
        0.8, "with --refiner: the fraction of the noise schedule after which the refiner takes "
        "over (A1111's 'Refiner switch at', diffusers' denoising_end)", lo=0, hi=1, shared=True,
    )  # fmt: skip
    tome: float = _setting(
        0.0,
        "token merging (ToMe for SD): merge this fraction of the tokens before self-attention in "
        "the highest-resolution transformer blocks (at most 0.75: one token of each 2x2 is kept); "
        "faster and approximate; 0 = off",
        lo=0, hi=TOME_MAX_RATIO, shared=True, metavar="RATIO",
    )  # fmt: skip
    deepcache: int = _setting(
        1,
        "DeepCache: run the whole U-Net every N-th call and only its outermost blocks, on the "
        "cached deep features, in between; faster and approximate; 1 = off",
        lo=1, hi=DEEPCACHE_MAX_INTERVAL, shared=True, metavar="N",
    )  # fmt: skip
    loras: tuple[LoraChoice, ...] = _setting(
        (),
        "merge a LoRA: PATH_OR_NAME[:WEIGHT] or PATH_OR_NAME:TE_WEIGHT:UNET_WEIGHT, NAME looked up "
        "in the LoRA folder; repeatable; <lora:NAME:WEIGHT> in the prompt does the same",
        shared=True, flag="--lora",
    )  # fmt: skip


FIELDS = {f.name: f for f in dataclasses.fields(GenerationParams)}
FIELD_TYPES = typing.get_type_hints(GenerationParams)
MODEL_DEFAULTS = ("sampler", "steps", "width", "height", "cfg", "layout_guidance")


def params_from_dict(data: dict[str, Any]) -> GenerationParams:
    """GenerationParams from stored JSON (a PNG record, a queued job); unknown keys are dropped,
    so records written by other versions still load."""
    values = {k: v for k, v in data.items() if k in FIELDS}
    values["loras"] = tuple(
        c if isinstance(c, LoraChoice) else LoraChoice(**c) for c in values.get("loras", ())
    )
    return GenerationParams(**values)


def lora_selection(params: GenerationParams) -> tuple[LoraChoice, ...]:
    """Every LoRA a request merges: its `loras`, then the prompt's `<lora:...>` tags."""
    from ember.prompts import lora_tags

    tags = tuple(LoraChoice(*t) for t in lora_tags(params.prompt))
    return tuple(params.loras) + tags


def resolve(params: GenerationParams, model: ModelConfig) -> GenerationParams:
    """Fill in what the request leaves to the model, and draw the seed of `seed=-1`."""
    values: dict[str, Any] = {}
    if params.width is None:
        values["width"] = model.size
    if params.height is None:
        values["height"] = model.size
    if params.cfg is None:
        values["cfg"] = model.default_cfg
    if params.layout_guidance is None:
        values["layout_guidance"] = model.default_layout_guidance
    if params.sampler is None:
        values["sampler"] = model.sampler or DEFAULT_SAMPLER
    if params.steps is None:
        values["steps"] = model.steps or DEFAULT_STEPS
    if params.timestep_spacing is None and model.timestep_spacing is not None:
        values["timestep_spacing"] = model.timestep_spacing
    if params.seed == -1:
        values["seed"] = random.randrange(MAX_SEED + 1)
    return dataclasses.replace(params, **values) if values else params


def validate(params: GenerationParams, limits: Limits = ENGINE_LIMITS) -> GenerationParams:
    """Check every field against its range and `limits`; return params with the sampler and
    schedule resolved to ember's names. Raises `EmberError` naming the value and what is allowed."""
    from ember.diffusion.samplers import resolve_sampler
    from ember.diffusion.schedules import SPACINGS

    for name, f in FIELDS.items():
        value = getattr(params, name)
        if name in MODEL_DEFAULTS and value is None:
            raise EmberError(f"{name} is not set (resolve the request against its model first)")
        if isinstance(value, str):
            limit = getattr(limits, f.metadata["limit"]) if f.metadata["limit"] else None
            if limit is not None and len(value) > limit:
                raise EmberError(
                    f"{_label(name)} of {len(value)} characters is over the limit of {limit}"
                )
            continue
        if value is None or name == "loras":
            continue
        _check_number(name, value, f.metadata, limits)
    _check_size(params, limits)
    _check_loras(params)
    if params.vae_tiling not in VAE_TILING:
        raise EmberError(f"vae tiling {params.vae_tiling!r} is not allowed: use auto, on or off")
    try:
        sampler, implied_schedule = resolve_sampler(str(params.sampler))
    except ValueError as exc:
        raise EmberError(str(exc)) from None
    schedule, spacing = params.schedule, params.timestep_spacing
    if schedule in ("default", "automatic", "Automatic", "") and implied_schedule:
        schedule = implied_schedule
    schedule = schedule.lower().replace(" ", "_")
    if schedule == "automatic":
        schedule = "default"
    if schedule == "sgm_uniform":  # A1111's name for the default schedule's trailing spacing
        schedule, spacing = "default", spacing or "trailing"
    if schedule not in ("default", "karras", "exponential"):
        raise EmberError(
            f"unknown schedule {params.schedule!r}; choose default, karras, exponential or "
            "sgm_uniform"
        )
    if spacing is not None:
        if spacing not in SPACINGS:
            raise EmberError(f"unknown timestep spacing {spacing!r}; choose {', '.join(SPACINGS)}")
        if schedule != "default":
            raise EmberError(
                f"timestep spacing {spacing} applies to the default schedule, not {schedule}"
            )
    if sampler == "lcm" and params.steps > LCM_ORIGINAL_STEPS:
        raise EmberError(
            f"steps {params.steps} is not allowed with lcm: use 1 to {LCM_ORIGINAL_STEPS}"
        )
    return dataclasses.replace(params, sampler=sampler, schedule=schedule, timestep_spacing=spacing)


def _label(name: str) -> str:
    return name.replace("_", " ")


def _check_number(name: str, value: Any, meta: dict, limits: Limits) -> None:
    is_int = FIELD_TYPES[name] in (int, int | None)
    lo = meta["lo"]
    hi = getattr(limits, meta["limit"]) if meta["limit"] else meta["hi"]
    if name == "seed":
        lo = 0  # -1 ("random") is drawn by `resolve` before validation
    if is_int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and name in ("width", "height"):
        ok = value % SIZE_MULTIPLE == 0
    if not ok or not lo <= value <= hi:
        if name in ("width", "height"):
            allowed = f"a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {hi}"
        elif is_int:
            allowed = f"{lo:g} to {hi:g}" if hi < 1e6 else f"{lo:g} to {hi}"
        else:
            allowed = f"a number from {lo:g} to {hi:g}"
        raise EmberError(f"{_label(name)} {value} is not allowed: use {allowed}")


def _check_loras(params: GenerationParams) -> None:
    try:
        choices = lora_selection(params)
    except ValueError as exc:
        raise EmberError(str(exc)) from None
    for c in choices:
        for w in (c.te_weight, c.unet_weight):
            if not isinstance(w, int | float) or not math.isfinite(w) or abs(w) > MAX_LORA_WEIGHT:
                raise EmberError(
                    f"LoRA {c.name} weight {w} is not allowed: use a number from "
                    f"-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}"
                )


def _check_size(params: GenerationParams, limits: Limits) -> None:
    if params.width * params.height > limits.max_pixels:
        raise EmberError(
            f"size {params.width}x{params.height} is over the limit of {limits.max_pixels} pixels"
        )


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys (and the same model and mode) may share one U-Net batch without
    changing any image: the values of every field marked `shared`, with the LoRAs the prompt's
    tags add (a batch runs on one set of merged weights)."""
    shared = tuple(
        getattr(params, n) for n, f in FIELDS.items() if f.metadata["shared"] and n != "loras"
    )
    return (*shared, lora_selection(params))


# ---------------------------------------------------------------------------------------------
# the command line


def parse_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512"
        ) from None
    return w, h


def add_generation_args(
    parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None
) -> argparse.ArgumentParser:
    """One flag per field (all, or those in `names`), typed and documented from the field.

    Every flag defaults to None ("not given"), so `params_from_args` changes only what the user
    set: a record read by `--from` keeps its values. `prompt` is the positional PROMPT and
    `width`/`height` are `--size WIDTHxHEIGHT`.
    """
    for name, f in FIELDS.items():
        if names is not None and name not in names:
            continue
        meta = f.metadata
        if name == "prompt":
            parser.add_argument("prompt", nargs="?", help=meta["help"])
            continue
        if name == "width":
            parser.add_argument(
                "--size",
                type=parse_size,
                metavar="WxH",
                help=f"WIDTHxHEIGHT, multiples of {SIZE_MULTIPLE} (default: the model's)",
            )
            continue
        if meta["flag"] is None:
            continue
        flag = meta["flag"] or "--" + name.replace("_", "-")
        if name == "loras":
            parser.add_argument(
                flag, dest=name, type=parse_lora, action="append", metavar="LORA",
                help=meta["help"],
            )  # fmt: skip
            continue
        kind = int if FIELD_TYPES[name] in (int, int | None) else None
        kind = kind or (float if FIELD_TYPES[name] in (float, float | None) else str)
        help_text = meta["help"]
        if f.default not in (None, "") and "default" not in help_text:
            help_text += f" (default {f.default})"
        metavar = meta["metavar"] or flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, dest=name, type=kind, metavar=metavar, help=help_text)
    return parser


def add_addon_dirs(parser: argparse.ArgumentParser) -> None:
    """`--lora-dir` and `--embeddings-dir`: where `<lora:NAME>`/`--lora NAME` and embedding names in
    prompts are looked up (the `ember generate` and `ember serve` flags; defaults in
    `ember.catalog`)."""
    parser.add_argument(
        "--lora-dir", help="folder of LoRAs that --lora NAME, <lora:NAME:W> and the job API's "
        "loras name (default: $EMBER_MODELS/Lora)",
    )  # fmt: skip
    parser.add_argument(
        "--embeddings-dir", help="folder of textual-inversion embeddings, used by file name in a "
        "prompt (default: $EMBER_MODELS/embeddings)",
    )  # fmt: skip


def params_from_args(
    args: argparse.Namespace, base: GenerationParams | None = None
) -> GenerationParams:
    """`base` (default: the field defaults) with every flag the user gave."""
    values = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if "loras" in values:
        values["loras"] = tuple(values["loras"])
    size = getattr(args, "size", None)
    if size is not None:
        values["width"], values["height"] = size
    return dataclasses.replace(base or GenerationParams(), **values)
