"""PNG files that carry their own generation record.

Each PNG holds two text chunks:
- `parameters`: the A1111 infotext, so every existing PNG-info reader shows the settings;
- `ember`: a JSON record with everything needed to regenerate the image's pixels exactly.
An image with a record also carries ember's invisible watermark (`ember.watermark`, unless turned
off), added to the model's pixels here, deterministically. PNG writing uses no timestamps or other
varying chunks, so the same pixels and record give the same bytes, unless the image carries Content
Credentials (`ember.provenance`): their signature and manifest id differ on every signing, while the
pixels and record stay the same.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from ember import provenance as P
from ember.errors import EmberError
from ember.files import write_atomic
from ember.settings import GenerationParams, params_from_dict
from ember.watermark import add_watermark, carries_watermark

RECORD_KEY = "ember"
INFOTEXT_KEY = "parameters"

# ember sampler name -> A1111 sampler name (schedule is a separate field since A1111 1.9).
A1111_SAMPLER_NAMES = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "ddim": "DDIM",
    "lcm": "LCM",
    "unipc": "UniPC",
}
A1111_SCHEDULE_NAMES = {
    "default": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",  # the default schedule with trailing timestep spacing
}


@dataclass(frozen=True)
class ImageRecord:
    """The full generation record of one image (one item of a batch)."""

    params: GenerationParams  # with batch=1 and the image's own seed
    model_name: str
    model_path: str
    model_sha256: str
    model_hash: str  # A1111 short hash (first 10 hex digits of the sha256)
    ember_version: str
    torch_version: str
    dtype: str
    device: str
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    init_image_sha256: str | None = None
    mask_sha256: str | None = None
    # each LoRA merged: {"name", "path", "sha256", "a1111_hash", "te_weight", "unet_weight"}
    loras: tuple[dict[str, Any], ...] = ()
    # textual-inversion embeddings the prompts used: {"name", "path", "sha256", "a1111_hash"}
    embeddings: tuple[dict[str, Any], ...] = ()
    vae_name: str | None = None  # a replacement VAE (`--vae`), else the model's own
    vae_path: str | None = None
    vae_sha256: str | None = None
    refiner: dict[str, Any] | None = None  # SDXL's refiner: {"name", "path", "sha256", "hash"}
    # the package (`ember.compiled`) that ran the U-Net, None where it ran eagerly: compiled
    # kernels round differently, so `--from` elsewhere gives pixels a rounding error apart
    compiled_unet: str | None = None
    # what the file carries beyond pixels and record (set when it is encoded; see png_bytes)
    credentials: bool = False  # a signed C2PA manifest and the XMP DigitalSourceType
    watermark: bool = False  # the invisible mark (`ember.watermark`); False in older records

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ImageRecord:
        data = json.loads(text)
        params = params_from_dict(data.pop("params"))
        names = {f.name for f in fields(ImageRecord)}
        data["loras"] = tuple(data.get("loras", ()))
        data["embeddings"] = tuple(data.get("embeddings", ()))
        return ImageRecord(params=params, **{k: v for k, v in data.items() if k in names})


def format_infotext(record: ImageRecord) -> str:
    """The A1111 `parameters` text: prompt, negative prompt, then `Key: value` pairs."""
    p = record.params
    pairs: dict[str, Any] = {
        "Steps": p.steps,
        "Sampler": A1111_SAMPLER_NAMES.get(p.sampler, p.sampler),
        "Schedule type": A1111_SCHEDULE_NAMES.get(_schedule(p), p.schedule),
        "CFG scale": _num(p.cfg),
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": record.model_hash,
        "Model": record.model_name,
    }
    if record.mode != "txt2img":
        pairs["Denoising strength"] = _num(p.strength)
    if p.clip_skip > 1:
        pairs["Clip skip"] = p.clip_skip
    if p.layout_guidance > 0:
        pairs["Layout guidance"] = _num(p.layout_guidance)
    if p.tome > 0:  # as A1111 writes it
        pairs["Token merging ratio"] = _num(p.tome)
    if p.deepcache > 1:
        pairs["DeepCache interval"] = p.deepcache
    if p.timestep_spacing and _schedule(p) != "sgm_uniform":
        pairs["Timestep spacing"] = p.timestep_spacing
    if record.vae_name:
        pairs["VAE hash"] = (record.vae_sha256 or "")[:10]
        pairs["VAE"] = record.vae_name
    if record.refiner:  # as A1111 writes them
        pairs["Refiner"] = f"{record.refiner['name']} [{record.refiner['hash']}]"
        pairs["Refiner switch at"] = _num(p.refiner_switch_at)
    if record.loras:
        pairs["Lora hashes"] = ", ".join(f"{x['name']}: {x['a1111_hash']}" for x in record.loras)
    if record.embeddings:
        pairs["TI hashes"] = ", ".join(f"{x['name']}: {x['a1111_hash']}" for x in record.embeddings)
    pairs["Version"] = f"ember {record.ember_version}"
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in pairs.items()))
    return "\n".join(lines)


def _schedule(p: GenerationParams) -> str:
    trailing = p.schedule == "default" and p.timestep_spacing == "trailing"
    return "sgm_uniform" if trailing else p.schedule


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _quote(text: str) -> str:
    # A1111 quotes values that contain the separators of its key-value list.
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text


def tensor_to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded exactly as diffusers does."""
    arr = images.detach().to("cpu").float().permute(0, 2, 3, 1).numpy()
    return (arr * 255).round().astype(np.uint8)


def uint8_to_tensor(pixels: np.ndarray):
    """(H, W, C) uint8 -> (1, C, H, W) float32 in [0, 1]: an input image or mask for the pipeline."""
    import torch

    arr = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def png_bytes(
    pixels: np.ndarray,
    record: ImageRecord | None = None,
    provenance: P.Provenance = P.ON,
    inputs: dict[str, np.ndarray] | None = None,
) -> bytes:
    """Encode one (H, W, 3) uint8 image as PNG with the record's text chunks and, for an image with
    a record, the provenance marks `provenance` asks for. `inputs` ({title: (H, W, C) uint8}): the
    images a request put in (init image, mask), listed in the credentials as ingredients."""
    if record is None:
        return _encode(pixels, PngImagePlugin.PngInfo())
    record = marked_record(record, provenance)
    if provenance.watermark:
        pixels = add_watermark(pixels)
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, format_infotext(record))
    info.add_itxt(RECORD_KEY, record.to_json())
    if not provenance.credentials:
        return _encode(pixels, info)
    info.add_itxt(P.XMP_KEY, P.xmp_packet())
    claim = P.Claim(
        title=f"ember {record.mode}, seed {record.params.seed}",
        software_version=record.ember_version,
        model_name=record.model_name,
        model_sha256=record.model_sha256,
        model_path=record.model_path,
        mode=record.mode,
        ingredients=tuple(
            (k, _encode(v, PngImagePlugin.PngInfo())) for k, v in (inputs or {}).items()
        ),
    )
    return P.sign_png(_encode(pixels, info), claim, provenance)


def marked_record(record: ImageRecord, provenance: P.Provenance) -> ImageRecord:
    """The record as `png_bytes` writes it: saying whether the file carries credentials and the
    watermark (whose pixels, deterministic, `--from` remakes too)."""
    p = record.params
    marked = provenance.watermark and carries_watermark(p.width or 0, p.height or 0)
    return replace(record, credentials=provenance.credentials, watermark=marked)


def _encode(pixels: np.ndarray, info: PngImagePlugin.PngInfo) -> bytes:
    image = (
        Image.fromarray(pixels[:, :, 0], "L")
        if pixels.shape[2] == 1
        else Image.fromarray(pixels, "RGB")
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def write_png(
    path: str | Path,
    pixels: np.ndarray,
    record: ImageRecord | None = None,
    provenance: P.Provenance = P.ON,
    inputs: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write atomically: a half-written PNG never takes the place of a good one."""
    return write_atomic(path, png_bytes(pixels, record, provenance, inputs))


def read_png_text(source: str | Path | bytes) -> dict[str, str]:
    """The text chunks of a PNG (from a path or bytes)."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
    except FileNotFoundError:
        raise EmberError(f"image not found: {source}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise EmberError(f"cannot read image {_name(source)}: {exc}") from None
    return {k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)}


def read_record(source: str | Path | bytes) -> ImageRecord:
    text = read_png_text(source)
    if RECORD_KEY not in text:
        raise EmberError(f"{_name(source)} has no ember generation record")
    try:
        return ImageRecord.from_json(text[RECORD_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise EmberError(f"{_name(source)}: unreadable ember record ({exc})") from None


def _name(source: str | Path | bytes) -> str:
    return "image" if isinstance(source, bytes) else str(source)


def load_image(
    path: str | Path, *, mode: str = "RGB", size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read an input image file as (H, W, C) uint8 (see `image_array`); one clear error for
    anything unreadable."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise EmberError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise EmberError(f"cannot read image {path}: {exc}") from None
    return image_array(img, mode, size)


def image_array(img: Image.Image, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, C) uint8 in `mode` ("RGB", or "L" for a mask: C = 1), resized to `size` (width,
    height) with Lanczos when given."""
    img = img.convert(mode)
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
