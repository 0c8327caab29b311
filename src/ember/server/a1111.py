"""The AUTOMATIC1111 web UI API (`/sdapi/v1/*`): request fields, defaults and response shapes.

Existing clients (e.g. the `webuiapi` package) work unmodified. Requests go through the same durable
queue as native jobs and so share its batching, limits and back-pressure; the HTTP call simply waits
for its job. Fields ember cannot honour are ignored when they have their default (or a value with the
same effect) and refused with a 422 naming the field otherwise, so no client silently gets a different
picture than it asked for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ember.errors import EmberError
from ember.images import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, read_png_text
from ember.server.uploads import decode_base64, decode_image
from ember.settings import FIELDS, GenerationParams

router = APIRouter(prefix="/sdapi/v1", tags=["A1111"])

Finite = Field(allow_inf_nan=False)


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI (the fields that matter; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, allow_inf_nan=False)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, allow_inf_nan=False)
    denoising_strength: float | None = Field(None, allow_inf_nan=False)
    s_churn: float | None = Field(None, allow_inf_nan=False)
    s_tmax: float | None = Field(None, allow_inf_nan=False)
    s_tmin: float | None = Field(None, allow_inf_nan=False)
    s_noise: float | None = Field(None, allow_inf_nan=False)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, allow_inf_nan=False)
    enable_hr: bool = False
    script_name: str | None = None
    script_args: list[Any] = []
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI."""

    init_images: list[str] = []
    resize_mode: int = 0
    denoising_strength: float | None = Field(0.75, allow_inf_nan=False)
    image_cfg_scale: float | None = Field(None, allow_inf_nan=False)
    mask: str | None = None
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = Field(None, allow_inf_nan=False)
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class PngInfoRequest(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


def _refuse_unsupported(req: Txt2ImgRequest) -> None:
    """Fields that would change the picture in A1111 but that ember does not implement."""
    checks = [
        ("enable_hr", req.enable_hr),
        ("restore_faces", bool(req.restore_faces)),
        ("tiling", bool(req.tiling)),
        ("subseed_strength", req.subseed_strength != 0),
        ("styles", bool(req.styles)),
        ("script_name", bool(req.script_name)),
        ("alwayson_scripts", bool(req.alwayson_scripts)),
    ]
    if isinstance(req, Img2ImgRequest):
        checks += [
            ("inpainting_mask_invert", req.inpainting_mask_invert not in (0, None)),
            ("resize_mode", req.resize_mode not in (0, None)),
            ("init_images", len(req.init_images) > 1),
        ]
    for name, unsupported in checks:
        if unsupported:
            raise EmberError(
                f"field {name!r} is not supported by ember; remove it or use its default"
            )


def _read_images(store, image_ids: list[str], with_png: bool) -> tuple[list, list[bytes]]:
    rows = [store.image(i) for i in image_ids]
    return rows, [store.image_bytes(r.id) for r in rows] if with_png else []


def _sampler(req: Txt2ImgRequest) -> str:
    return req.sampler_name or req.sampler_index or "Euler"


def _token_merging_ratio(req: Txt2ImgRequest, overrides: dict, options: dict) -> float:
    """A1111's `token_merging_ratio` (ember's `tome`): the request's override_settings, else the
    server's options; img2img prefers `token_merging_ratio_img2img` unless the request overrides
    the general one, as A1111's `get_token_merging_ratio` does."""
    name = "token_merging_ratio"
    if isinstance(req, Img2ImgRequest) and not overrides.get(name):
        name = "token_merging_ratio_img2img"
        if not overrides.get(name, options.get(name)):
            name = "token_merging_ratio"
    value = overrides.get(name, options.get(name, 0))
    hi = FIELDS["tome"].metadata["hi"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= hi:
        raise EmberError(f"{name} {value!r} is not allowed: use a number from 0 to {hi:g}")
    return float(value)


async def _generate(request: Request, req: Txt2ImgRequest, kind: str) -> dict[str, Any]:
    server = request.app.state.server
    _refuse_unsupported(req)
    overrides = req.override_settings or {}
    model = overrides.get("sd_model_checkpoint")
    if "sd_vae" in overrides and _vae_name(overrides["sd_vae"]) != server.engine.current_vae():
        raise EmberError(
            "override_settings.sd_vae is not supported per request; set it with POST "
            "/sdapi/v1/options (it applies to every request)"
        )
    clip_skip = overrides.get("CLIP_stop_at_last_layers", 1)
    init = mask = None
    strength = 0.75
    if isinstance(req, Img2ImgRequest):
        if not req.init_images:
            raise EmberError("img2img needs init_images (one base64 image)")
        init = decode_image(decode_base64(req.init_images[0], "init_images[0]"), server.limits,
                            "init_images[0]")  # fmt: skip
        if req.mask is not None:
            mask = decode_image(decode_base64(req.mask, "mask"), server.limits, "mask")
            kind = "inpaint"
        strength = req.denoising_strength if req.denoising_strength is not None else 0.75
    fields = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "sampler": _sampler(req),
        "schedule": req.scheduler or "automatic",
        "steps": req.steps,
        "cfg": req.cfg_scale,
        "seed": req.seed,
        "width": req.width,
        "height": req.height,
        "batch": req.batch_size * req.n_iter,
        "strength": strength,
        "clip_skip": clip_skip if isinstance(clip_skip, int) else 1,
        "tome": _token_merging_ratio(req, overrides, server.options),
    }
    if req.eta is not None:
        fields["eta"] = req.eta
    if req.refiner_checkpoint not in (None, "", "None"):  # a title or name from /sd-models
        fields["refiner"] = req.refiner_checkpoint
        if req.refiner_switch_at is not None:
            fields["refiner_switch_at"] = req.refiner_switch_at
    job = await server.submit(
        request, kind=kind, params=GenerationParams(**fields), init=init, mask=mask, model=model, body_hash=None,
        idem_key=None,
    )  # fmt: skip
    job = await server.wait(job.id)
    if job.status != "done" and job.status != "interrupted":
        raise EmberError(f"generation {job.status}: {job.error}")
    rows, pngs = await asyncio.to_thread(_read_images, server.store, job.images, req.send_images)
    images = [base64.b64encode(png).decode() for png in pngs]
    params = job.params
    seeds = [r.seed for r in rows] or [params["seed"] + i for i in range(params["batch"])]
    infotexts = [r.infotext for r in rows]
    first = rows[0].record if rows else {}
    info = {
        "prompt": params["prompt"],
        "all_prompts": [params["prompt"]] * len(seeds),
        "negative_prompt": params["negative_prompt"],
        "all_negative_prompts": [params["negative_prompt"]] * len(seeds),
        "seed": params["seed"],
        "all_seeds": seeds,
        "subseed": params["seed"],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": params["width"],
        "height": params["height"],
        "sampler_name": A1111_SAMPLER_NAMES.get(params["sampler"], params["sampler"]),
        "scheduler": A1111_SCHEDULE_NAMES.get(params["schedule"], params["schedule"]),
        "cfg_scale": params["cfg"],
        "steps": params["steps"],
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": first.get("model_name"),
        "sd_model_hash": first.get("model_hash"),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params["strength"] if kind != "txt2img" else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": params["clip_skip"],
        "is_using_inpainting_conditioning": kind == "inpaint",
        "version": "ember",
        "ember_job_id": job.id,
        "ember_image_ids": job.images,
        "ember_status": job.status,
    }
    echo = req.model_dump()
    if isinstance(req, Img2ImgRequest):
        echo["init_images"] = None if not req.include_init_images else req.init_images
        echo["mask"] = None
    return {"images": images, "parameters": echo, "info": json.dumps(info)}


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(request: Request, req: Txt2ImgRequest) -> dict[str, Any]:
    return await _generate(request, req, "txt2img")


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(request: Request, req: Img2ImgRequest) -> dict[str, Any]:
    return await _generate(request, req, "img2img")


@router.get("/progress", response_model=ProgressResponse)
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The caller's job (its oldest running, else queued, one), wherever it runs: step and preview
    come from the job's progress events, which every worker receives."""
    server = request.app.state.server
    job = server.store.active_job(request.state.who)
    queued = server.store.counts().get("queued", 0)
    running = job is not None and job.status == "running"
    latest = server.broker.latest.get(job.id, {}) if running else {}
    step, total = latest.get("step", 0), latest.get("total", job.params["steps"] if job else 0)
    fraction = step / total if running and total else 0.0
    elapsed = time.time() - job.started if running and job.started else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    image = None
    if running and "preview" in latest and not skip_current_image:
        image = latest["preview"].partition(",")[2]  # a data URL's base64 JPEG
    local = server.worker.progress
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": running and job.id in local.job_ids and local.skipped,
            "interrupted": running and job.id in local.job_ids and local.interrupted,
            "job": job.id if job else "",
            "job_count": queued + (1 if running else 0),
            "job_timestamp": time.strftime(
                "%Y%m%d%H%M%S", time.localtime(job.created if job else 0)
            ),
            "job_no": 0,
            "sampling_step": step if running else 0,
            "sampling_steps": total if running else 0,
        },
        "current_image": image,
        "textinfo": None,
        "current_task": job.id if job else None,
    }


def _control(request: Request, action: str) -> None:
    """Interrupt or skip the caller's running job, on whichever worker runs it."""
    server = request.app.state.server
    job = server.store.active_job(request.state.who)
    if job is None or job.status != "running":
        return
    if not server.worker.control(job.id, action):
        server.broker.publish(job.id, {"type": action})


@router.post("/interrupt")
def interrupt(request: Request) -> dict[str, Any]:
    _control(request, "interrupt")
    return {}


@router.post("/skip")
def skip(request: Request) -> dict[str, Any]:
    _control(request, "skip")
    return {}


@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return [_model_item(m) for m in request.app.state.server.engine.models()]


def _model_item(m) -> dict[str, Any]:
    return {"title": m.title, "model_name": m.name, "hash": m.short_hash, "sha256": m.sha256,
            "filename": m.path, "config": None}  # fmt: skip


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> None:
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(request.app.state.server.engine.refresh)


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = {}


class VAEItem(BaseModel):
    model_name: str
    filename: str


@router.get("/sd-vae", response_model=list[VAEItem])
async def sd_vae(request: Request) -> list[dict[str, Any]]:
    found = request.app.state.server.engine.vaes()
    return [{"model_name": n, "filename": str(p)} for n, p in found.items()]


def _vae_name(value: Any) -> str | None:
    """A1111's `sd_vae` option: a VAE's name, or "Automatic" / "None" for each model's own."""
    if not isinstance(value, str):
        raise EmberError("sd_vae must be a VAE name from /sdapi/v1/sd-vae, or Automatic")
    return None if value in ("Automatic", "None", "") else value


@router.get("/loras", response_model=list[LoraItem])
async def loras(request: Request) -> list[dict[str, Any]]:
    found = request.app.state.server.engine.loras()
    return [{"name": n, "alias": n, "path": str(p), "metadata": {}} for n, p in found.items()]


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(request.app.state.server.engine.refresh_loras)


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers() -> list[dict[str, Any]]:
    from ember.diffusion.samplers import SAMPLERS

    available = [n for n in A1111_SAMPLER_NAMES if n in SAMPLERS]
    return [{"name": A1111_SAMPLER_NAMES[n], "aliases": [n], "options": {}} for n in available]


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": k if k != "default" else "automatic", "label": v, "aliases": None,
             "default_rho": -1, "need_inner_model": False}
            for k, v in A1111_SCHEDULE_NAMES.items()]  # fmt: skip


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    server = request.app.state.server
    current = server.engine.current()
    return {
        **server.options,
        "sd_model_checkpoint": current.title,
        "sd_checkpoint_hash": current.sha256,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": server.options.get("CLIP_stop_at_last_layers", 1),
        "sd_vae": server.engine.current_vae() or "Automatic",
    }


@router.post("/options")
async def set_options(request: Request, options: dict[str, Any]) -> None:
    from starlette.concurrency import run_in_threadpool

    server = request.app.state.server
    if "sd_model_checkpoint" in options:
        title = options["sd_model_checkpoint"]
        if not isinstance(title, str):
            raise EmberError("sd_model_checkpoint must be a model title from /sdapi/v1/sd-models")
        await run_in_threadpool(server.engine.select, title)
    if "sd_vae" in options:
        await run_in_threadpool(server.engine.select_vae, _vae_name(options["sd_vae"]))
    for key, value in options.items():
        if key not in ("sd_model_checkpoint", "sd_vae") and len(server.options) < 256:
            server.options[key] = value


@router.post("/png-info", response_model=PngInfoResponse)
async def png_info(request: Request, req: PngInfoRequest) -> dict[str, Any]:
    raw = decode_base64(req.image, "image")
    decode_image(raw, request.app.state.server.limits)  # same format and size rules as uploads
    text = read_png_text(raw)
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": parse_infotext(info)}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 infotext -> {"Prompt", "Negative prompt", "Steps", ...} (a simple reader of
    `format_infotext`'s output: the last line holds the `Key: value` pairs)."""
    if not text:
        return {}
    lines = text.split("\n")
    out: dict[str, Any] = {}
    pairs = lines.pop() if len(lines) > 1 or ": " in lines[0] else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    if negative:
        k = negative[0]
        out["Prompt"] = "\n".join(lines[:k])
        out["Negative prompt"] = "\n".join(lines[k:])[len("Negative prompt: ") :]
    else:
        out["Prompt"] = "\n".join(lines)
        out["Negative prompt"] = ""
    for key, value in _split_pairs(pairs):
        out[key] = value
    if "Size" in out and "x" in str(out["Size"]):
        w, _, h = str(out["Size"]).partition("x")
        out["Size-1"], out["Size-2"] = w, h
    return out


def _split_pairs(line: str) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(line):
        colon = line.find(": ", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 2
        if j < len(line) and line[j] == '"':
            try:
                value, end = json.JSONDecoder().raw_decode(line, j)
            except ValueError:
                break
            j = end
        else:
            end = line.find(", ", j)
            end = len(line) if end < 0 else end
            value, j = line[j:end], end
        out.append((key, str(value)))
        i = j + 2 if line.startswith(", ", j) else len(line)
    return out
