"""Checkpoint I/O: original single-file SD checkpoints, diffusers folders, hashes, strict loading.

In memory every model is a `LatentDiffusion` whose state-dict names are CompVis ldm's, so an
original SD 1.x single file loads without renaming. SD 2.x files keep their text model in
OpenCLIP naming (`cond_stage_model.model.*`); it is converted to and from the transformers layout at the edge.
Only safetensors are read; pickled `.ckpt`/`.bin` files are refused (unpickling runs code).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ember import config as C
from ember.errors import EmberError
from ember.files import atomic_path, sha256_files, write_atomic

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
CONFIG_KEY = "ember_config"
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPENCLIP = TEXT + "model."
# Keys that SD files carry but ember's modules do not hold: schedule buffers (ember computes the
# schedule from the config), EMA copies, CLIP's position-id buffer, OpenCLIP's unused heads.
IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_", "log_one_minus", "posterior_", "logvar")  # fmt: skip
IGNORED_SUFFIXES = ("position_ids",)
PASSTHROUGH_TEXT_KEYS = ("text_projection", "logit_scale")
# Ends every refusal of a model, so a user learns what to look for instead.
SUPPORTED = (
    "ember loads SD 1.x, SD 2.x (512 and 768-v), SD inpainting and ember's own models, "
    "as one .safetensors file or a diffusers folder"
)


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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------------------------------------
# safetensors files: validation and hashes


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header against its size; return the parsed header.

    safetensors' own errors are terse; this names the problem so a user knows the file is at fault.
    """
    path = Path(path)
    if not path.exists():
        raise EmberError(f"model file not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise EmberError(
            f"{path.name} is a pickled checkpoint, which can run arbitrary code when loaded; ember "
            f"reads only .safetensors. Convert it safely with: ember convert {path} OUT.safetensors"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EmberError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EmberError(f"{path}: not a safetensors file or truncated (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EmberError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EmberError(f"{path}: not a safetensors file (header is not a JSON object)")
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise EmberError(f"{path}: malformed safetensors metadata (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise EmberError(f"{path}: malformed safetensors entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= data_len:
            raise EmberError(
                f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                f"{data_len}); the file is truncated or corrupt"
            )
        if end - begin != count * width:
            raise EmberError(f"{path}: tensor {name!r} size does not match its shape and dtype")
        spans.append((begin, end))
    spans.sort()
    for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise EmberError(f"{path}: overlapping tensors in safetensors header")
    return header


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated read of all tensors and the string metadata."""
    header = check_safetensors(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except SafetensorError as exc:  # what check_safetensors does not cover, e.g. unreadable bytes
        raise EmberError(f"{path}: unreadable safetensors file ({exc})") from None
    return tensors, dict(header.get("__metadata__") or {})


def file_hashes(path: str | Path) -> tuple[str, str]:
    """(sha256, A1111 short hash = first 10 hex digits). A folder hashes its weight files in order.

    Hashing a 2-4 GB file takes seconds, so results are cached by (path, size, mtime).
    """
    path = Path(path).resolve()
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_file = (
        Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember")) / "hashes.json"
    )
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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    """Write atomically (`ember.files.atomic_path`): a kill mid-write leaves the old file intact."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ---------------------------------------------------------------------------------------------
# detecting what a single file is


def describe_other_model(keys: Iterable[str]) -> str | None:
    """What a single file holds when it is not an SD 1.x/2.x model, told by its tensor names;
    None when it looks like one (ldm U-Net keys, no other architecture's)."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("conditioner.embedders."):  # sgm's layout: base has CLIP-L and bigG, the refiner bigG
        return "an SDXL " + ("base" if has("conditioner.embedders.1.") else "refiner") + " model"
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


def load_model(
    path: str | Path,
    config: str | C.ModelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a single-file `.safetensors` or a diffusers folder into a strict `LatentDiffusion`."""
    path = Path(path)
    if isinstance(config, str):
        try:
            config = C.get_preset(config)
        except ValueError as exc:
            raise EmberError(str(exc)) from None
    note = progress or (lambda _msg: None)
    if path.is_dir():
        note("reading diffusers folder")
        sd, cfg, extra = read_diffusers(path)
        cfg = config or cfg
    else:
        note("reading checkpoint")
        header = check_safetensors(path)
        if CONFIG_KEY not in (header.get("__metadata__") or {}):
            # Told by the names alone, before gigabytes of another architecture are read.
            other = describe_other_model(k for k in header if k != "__metadata__")
            if other:
                raise EmberError(f"{path.name} is {other}; {SUPPORTED}")
        raw, metadata = read_safetensors(path)
        try:
            cfg = config or detect_config(raw, metadata)
            sd, extra = ldm_to_internal(raw, cfg)
        except (EmberError, ValueError) as exc:  # openclip_to_hf names stray text-model keys
            raise EmberError(f"{path.name}: {exc}") from None
        del raw  # the only other reference to the file's tensors: lets build_model free them
    from ember.models.text import build_tokenizer

    note("building model")
    try:
        tokenizer = build_tokenizer(cfg.text)  # refuses ids outside its vocabulary
        model = build_model(cfg, sd, dtype=dtype)
    except ValueError as exc:  # EmberError is a ValueError
        raise EmberError(f"{path.name}: {exc}") from None
    if config is None and not path.is_dir() and CONFIG_KEY not in _metadata_of(path):
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
    return LoadedModel(model, tokenizer, cfg, str(path), name, sha, short, extra)


def _metadata_of(path: Path) -> dict:
    return dict(check_safetensors(path).get("__metadata__") or {})


def build_model(
    cfg: C.ModelConfig, sd: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Build on the meta device, check every key, then assign the tensors (no double allocation)."""
    from ember.models.ldm import LatentDiffusion, load_state_dict_strict
    from ember.models.text import build_text_encoder

    with torch.device("meta"):
        model = LatentDiffusion(cfg, build_text_encoder(cfg.text))
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

    out = dict(sd)
    out.update({k: v for k, v in extra.items() if not k.startswith(OPENCLIP)})
    if cfg.text.kind == "clip" and cfg.unet.context_dim == 1024 and cfg.text.hidden_size == 1024:
        text = {k[len(TEXT) :]: out.pop(k) for k in list(out) if k.startswith(TEXT)}
        text.update({k[len(OPENCLIP) :]: v for k, v in extra.items() if k.startswith(OPENCLIP)})
        out.update({OPENCLIP + k: v for k, v in hf_to_openclip(text).items()})
    return out


# ---------------------------------------------------------------------------------------------
# saving and the diffusers layout


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


# Pipelines of architectures ember does not implement, as model_index.json names them.
_OTHER_PIPELINES = {
    "StableDiffusionXL": "an SDXL model", "StableDiffusion3": "an SD3 model", "Flux": "a Flux model"
}  # fmt: skip
_PARTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_TOKENIZERS = {"clip": ("CLIPTokenizer", 49408), "minilm": ("BertTokenizer", C.MINILM.vocab_size)}


def read_diffusers(
    folder: Path,
) -> tuple[dict[str, torch.Tensor], C.ModelConfig, dict[str, torch.Tensor]]:
    """A diffusers pipeline folder -> ldm-named state dict and its ModelConfig."""
    from ember import keymaps

    cfg, index = inspect_diffusers(folder)
    unet_cfg, vae_cfg = cfg.unet, cfg.vae
    if "_ember_config" in index:  # written by ember: the exact config, name and all
        try:
            cfg = C.model_config_from_dict(index["_ember_config"])
        except (ValueError, TypeError, KeyError) as exc:
            raise EmberError(f"{folder.name}: unreadable _ember_config ({exc!r})") from None
    weights = {}
    for part, stem in _PARTS.items():
        file = folder / part / f"{stem}.safetensors"
        if not file.exists():
            others = sorted(p.name for p in (folder / part).glob(f"{stem}*"))
            hint = ""
            if any(name.endswith(".bin") for name in others):
                hint = " (only a pickled .bin is present; ember reads safetensors only)"
            elif others:  # diffusion_pytorch_model.fp16.safetensors, -00001-of-00002, ...
                hint = f" (found {', '.join(others[:3])}: ember reads one unsharded, plain file)"
            raise EmberError(f"{folder}: missing {part}/{stem}.safetensors{hint}")
        weights[part], _ = read_safetensors(file)
    sd = {}
    try:
        unet = keymaps.unet_diffusers_to_ldm(weights["unet"], unet_cfg)
        vae = keymaps.vae_diffusers_to_ldm(weights["vae"], vae_cfg)
    except EmberError as exc:
        raise EmberError(f"{folder.name}: {exc}") from None
    sd.update({UNET + k: v for k, v in unet.items()})
    sd.update({VAE + k: v for k, v in vae.items()})
    extra = {}
    for k, v in weights["text_encoder"].items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        # transformers 5 writes CLIP keys without the `text_model.` level that 4.x and SD files use.
        if cfg.text.kind == "clip" and not k.startswith("text_model."):
            k = "text_model." + k
        sd[TEXT + "transformer." + k] = v
    return sd, cfg, extra


def inspect_diffusers(folder: Path) -> tuple[C.ModelConfig, dict]:
    """The ModelConfig a diffusers folder describes (and its model_index.json), from its configs
    alone: what ember cannot load is refused here, before any weights are read."""
    from ember import keymaps
    from ember.models.text import text_config_from_hf

    if not (folder / "model_index.json").exists():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f"; to load a file inside, pass it: {folder / files[0]}" if files else ""
        raise EmberError(f"{folder} is not a diffusers folder (no model_index.json){hint}")
    index = _read_json(folder / "model_index.json")
    pipeline = str(index.get("_class_name"))
    family = next((f for p, f in _OTHER_PIPELINES.items() if pipeline.startswith(p)), None)
    if family is None and "text_encoder_2" in index:
        family = "a model with two text encoders (as SDXL)"
    if family is None and "unet" not in index:
        family = (
            "a transformer (DiT) model" if "transformer" in index else "a model without a U-Net"
        )
    if family:
        raise EmberError(
            f"{folder.name} is a diffusers folder of {family} ({pipeline}); {SUPPORTED}"
        )
    configs = {part: _read_json(folder / part / "config.json") for part in _PARTS}
    try:
        if configs["unet"].get("addition_embed_type") == "text_time":
            raise EmberError("its U-Net takes SDXL's size conditioning (addition_embed_type)")
        unet_cfg = keymaps.unet_config_from_diffusers(configs["unet"])
        vae_cfg = keymaps.vae_config_from_diffusers(configs["vae"])
        text_cfg = text_config_from_hf(configs["text_encoder"])
        sched_cfg = _schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json")
        size = int(configs["unet"].get("sample_size", 64)) * vae_cfg.downsample
    except (ValueError, KeyError, TypeError) as exc:  # EmberError is a ValueError
        raise EmberError(f"{folder.name} ({pipeline}): {exc}; {SUPPORTED}") from None
    z, n = vae_cfg.z_channels, unet_cfg.in_channels
    if n != z and (n, z) != (9, 4):  # latents, or SD inpainting's latents + mask + masked image
        raise EmberError(
            f"{folder.name} ({pipeline}): its U-Net takes {n} input channels for {z}-channel "
            f"latents ({z}: text-to-image, 9 with 4: inpainting); {SUPPORTED}"
        )
    if text_cfg.hidden_size != unet_cfg.context_dim:
        raise EmberError(
            f"{folder.name}: its text encoder is {text_cfg.hidden_size} wide but its U-Net attends "
            f"to {unet_cfg.context_dim}-wide context; {SUPPORTED}"
        )
    _check_tokenizer(folder, index, text_cfg)
    text_cfg = dataclasses.replace(text_cfg, pad_token_id=_pad_id(folder, text_cfg))
    return C.ModelConfig(folder.name, unet_cfg, vae_cfg, text_cfg, sched_cfg, size=size), index


def _check_tokenizer(folder: Path, index: dict, text_cfg: C.TextConfig) -> None:
    """ember tokenises with its own copy of CLIP's (or MiniLM's) tokenizer, not the folder's: a
    folder whose tokenizer or vocabulary differs would index its embedding table out of range."""
    want, vocab_size = _TOKENIZERS[text_cfg.kind]
    declared = _read_json(folder / "tokenizer" / "tokenizer_config.json", {}).get("tokenizer_class")
    if declared is None and "_ember_config" not in index:  # ember once wrote CLIP for MiniLM here
        entry = index.get("tokenizer")
        declared = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if declared is not None and not str(declared).startswith(want):
        raise EmberError(
            f"{folder.name}: its tokenizer is {declared}, not {want}; ember tokenises this text "
            f"encoder with {want}'s own vocabulary; {SUPPORTED}"
        )
    if text_cfg.vocab_size != vocab_size:
        raise EmberError(
            f"{folder.name}: its text encoder has a {text_cfg.vocab_size}-token vocabulary, "
            f"{want}'s has {vocab_size}; {SUPPORTED}"
        )
    if text_cfg.kind == "clip" and (folder / "tokenizer" / "vocab.json").exists():
        from ember.models.text import load_clip_bpe

        if _read_json(folder / "tokenizer" / "vocab.json") != load_clip_bpe()[0]:
            raise EmberError(
                f"{folder.name}: tokenizer/vocab.json is not CLIP's vocabulary, which ember "
                f"tokenises with; {SUPPORTED}"
            )


def _read_json(file: Path, default: dict | None = None) -> dict:
    """A JSON object from a model folder; a missing file is `default` or an error."""
    if not file.exists() and default is not None:
        return default
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmberError(f"{file.parent.parent}: missing {file.parent.name}/{file.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EmberError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EmberError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _pad_id(folder: Path, text_cfg: C.TextConfig) -> int:
    """SD 1.x tokenizers pad with <|endoftext|>, SD 2.x with "!" (id 0)."""
    special = folder / "tokenizer" / "special_tokens_map.json"
    if special.exists():
        pad = _read_json(special).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad == "!":
            return 0
        if pad == "<|endoftext|>":
            return 49407
    return text_cfg.pad_token_id


def _schedule_from_diffusers(file: Path) -> C.ScheduleConfig:
    if not file.exists():
        return C.ScheduleConfig()
    d = _read_json(file)
    return C.ScheduleConfig(
        num_train_timesteps=int(d.get("num_train_timesteps", 1000)),
        beta_start=float(d.get("beta_start", 0.00085)),
        beta_end=float(d.get("beta_end", 0.012)),
        beta_schedule={"squaredcos_cap_v2": "cosine"}.get(
            d.get("beta_schedule", "scaled_linear"), d.get("beta_schedule", "scaled_linear")
        ),
        prediction="v" if d.get("prediction_type") == "v_prediction" else "eps",
        steps_offset=int(d.get("steps_offset", 1)),
        set_alpha_to_one=bool(d.get("set_alpha_to_one", False)),
    )


def save_diffusers(loaded: LoadedModel, folder: str | Path) -> None:
    """Write a diffusers pipeline folder (safetensors weights, configs, tokenizer, scheduler)."""
    from ember import keymaps
    from ember.models.text import text_config_to_hf

    folder = Path(folder)
    cfg = loaded.config
    sd = loaded.model.state_dict()
    if cfg.text.depth < cfg.text.num_layers:
        # diffusers stores SD 2.x text models without the final (never used) block and reads the
        # last layer: drop the unused blocks here, as diffusers' own conversion does (BERT likewise).
        block = "encoder.layer" if cfg.text.kind == "minilm" else "text_model.encoder.layers"
        unused = tuple(
            f"{TEXT}transformer.{block}.{i}." for i in range(cfg.text.depth, cfg.text.num_layers)
        )
        sd = {k: v for k, v in sd.items() if not k.startswith(unused)}
        text_cfg = dataclasses.replace(cfg.text, num_layers=cfg.text.depth, layer="last")
        cfg = dataclasses.replace(cfg, text=text_cfg)
    comp = {
        p: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for p in (UNET, VAE, TEXT)
    }
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    save_safetensors(
        keymaps.unet_ldm_to_diffusers(comp[UNET], cfg.unet),
        folder / "unet" / "diffusion_pytorch_model.safetensors", meta,
    )  # fmt: skip
    save_safetensors(
        keymaps.vae_ldm_to_diffusers(comp[VAE], cfg.vae),
        folder / "vae" / "diffusion_pytorch_model.safetensors", meta,
    )  # fmt: skip
    # Written the way transformers 5 writes CLIPTextModel (no `text_model.` level).
    text = {
        k.removeprefix("transformer.").removeprefix("text_model."): v for k, v in comp[TEXT].items()
    }
    text.update({k.removeprefix(TEXT + "transformer.").removeprefix("text_model."): v
                 for k, v in loaded.extra.items() if k.startswith(TEXT + "transformer.")})  # fmt: skip
    save_safetensors(text, folder / "text_encoder" / "model.safetensors", meta)
    unet_json = keymaps.unet_config_to_diffusers(cfg.unet)
    unet_json["sample_size"] = cfg.size // cfg.vae.downsample
    _write_json(folder / "unet" / "config.json", unet_json)
    _write_json(folder / "vae" / "config.json", keymaps.vae_config_to_diffusers(cfg.vae))
    _write_json(folder / "text_encoder" / "config.json", text_config_to_hf(cfg.text))
    s = cfg.schedule
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(s.beta_schedule, s.beta_schedule),
        "prediction_type": "v_prediction" if s.prediction == "v" else "epsilon",
        "steps_offset": s.steps_offset, "set_alpha_to_one": s.set_alpha_to_one,
        "clip_sample": False,
    })  # fmt: skip
    loaded.tokenizer.to_transformers().save_pretrained(folder / "tokenizer")
    minilm = cfg.text.kind == "minilm"
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_ember_config": json.loads(cfg.to_json()),
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "BertModel" if minilm else "CLIPTextModel"],
        "tokenizer": ["transformers", _TOKENIZERS[cfg.text.kind][0]],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
