"""Diffusers pipeline folders: what one describes, reading it into ldm names, writing one.

A folder holds `unet/`, `vae/` and `text_encoder/` weights in diffusers' names with a config.json
each, plus `tokenizer/`, `scheduler/` and `model_index.json`. `inspect_diffusers` refuses what ember
cannot load from the configs alone, before any weights are read; `read_diffusers` renames the
weights to ldm's (`ember.keymaps`), the names every model has in memory; `save_diffusers` is its
inverse. Single `.safetensors` files, and `load_model` for both kinds, are in `ember.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from ember import config as C
from ember import keymaps
from ember.config import SUPPORTED
from ember.errors import EmberError
from ember.files import write_atomic
from ember.keymaps import IGNORED_SUFFIXES, TEXT, UNET, VAE
from ember.safetensors_io import read_safetensors, save_safetensors
from ember.sdxl_files import EMBEDDERS

# Pipelines of architectures ember does not implement, as model_index.json names them.
_OTHER_PIPELINES = {"StableDiffusion3": "an SD3 model", "Flux": "a Flux model"}
_PARTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_TOKENIZERS = {"clip": ("CLIPTokenizer", 49408), "minilm": ("BertTokenizer", C.MINILM.vocab_size)}


def read_diffusers(
    folder: Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], C.ModelConfig, dict[str, torch.Tensor]]:
    """A diffusers pipeline folder -> ldm-named state dict (floats in `dtype`, if given, as they
    are read) and its ModelConfig."""
    cfg, index = inspect_diffusers(folder)
    unet_cfg, vae_cfg = cfg.unet, cfg.vae
    if "_ember_config" in index:  # written by ember: the exact config, name and all
        try:
            cfg = C.model_config_from_dict(index["_ember_config"])
        except (ValueError, TypeError, KeyError) as exc:
            raise EmberError(f"{folder.name}: unreadable _ember_config ({exc!r})") from None
    weights = {}
    encoders = _text_parts(index, cfg)
    for part, stem in [("unet", _PARTS["unet"]), ("vae", _PARTS["vae"])] + [
        (p, "model") for p, _ in encoders
    ]:
        file = folder / part / f"{stem}.safetensors"
        if not file.exists():
            others = sorted(p.name for p in (folder / part).glob(f"{stem}*"))
            hint = ""
            if any(name.endswith(".bin") for name in others):
                hint = " (only a pickled .bin is present; ember reads safetensors only)"
            elif others:  # diffusion_pytorch_model.fp16.safetensors, -00001-of-00002, ...
                hint = f" (found {', '.join(others[:3])}: ember reads one unsharded, plain file)"
            raise EmberError(f"{folder}: missing {part}/{stem}.safetensors{hint}")
        weights[part], _ = read_safetensors(file, dtype)
    sd = {}
    try:
        unet = keymaps.unet_diffusers_to_ldm(weights["unet"], unet_cfg)
        vae = keymaps.vae_diffusers_to_ldm(weights["vae"], vae_cfg)
    except EmberError as exc:
        raise EmberError(f"{folder.name}: {exc}") from None
    sd.update({UNET + k: v for k, v in unet.items()})
    sd.update({VAE + k: v for k, v in vae.items()})
    extra = {}
    for i, (part, _) in enumerate(encoders):
        prefix = f"{EMBEDDERS}{i}." if cfg.sdxl else TEXT
        for k, v in weights[part].items():
            if k.endswith(IGNORED_SUFFIXES):
                continue
            if k == "text_projection.weight":  # CLIPTextModelWithProjection's (SDXL's bigG)
                sd[prefix + k] = v
                continue
            # transformers 5 writes CLIP keys without the `text_model.` level of 4.x and SD files.
            if cfg.text.kind == "clip" and not k.startswith("text_model."):
                k = "text_model." + k
            sd[prefix + "transformer." + k] = v
    return sd, cfg, extra


def _text_parts(index: dict, cfg: C.ModelConfig | None = None) -> list[tuple[str, str]]:
    """(weights folder, tokenizer folder) of each text encoder a folder declares: SD's one, SDXL's
    two, the SDXL refiner's `text_encoder_2` alone."""
    declared = {  # SD folders written by hand may leave text_encoder out of model_index.json
        "text_encoder": index.get("text_encoder", ["transformers", "CLIPTextModel"]),
        "text_encoder_2": index.get("text_encoder_2"),
    }
    parts = [
        (enc, tok)
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        if isinstance(declared[enc], list) and declared[enc][:1] != [None]
    ]
    if cfg is not None and len(parts) != len(cfg.text_encoders()):
        raise EmberError(f"{len(parts)} text encoders for a model with {len(cfg.text_encoders())}")
    return parts


def inspect_diffusers(folder: Path) -> tuple[C.ModelConfig, dict]:
    """The ModelConfig a diffusers folder describes (and its model_index.json), from its configs
    alone: what ember cannot load is refused here, before any weights are read."""
    from ember.models.text import text_config_from_hf

    if not (folder / "model_index.json").exists():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f"; to load a file inside, pass it: {folder / files[0]}" if files else ""
        raise EmberError(f"{folder} is not a diffusers folder (no model_index.json){hint}")
    index = _read_json(folder / "model_index.json")
    pipeline = str(index.get("_class_name"))
    family = next((f for p, f in _OTHER_PIPELINES.items() if pipeline.startswith(p)), None)
    if family is None and "unet" not in index:
        family = (
            "a transformer (DiT) model" if "transformer" in index else "a model without a U-Net"
        )
    if family:
        raise EmberError(
            f"{folder.name} is a diffusers folder of {family} ({pipeline}); {SUPPORTED}"
        )
    parts = _text_parts(index)
    if not parts:
        raise EmberError(f"{folder.name} ({pipeline}) has no text encoder; {SUPPORTED}")
    configs = {part: _read_json(folder / part / "config.json") for part in ("unet", "vae")}
    configs |= {part: _read_json(folder / part / "config.json") for part, _ in parts}
    sdxl = configs["unet"].get("addition_embed_type") == "text_time"
    try:
        unet_cfg = keymaps.unet_config_from_diffusers(configs["unet"])
        vae_cfg = keymaps.vae_config_from_diffusers(configs["vae"])
        text_cfgs = [text_config_from_hf(configs[part]) for part, _ in parts]
        if sdxl:  # penultimate states without the final norm; bigG's pooled through its projection
            text_cfgs = [
                dataclasses.replace(
                    t,
                    layer="penultimate",
                    final_norm=False,
                    projection_dim=int(configs[part].get("projection_dim", 0))
                    if "WithProjection" in str(configs[part].get("architectures"))
                    else 0,
                )  # fmt: skip
                for t, (part, _) in zip(text_cfgs, parts, strict=True)
            ]
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
    width = sum(t.hidden_size for t in text_cfgs)
    if width != unet_cfg.context_dim:
        what = "text encoders are" if len(parts) > 1 else "text encoder is"
        raise EmberError(
            f"{folder.name}: its {what} {width} wide but its U-Net attends to "
            f"{unet_cfg.context_dim}-wide context{' (SDXL-style U-Net)' if sdxl else ''}; "
            f"{SUPPORTED}"
        )
    if sdxl and not text_cfgs[-1].projection_dim:
        raise EmberError(
            f"{folder.name}: an SDXL-style U-Net needs a text encoder with a projection "
            f"(CLIPTextModelWithProjection) for its pooled embedding; {SUPPORTED}"
        )
    if len(parts) > 1 and not sdxl:
        raise EmberError(
            f"{folder.name} ({pipeline}): two text encoders for a U-Net without SDXL's "
            f"addition embedding; {SUPPORTED}"
        )
    text_cfgs = [
        _check_tokenizer(folder, index, t, tok)
        for t, (_, tok) in zip(text_cfgs, parts, strict=True)
    ]
    text_2 = text_cfgs[1] if len(text_cfgs) > 1 else None
    return C.ModelConfig(folder.name, unet_cfg, vae_cfg, text_cfgs[0], sched_cfg, text_2=text_2,
                         size=size), index  # fmt: skip


def _check_tokenizer(
    folder: Path, index: dict, text_cfg: C.TextConfig, sub: str = "tokenizer"
) -> C.TextConfig:
    """`text_cfg` with the tokenizer ids the folder uses; refuses tokenizers that cannot work.

    A CLIP text encoder takes a CLIP-style BPE tokenizer: ember's built-in CLIP vocabulary when the
    folder's is CLIP's, otherwise the folder's own (`read_tokenizer`). MiniLM takes its WordPiece.
    """
    want, vocab_size = _TOKENIZERS[text_cfg.kind]
    declared = _read_json(folder / sub / "tokenizer_config.json", {}).get("tokenizer_class")
    if declared is None and "_ember_config" not in index:  # ember once wrote CLIP for MiniLM here
        entry = index.get(sub)
        declared = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if declared is not None and not str(declared).startswith(want):
        style = "a CLIP-style BPE tokenizer" if text_cfg.kind == "clip" else want
        raise EmberError(
            f"{folder.name}: its tokenizer is {declared}; its text encoder takes {style}"
            f"{' (vocab.json + merges.txt)' if text_cfg.kind == 'clip' else ''}; {SUPPORTED}"
        )
    if text_cfg.kind != "clip" or not _has_own_tokenizer(folder, sub):
        if text_cfg.vocab_size < vocab_size:
            raise EmberError(
                f"{folder.name}: its text encoder has a {text_cfg.vocab_size}-token vocabulary, "
                f"{want}'s has {vocab_size}; {SUPPORTED}"
            )
        return dataclasses.replace(text_cfg, pad_token_id=_pad_id(folder, text_cfg, sub))
    tok = _load_folder_tokenizer(folder, sub)
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    if None in ids:
        raise EmberError(f"{folder.name}: its tokenizer has no bos, eos or pad token; {SUPPORTED}")
    top = max(tok.get_vocab().values())
    if top >= text_cfg.vocab_size:
        raise EmberError(
            f"{folder.name}: its tokenizer has token ids up to {top} but its text encoder's "
            f"embedding table has {text_cfg.vocab_size} rows; {SUPPORTED}"
        )
    return dataclasses.replace(
        text_cfg, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]
    )


def read_tokenizers(folder: Path, cfg: C.ModelConfig) -> list:
    """The tokenizer of each text encoder of a diffusers folder (`read_tokenizer`), in order."""
    index = _read_json(folder / "model_index.json")
    return [
        read_tokenizer(folder, text_cfg, tok)
        for text_cfg, (_, tok) in zip(cfg.text_encoders(), _text_parts(index, cfg), strict=True)
    ]


def read_tokenizer(folder: Path, text_cfg: C.TextConfig, sub: str = "tokenizer"):
    """The tokenizer of a diffusers folder's text encoder (`text_cfg` as `inspect_diffusers` gives
    it): the folder's own CLIP-style BPE tokenizer where it is not CLIP's, else ember's built-in one
    (`ember.models.text.build_tokenizer`), which gives the same ids for CLIP's vocabulary."""
    from ember.models.tokenizer import build_clip_tokenizer_from_folder, build_tokenizer

    try:
        if text_cfg.kind == "clip" and _has_own_tokenizer(folder, sub):
            return build_clip_tokenizer_from_folder(folder / sub, text_cfg)
        return build_tokenizer(text_cfg)
    except ValueError as exc:  # EmberError is a ValueError
        raise EmberError(f"{folder.name}: {exc}") from None


def _has_own_tokenizer(folder: Path, sub: str = "tokenizer") -> bool:
    """Whether `tokenizer/` holds a BPE vocabulary, merges or added tokens other than CLIP's.

    Raises EmberError for tokenizer files that are not a BPE tokenizer's. A folder without
    tokenizer files is taken to use CLIP's (as ember's own folders of older versions). Read once
    per state of the files (parsing and comparing them takes ~0.7 s; loading asks twice).
    """
    tok = folder / sub
    stats = (
        [(f.name, f.stat()) for f in sorted(tok.iterdir()) if f.is_file()] if tok.is_dir() else []
    )
    stamp = tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    return _compare_tokenizer(folder, sub, stamp)


@functools.lru_cache(maxsize=8)
def _compare_tokenizer(folder: Path, sub: str, stamp: tuple) -> bool:
    """`_has_own_tokenizer`'s reading, cached by the files' `stamp` (name, mtime, size)."""
    from ember.models.tokenizer import CLIP_BOS, CLIP_EOS, load_clip_bpe

    tok = folder / sub
    full = _read_json(tok / "tokenizer.json", {})
    model = full.get("model") or {}
    if full and model.get("type", "BPE") != "BPE":
        raise EmberError(
            f"{folder.name}: tokenizer/tokenizer.json is a {model.get('type')} tokenizer; its "
            f"CLIP text encoder takes a CLIP-style BPE tokenizer; {SUPPORTED}"
        )
    if (tok / "vocab.json").exists():
        vocab = _read_json(tok / "vocab.json")
        if not (tok / "merges.txt").exists():
            raise EmberError(f"{folder.name}: tokenizer/vocab.json without merges.txt; {SUPPORTED}")
        lines = (tok / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    elif full:
        vocab = model.get("vocab") or {}
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in model.get("merges") or []]
    else:
        return False
    clip_vocab, clip_merges = load_clip_bpe()
    if vocab != clip_vocab or merges != clip_merges:
        return True
    # Added tokens (e.g. textual-inversion tokens saved with the folder) beyond CLIP's specials.
    added = {t.get("content") for t in full.get("added_tokens") or [] if isinstance(t, dict)}
    config = _read_json(tok / "tokenizer_config.json", {}).get("added_tokens_decoder") or {}
    added |= {t.get("content") for t in config.values() if isinstance(t, dict)}
    added |= set(_read_json(tok / "added_tokens.json", {}))
    return not added <= {CLIP_BOS, CLIP_EOS, "!"}


def _load_folder_tokenizer(folder: Path, sub: str = "tokenizer"):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder / sub))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer folder is bad input
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EmberError(f"{folder.name}: unreadable tokenizer ({reason}); {SUPPORTED}") from None


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


def _pad_id(folder: Path, text_cfg: C.TextConfig, sub: str = "tokenizer") -> int:
    """SD 1.x tokenizers pad with <|endoftext|>, SD 2.x with "!" (id 0)."""
    special = folder / sub / "special_tokens_map.json"
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


def save_diffusers(loaded, folder: str | Path) -> None:
    """Write a diffusers pipeline folder (safetensors weights, configs, tokenizer, scheduler).

    `loaded` is a `checkpoints.LoadedModel`, taken by its fields as `ember.pipeline` takes it.
    """
    from ember.models.text import text_config_to_hf

    folder = Path(folder)
    cfg = loaded.config
    sd = loaded.model.state_dict()
    if cfg.text.depth < cfg.text.num_layers and not cfg.sdxl:
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
    parts = ("unet", "vae", "scheduler") if cfg.sdxl else ("unet", "vae", "text_encoder",
                                                             "tokenizer", "scheduler")  # fmt: skip
    for part in parts:
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
    if cfg.sdxl:
        _save_sdxl_text(loaded, sd, folder, meta)
    else:
        # Written the way transformers 5 writes CLIPTextModel (no `text_model.` level).
        text = {
            k.removeprefix("transformer.").removeprefix("text_model."): v
            for k, v in comp[TEXT].items()
        }
        text.update({k.removeprefix(TEXT + "transformer.").removeprefix("text_model."): v
                     for k, v in loaded.extra.items() if k.startswith(TEXT + "transformer.")})  # fmt: skip
        save_safetensors(text, folder / "text_encoder" / "model.safetensors", meta)
        _write_json(folder / "text_encoder" / "config.json", text_config_to_hf(cfg.text))
    unet_json = keymaps.unet_config_to_diffusers(cfg.unet)
    unet_json["sample_size"] = cfg.size // cfg.vae.downsample
    _write_json(folder / "unet" / "config.json", unet_json)
    _write_json(folder / "vae" / "config.json", keymaps.vae_config_to_diffusers(cfg.vae))
    s = cfg.schedule
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(s.beta_schedule, s.beta_schedule),
        "prediction_type": "v_prediction" if s.prediction == "v" else "epsilon",
        "steps_offset": s.steps_offset, "set_alpha_to_one": s.set_alpha_to_one,
        "clip_sample": False,
    })  # fmt: skip
    if cfg.sdxl:
        _write_json(folder / "model_index.json", _sdxl_index(cfg))
        return
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


def _sdxl_parts(cfg: C.ModelConfig) -> list[tuple[str, str]]:
    """(weights folder, tokenizer folder) per encoder as diffusers lays out SDXL: the refiner's
    one encoder (bigG) is `text_encoder_2`."""
    both = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    return both if cfg.text_2 is not None else both[1:]


def _save_sdxl_text(loaded, sd: dict, folder: Path, meta: dict) -> None:
    """Each SDXL encoder as a transformers CLIPTextModel(WithProjection) folder, all layers kept
    (diffusers' SDXL pipelines take hidden_states[-2] and pool from the last), and its tokenizer."""
    from ember.models.text import text_config_to_hf

    cfg = loaded.config
    for i, ((part, tok), text_cfg, tokenizer) in enumerate(
        zip(_sdxl_parts(cfg), cfg.text_encoders(), loaded.tokenizers, strict=True)
    ):
        (folder / part).mkdir(parents=True, exist_ok=True)
        prefix = f"{EMBEDDERS}{i}."
        weights = {
            k[len(prefix) :].removeprefix("transformer.").removeprefix("text_model."): v
            for k, v in sd.items() if k.startswith(prefix)
        }  # fmt: skip
        save_safetensors(weights, folder / part / "model.safetensors", meta)
        hf = text_config_to_hf(dataclasses.replace(text_cfg, layer="last"))
        if text_cfg.projection_dim:
            hf |= {"projection_dim": text_cfg.projection_dim,
                   "architectures": ["CLIPTextModelWithProjection"]}  # fmt: skip
        _write_json(folder / part / "config.json", hf)
        tokenizer.to_transformers().save_pretrained(folder / tok)


def _sdxl_index(cfg: C.ModelConfig) -> dict:
    index = {
        "_class_name": "StableDiffusionXLPipeline" if cfg.text_2 is not None
        else "StableDiffusionXLImg2ImgPipeline",
        "_ember_config": json.loads(cfg.to_json()),
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None], "tokenizer": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "force_zeros_for_empty_prompt": True,
    }  # fmt: skip
    for part, tok in _sdxl_parts(cfg):
        index[part] = ["transformers", "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
    if cfg.text_2 is not None:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    else:
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "requires_aesthetics_score": True}  # fmt: skip
    return index


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
