"""Single-file checkpoints: detecting what a file is, strict loading, saving, converting `.ckpt`.

In memory every model is a `LatentDiffusion` whose state-dict names are CompVis ldm's, so an
original SD 1.x single file loads without renaming. SD 2.x files keep their text model in
OpenCLIP naming (`cond_stage_model.model.*`); it is converted to and from the transformers layout at the edge.
Only safetensors are read; pickled `.ckpt`/`.bin` files are refused (unpickling runs code).
`load_model` also takes a diffusers folder, read by `ember.diffusers_folder`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import config as C
from ember.config import SUPPORTED
from ember.diffusers_folder import read_diffusers
from ember.errors import EmberError
from ember.files import sha256_files, write_atomic
from ember.keymaps import IGNORED_PREFIXES, IGNORED_SUFFIXES, TEXT, UNET, VAE
from ember.safetensors_io import check_safetensors, read_safetensors, save_safetensors
from ember.sdxl_files import detect_sdxl_config, internal_to_sgm, is_sgm, sgm_to_internal

CONFIG_KEY = "ember_config"
OPENCLIP = TEXT + "model."
PASSTHROUGH_TEXT_KEYS = ("text_projection", "logit_scale")


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with what the image record needs to name it."""

    model: torch.nn.Module  # LatentDiffusion
    tokenizer: object
    config: C.ModelConfig
    path: str
    name: str
    sha256: str
    short_hash: str
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    tokenizer_2: object | None = None  # SDXL base: the bigG encoder's (pads with "!")
    # the LoRAs merged into the U-Net's weights now ("sha256:weight"), set by `ember.lora`:
    # a compiled U-Net (`ember.compiled`) is valid only for the weights it was built from
    unet_adapters: tuple[str, ...] = ()

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder, in `model.text_encoders` order."""
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------------------------------------
# hashes


def file_hashes(path: str | Path) -> tuple[str, str]:
    """(sha256, A1111 short hash = first 10 hex digits). A folder hashes its weight files in order.

    Hashing a 2-4 GB file takes seconds, so results are cached by (path, size, mtime).
    """
    path = Path(path).resolve()
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    from ember.catalog import cache_dir

    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp:
        return hit["sha256"], hit["sha256"][:10]
    digest = sha256_files(files)
    cache[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(cache).encode())
    except OSError:
        pass  # a read-only home only costs the next run a re-hash
    return digest, digest[:10]


# ---------------------------------------------------------------------------------------------
# detecting what a single file is


def describe_other_model(keys: Iterable[str]) -> str | None:
    """What a single file holds when it is not an SD 1.x/2.x or SDXL model, told by its tensor
    names; None when it looks like one (ldm U-Net keys, no other architecture's)."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("conditioner.embedders."):  # sgm's layout (SDXL): read by ember.sdxl_files
        return None if has(UNET) else "SDXL text encoders without a U-Net"
    if has(UNET + "label_emb."):
        return "a U-Net with a class or size embedding (label_emb: SDXL or SD unCLIP)"
    if has(UNET + "joint_blocks.", "text_encoders.t5xxl."):
        return "an SD3 model"
    if has(UNET + "double_blocks.", "double_blocks."):
        return "a Flux model"
    if any("lora_" in k or ".lora." in k for k in keys):
        return "a LoRA (an add-on to a model), not a model"
    if has("string_to_param", "emb_params") or set(keys) & {"clip_l", "clip_g"}:
        return "a textual-inversion embedding, not a model"
    if has("down_blocks.", "mid_block."):
        return "one diffusers component (diffusers names); pass the whole diffusers folder"
    if not has(UNET):
        if has(VAE, "encoder.", "decoder."):
            return "a VAE alone, not a whole model"
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        return f"a file of {len(keys)} tensors without a Stable Diffusion U-Net ({shown})"
    return None


def detect_config(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> C.ModelConfig:
    """The ModelConfig of an ldm-named state dict: ember's own metadata, else the SD family."""
    if CONFIG_KEY in metadata:
        try:
            return C.ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError, KeyError) as exc:  # hand-edited or from a newer ember
            raise EmberError(f"unreadable ember config in the file's metadata ({exc!r})") from None
    other = describe_other_model(sd)
    if other:
        raise EmberError(f"the file is {other}; {SUPPORTED}")
    if is_sgm(sd):
        try:
            return detect_sdxl_config(sd)
        except (EmberError, KeyError, IndexError) as exc:  # a tensor missing or misshapen
            reason = str(exc) if isinstance(exc, EmberError) else f"no tensor {exc}"
            raise EmberError(
                f"an SDXL-layout file ember cannot read: {reason}; {SUPPORTED}"
            ) from None
    probe = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    first = UNET + "input_blocks.0.0.weight"
    if probe not in sd or first not in sd or sd[probe].ndim != 2 or sd[first].ndim != 4:
        raise EmberError(
            f"an ldm U-Net that is not SD 1.x/2.x's (no cross-attention in its first block); "
            f"{SUPPORTED}; or pass --config NAME if it is one of {', '.join(C.PRESETS)}"
        )
    context_dim = sd[probe].shape[1]
    in_channels = sd[first].shape[1]
    if context_dim == 768:
        cfg = C.get_preset("sd15")
    elif context_dim == 1024:
        cfg = C.get_preset("sd21-base")
    else:
        raise EmberError(
            f"an SD-like U-Net with cross-attention width {context_dim} (SD 1.x has 768, SD 2.x "
            f"1024); {SUPPORTED}; or pass --config NAME ({', '.join(C.PRESETS)})"
        )
    if in_channels not in (4, 9):
        # 5: SD 2 depth-to-image, 7: the x4 upscaler; their extra inputs are not implemented.
        raise EmberError(
            f"an SD U-Net with {in_channels} input channels (4: text-to-image, 9: inpainting; "
            f"5 is depth-to-image, 7 the x4 upscaler); {SUPPORTED}"
        )
    if in_channels != cfg.unet.in_channels:
        cfg = dataclasses.replace(
            cfg,
            name=cfg.name + "-inpaint",
            unet=dataclasses.replace(cfg.unet, in_channels=in_channels),
        )
    if context_dim == 1024 and OPENCLIP + "transformer.resblocks.23.ln_1.weight" not in sd:
        # A 23-layer text model was written from a diffusers folder: its last layer is the one used.
        n = _count_layers(sd, OPENCLIP + "transformer.resblocks.")
        cfg = dataclasses.replace(
            cfg, text=dataclasses.replace(cfg.text, num_layers=n, layer="last")
        )
    return cfg


def _count_layers(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def is_v_prediction(model: torch.nn.Module, cfg: C.ModelConfig) -> bool:
    """Tell a v-prediction SD 2.x U-Net from an eps one by how it denoises a known input.

    Same test as A1111: at a high noise level, the parametrisation whose reconstruction of a flat
    image is closer to that image is the one the network was trained with.
    """
    from ember.diffusion.schedules import train_alphas_cumprod

    unet = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    dtype = next(unet.parameters()).dtype
    x0 = torch.full((1, 4, 8, 8), 0.5, dtype=dtype)
    ctx = torch.zeros((1, 77, cfg.unet.context_dim), dtype=dtype)
    a = train_alphas_cumprod(cfg.schedule).to(dtype)
    t = 999
    noise = torch.randn(x0.shape, generator=gen, dtype=dtype)
    x_t = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise
    with torch.no_grad():
        out = unet(x_t, torch.tensor([float(t)], dtype=dtype), ctx)
    x0_eps = (x_t - (1 - a[t]).sqrt() * out) / a[t].sqrt()
    x0_v = a[t].sqrt() * x_t - (1 - a[t]).sqrt() * out
    return bool((x0_v - x0).abs().mean() < (x0_eps - x0).abs().mean())


# ---------------------------------------------------------------------------------------------
# loading


# What a model file may recommend for generation (a sidecar `<file>.json`, or the JSON object under
# `RECOMMENDED_KEY` in its metadata): few-step models such as SD-Turbo are made for one sampler,
# step count, guidance scale and spacing, and for their own prediction type.
RECOMMENDED_KEY = "ember_recommended"
RECOMMENDED_FIELDS = {"prediction": str, "sampler": str, "steps": int, "cfg": (int, float),
                      "timestep_spacing": str, "size": int}  # fmt: skip


def read_recommendations(path: Path) -> dict:
    """The generation settings a model recommends: its sidecar `.json` (beside a file, or
    `ember.json` in a folder) over its metadata. Unknown keys and wrong types are an EmberError."""
    sidecar = path / "ember.json" if path.is_dir() else path.with_suffix(".json")
    data: dict = {}
    if not path.is_dir():
        raw = (check_safetensors(path).get("__metadata__") or {}).get(RECOMMENDED_KEY)
        if raw:
            data.update(_json_object(raw, f"{path.name}'s {RECOMMENDED_KEY} metadata"))
    if sidecar.is_file():
        data.update(_json_object(sidecar.read_text(), str(sidecar)))
    for key, value in data.items():
        kind = RECOMMENDED_FIELDS.get(key)
        if kind is None:
            raise EmberError(
                f"{sidecar.name}: unknown setting {key!r}; use {', '.join(RECOMMENDED_FIELDS)}"
            )
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EmberError(f"{sidecar.name}: {key} {value!r} has the wrong type")
    if data.get("prediction") not in (None, "eps", "v"):
        raise EmberError(f"{sidecar.name}: prediction {data['prediction']!r}: use eps or v")
    return data


def _json_object(text: str, what: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EmberError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EmberError(f"{what} must be a JSON object")
    return data


def _recommended(cfg: C.ModelConfig, rec: dict) -> C.ModelConfig:
    """`cfg` with a model's recommended settings as its defaults."""
    schedule = cfg.schedule
    if "prediction" in rec:
        schedule = dataclasses.replace(schedule, prediction=rec["prediction"])
    return dataclasses.replace(
        cfg,
        schedule=schedule,
        sampler=rec.get("sampler", cfg.sampler),
        steps=rec.get("steps", cfg.steps),
        guidance=float(rec["cfg"]) if "cfg" in rec else cfg.guidance,
        size=rec.get("size", cfg.size),
        timestep_spacing=rec.get("timestep_spacing", cfg.timestep_spacing),
    )


def load_model(
    path: str | Path,
    config: str | C.ModelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
    prediction: str | None = None,
) -> LoadedModel:
    """Load a single-file `.safetensors` or a diffusers folder into a strict `LatentDiffusion`.

    `prediction` ("eps" or "v") overrides what the file says or ember detects; the model's
    recommended settings (`read_recommendations`) become its defaults.
    """
    path = Path(path)
    if prediction not in (None, "eps", "v"):
        raise EmberError(f"prediction {prediction!r} is not allowed: use eps or v")
    if isinstance(config, str):
        try:
            config = C.get_preset(config)
        except ValueError as exc:
            raise EmberError(str(exc)) from None
    note = progress or (lambda _msg: None)
    _check_memory(path, dtype)
    if path.is_dir():
        note("reading diffusers folder")
        sd, cfg, extra = read_diffusers(path, dtype)
        cfg = config or cfg
    else:
        note("reading checkpoint")
        header = check_safetensors(path)
        if CONFIG_KEY not in (header.get("__metadata__") or {}):
            # Told by the names alone, before gigabytes of another architecture are read.
            other = describe_other_model(k for k in header if k != "__metadata__")
            if other:
                raise EmberError(f"{path.name} is {other}; {SUPPORTED}")
            if config is not None and is_sgm(header) and not config.sdxl:
                raise EmberError(
                    f"{path.name} is an SDXL model (conditioner.embedders.*); --config "
                    f"{config.name} describes another architecture"
                )
        raw, metadata = read_safetensors(path, dtype)  # converted as read: no second copy
        try:
            cfg = config or detect_config(raw, metadata)
            sd, extra = ldm_to_internal(raw, cfg)
        except (EmberError, ValueError) as exc:  # openclip_to_hf names stray text-model keys
            raise EmberError(f"{path.name}: {exc}") from None
        del raw  # the only other reference to the file's tensors: lets build_model free them
    from ember.diffusers_folder import read_tokenizers
    from ember.models.tokenizer import build_tokenizer

    rec = read_recommendations(path)
    if prediction is not None:
        rec["prediction"] = prediction
    cfg = _recommended(cfg, rec)
    note("building model")
    try:
        # refuses ids outside its vocabulary; a folder brings its own tokenizer
        if path.is_dir():
            tokenizers = read_tokenizers(path, cfg)
        else:
            tokenizers = [build_tokenizer(t) for t in cfg.text_encoders()]
        tokenizer, tokenizer_2 = tokenizers[0], (tokenizers[1:] or [None])[0]
        model = build_model(cfg, sd, dtype=dtype)
    except ValueError as exc:  # EmberError is a ValueError
        raise EmberError(f"{path.name}: {exc}") from None
    told = "prediction" in rec  # by the user, a sidecar or the metadata: no guessing
    if config is None and not told and not path.is_dir() and CONFIG_KEY not in _metadata_of(path):
        if cfg.unet.context_dim == 1024 and cfg.schedule.prediction == "eps":
            if is_v_prediction(model, cfg):
                cfg = dataclasses.replace(
                    cfg, name="sd21", size=768,
                    schedule=dataclasses.replace(cfg.schedule, prediction="v"),
                )  # fmt: skip
                model.config = cfg
    sha, short = file_hashes(path)
    name = path.stem if not path.is_dir() else path.name
    note("ready")
    return LoadedModel(model, tokenizer, cfg, str(path), name, sha, short, extra, tokenizer_2)


def _check_memory(path: Path, dtype: torch.dtype) -> None:
    """Refuse a model whose weights cannot fit this machine's free memory, before reading them."""
    from ember.device import check_memory
    from ember.safetensors_io import memory_to_load

    if path.is_dir():  # the files read_diffusers reads, not the fp16 variants beside them
        read = ("diffusion_pytorch_model.safetensors", "model.safetensors")
        files = [f for f in sorted(path.glob("*/*.safetensors")) if f.name in read]
    else:
        check_safetensors(path)  # a clear line for a file that is not safetensors at all
        files = [path]
    width = torch.finfo(dtype).bits // 8
    check_memory(memory_to_load(files, width), path.name, dtype)


def _metadata_of(path: Path) -> dict:
    return dict(check_safetensors(path).get("__metadata__") or {})


def build_model(
    cfg: C.ModelConfig, sd: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Build on the meta device, check every key, then assign the tensors (no double allocation)."""
    from ember.models.ldm import LatentDiffusion, load_state_dict_strict
    from ember.models.text import build_text_encoder

    with torch.device("meta"):
        model = LatentDiffusion(cfg, *[build_text_encoder(t) for t in cfg.text_encoders()])
    if cfg.text.kind == "minilm" and not any(k.startswith(TEXT) for k in sd):
        # ember's own models use the pretrained all-MiniLM-L6-v2 as is: its weights come from the
        # installed package rather than being copied into every model file.
        from ember.models.text import load_minilm_pretrained

        text = load_minilm_pretrained(cfg.text).state_dict()
        sd = {**sd, **{TEXT + k: v for k, v in text.items()}}
    for key in list(sd):  # one tensor at a time: never two full copies of the weights in memory
        if sd[key].is_floating_point() and sd[key].dtype != dtype:
            sd[key] = sd[key].to(dtype)
    try:
        load_state_dict_strict(model, sd)
    except ValueError as exc:
        raise EmberError(f"checkpoint does not match the {cfg.name} architecture: {exc}") from None
    _materialise_buffers(model)
    model.config = cfg
    return model.eval().requires_grad_(False)


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (not in any file) stay on meta after assign-loading; rebuild them."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
                elif name == "token_type_ids":  # BERT's default segment ids
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
                else:
                    raise EmberError(f"internal: buffer {name} was not loaded")


def ldm_to_internal(
    raw: dict[str, torch.Tensor], cfg: C.ModelConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An SD single-file dict -> ember's module names, plus pass-through extras for saving."""
    from ember.models.text import openclip_to_hf

    sd, extra, openclip = {}, {}, {}
    if cfg.sdxl:
        kept = {k: v for k, v in raw.items()
                if not (k.startswith(IGNORED_PREFIXES) or k.endswith(IGNORED_SUFFIXES))}  # fmt: skip
        return sgm_to_internal(kept, extra), extra
    for key, value in raw.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith(OPENCLIP):
            openclip[key[len(OPENCLIP) :]] = value
        else:
            sd[key] = value
    if openclip:
        converted = openclip_to_hf(openclip)
        for key, value in converted.items():
            if key.split(".")[-1] in PASSTHROUGH_TEXT_KEYS or key in PASSTHROUGH_TEXT_KEYS:
                extra[OPENCLIP + key] = value
            else:
                sd[TEXT + key] = value
    return sd, extra


def internal_to_ldm(
    sd: dict[str, torch.Tensor], cfg: C.ModelConfig, extra: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of `ldm_to_internal`: SD 2.x text model back to OpenCLIP names."""
    from ember.models.text import hf_to_openclip

    if cfg.sdxl:
        return internal_to_sgm(sd, cfg, extra)
    out = dict(sd)
    out.update({k: v for k, v in extra.items() if not k.startswith(OPENCLIP)})
    if cfg.text.kind == "clip" and cfg.unet.context_dim == 1024 and cfg.text.hidden_size == 1024:
        text = {k[len(TEXT) :]: out.pop(k) for k in list(out) if k.startswith(TEXT)}
        text.update({k[len(OPENCLIP) :]: v for k, v in extra.items() if k.startswith(OPENCLIP)})
        out.update({OPENCLIP + k: v for k, v in hf_to_openclip(text).items()})
    return out


# ---------------------------------------------------------------------------------------------
# saving


def convert_pickled(src: Path, out: Path) -> None:
    """Rewrite a pickled `.ckpt` as safetensors without ever running its code.

    `torch.load(weights_only=True)` unpickles only tensors and plain containers and refuses anything
    else; there is deliberately no fallback to a full unpickle.
    """
    if out.suffix != ".safetensors":
        raise EmberError(f"output {out} must end in .safetensors")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise EmberError(f"not found: {src}") from None
    except Exception as exc:  # noqa: BLE001 - any refusal is the file's fault, reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmberError(f"{src}: refused to load safely ({first[:200]})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise EmberError(f"{src}: no state dict of tensors inside")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EmberError(f"{src}: no tensors inside")
    # Tied or shared storage is written once per name: safetensors forbids aliasing.
    save_safetensors({k: v.clone() for k, v in tensors.items()}, out, {"format": "pt"})


def save_single_file(loaded: LoadedModel, path: str | Path) -> None:
    sd = internal_to_ldm(loaded.model.state_dict(), loaded.config, loaded.extra)
    save_safetensors(sd, path, {CONFIG_KEY: loaded.config.to_json(), "format": "pt"})
