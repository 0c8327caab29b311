"""LoRA, LyCORIS and DoRA add-ons: read from `.safetensors`, merged into a loaded model's weights.

One interface for every format: `read_lora(path) -> LoraFile` parses a file once (cached), and
`merge_loras(loaded, [(file, text_weight, unet_weight), ...]) -> MergedLoras` adds each update into
the weights in place (`W += weight * delta`, no per-step cost); `MergedLoras.remove()` copies the
saved originals back, so the base weights are bit-identical to a fresh load.

The updates' maths (LoRA, LoHa, LoKr, full, DoRA) is `ember.lora_deltas`.

Names: kohya/A1111 `lora_unet_<module with _>` in both the diffusers and the ldm layout, `lora_te_`;
diffusers/PEFT `unet.<module>` and `text_encoder.<module>` (`lora_A/B`, `lora.down/up`, the older
`processor.to_q_lora.down`). U-Net names are matched through `ember.keymaps`, so ldm and diffusers
layouts resolve to the same parameter.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember import keymaps
from ember.errors import EmberError
from ember.files import safetensors_data_sha256, sha256_file
from ember.lora_deltas import Adapter, apply_dora, compute_delta, dora_parts
from ember.safetensors_io import read_safetensors

UNET_PART, TEXT_PART = "unet", "text"
# SDXL's text encoders as kohya names them (`lora_te1_`, `lora_te2_`); diffusers names the first
# `text_encoder.` (TEXT_PART) and the second `text_encoder_2.`.
TEXT1_PART, TEXT2_PART = "text1", "text2"
_SDXL_TEXT_PARTS = (TEXT1_PART, TEXT2_PART)
_PICKLED = (".ckpt", ".pt", ".pth", ".bin")
_CACHE_SIZE = 8  # parsed files kept in memory (LoRAs are 10-200 MB each)

# Tensor-name endings -> the role of the tensor in its module's update. Longest first.
_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
    *((f".hada_{n}", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{n}", f"lokr_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
# diffusers' attention-processor LoRAs: `<attn>.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# Name prefixes -> (part, style). "kohya": module path with "_" for "."; "dot": dotted path.
_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("lora_unet_", UNET_PART, "kohya"),
    ("lora_te_", TEXT_PART, "kohya"),
    ("lora_te1_", TEXT1_PART, "kohya"),
    ("lora_te2_", TEXT2_PART, "kohya"),
    ("unet.", UNET_PART, "dot"),
    ("text_encoder.", TEXT_PART, "dot"),
    ("text_encoder_2.", TEXT2_PART, "dot"),
    ("model.diffusion_model.", UNET_PART, "dot"),
    ("diffusion_model.", UNET_PART, "dot"),
)
# Prefixes that only other architectures' LoRAs use -> what they are for.
_OTHER_ARCHITECTURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("te1.", "te2."), "SDXL (two text encoders)"),
    (("lora_te3_", "text_encoder_3.", "lora_unet_joint_blocks_", "transformer.joint_blocks."),
     "SD3"),
    (("lora_unet_double_blocks_", "lora_unet_single_blocks_", "diffusion_model.double_blocks.",
      "transformer.single_transformer_blocks.", "transformer.transformer_blocks."), "Flux"),
    (("lora_prior_unet_", "prior."), "Stable Cascade"),
)  # fmt: skip
# Cross-attention context width / text-encoder width -> the family that has it.
_CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
_TEXT_FAMILIES = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL"}


@dataclass(frozen=True)
class LoraFile:
    """A parsed add-on file; `read_lora` returns the same object while the file is unchanged."""

    path: str
    name: str  # file stem: what prompts and requests call it
    sha256: str
    a1111_hash: str  # A1111's `Lora hashes` entry: the tensor data's sha256, 12 hex digits
    adapters: tuple[Adapter, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Set when the names say the file is for another architecture (e.g. "SDXL (two text
    # encoders)"); such a file reads, so a folder can be listed, but never merges.
    other_architecture: str | None = None

    @property
    def parts(self) -> set[str]:
        return {a.part for a in self.adapters}


# ---------------------------------------------------------------------------------------------
# reading

_cache: OrderedDict[tuple, LoraFile] = OrderedDict()
_cache_lock = threading.Lock()


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA/LyCORIS `.safetensors` file; cached by (path, size, mtime).

    Raises EmberError when the file is missing, pickled, corrupt or holds no add-on tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"LoRA file not found: {path}")
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(stamp)
        if hit is not None:
            _cache.move_to_end(stamp)
            return hit
    _refuse_pickle(path)
    tensors, metadata = read_safetensors(path)
    other = other_architecture(tensors)
    adapters = () if other else _parse(tensors, metadata, path.name)
    digest, a1111 = sha256_file(path), safetensors_data_sha256(path)[:12]
    lora = LoraFile(str(path), path.stem, digest, a1111, adapters, metadata, other)
    with _cache_lock:
        _cache[stamp] = lora
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return lora


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file is an 8-byte header length, then its JSON header: "{". Only then may
    # its first byte be 0x80 (a length ending in 0x80), where a bare pickle starts with 0x80.
    # torch.save writes a zip ("PK").
    safetensors = len(head) == 9 and head[8:9] == b"{"
    pickled = head.startswith((b"PK\x03\x04", b"\x80")) and not safetensors
    if path.suffix.lower() in _PICKLED or pickled:
        raise EmberError(
            f"{path.name} is a pickled file, which can run arbitrary code when loaded; ember "
            f"reads LoRAs only as .safetensors. Convert it with: ember convert {path} "
            f"{path.with_suffix('.safetensors').name}"
        )


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of a tensor name; None when it is not an add-on tensor."""
    match = _PROCESSOR.match(key)
    if match:
        attn, proj, role = match.groups()
        return f"{attn}.{'to_out.0' if proj == 'to_out' else proj}", role
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _component_of(module: str) -> tuple[str, str, str] | None:
    """(part, style, module path without prefix); None for a name of no known part."""
    for prefix, part, style in _PREFIXES:
        if module.startswith(prefix):
            return part, style, module[len(prefix) :]
    if module.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        return UNET_PART, "dot", module  # unprefixed diffusers attention-processor files
    return None


def other_architecture(keys: Iterable[str]) -> str | None:
    """The architecture a LoRA is for when its names alone say it is not SD 1.x/2.x."""
    keys = list(keys)
    for prefixes, what in _OTHER_ARCHITECTURES:
        if any(k.startswith(prefixes) for k in keys):
            return what
    return None


def _parse(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], name: str):
    if not tensors:
        raise EmberError(f"{name}: the file holds no tensors")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, list[str]] = {}
    strays = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            strays.append(key)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = tensor
        keys.setdefault(module, []).append(key)
    if not groups:
        shown = ", ".join(strays[:5]) + (", ..." if len(strays) > 5 else "")
        raise EmberError(f"{name}: no LoRA/LyCORIS tensors in the file ({len(strays)}: {shown})")
    if strays:
        raise EmberError(f"{name}: {_listing('tensors that are not LoRA/LyCORIS weights', strays)}")
    peft = _peft_config(metadata, name)
    adapters = []
    unknown = []
    for module, roles in groups.items():
        where = _component_of(module)
        if where is None:
            unknown.extend(keys[module])
            continue
        part, style, path = where
        kind = _kind(roles, module, name)
        alpha, rslora = _alpha(roles, path, part, peft)
        if kind == "lora" and "magnitude" in roles and "dora_scale" in roles:
            raise EmberError(f"{name}: {module} has both a DoRA magnitude and a dora_scale")
        adapters.append(
            Adapter(part, style, path, kind, roles, alpha, rslora, tuple(sorted(keys[module])))
        )
    if unknown:
        what = "tensors of no U-Net or text encoder (lora_unet_, lora_te_, unet., text_encoder.)"
        raise EmberError(f"{name}: {_listing(what, unknown)}")
    return tuple(adapters)


_NEEDS = {
    "lora": ({"down", "up"}, {"mid", "alpha", "magnitude", "dora_scale"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
             {"hada_t1", "hada_t2", "alpha", "dora_scale"}),
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                     "lokr_t2", "alpha", "dora_scale"}),
    "full": ({"diff"}, {"diff_b", "alpha"}),
}  # fmt: skip


def _kind(roles: Mapping[str, torch.Tensor], module: str, name: str) -> str:
    if any(r.startswith("hada_") for r in roles):
        kind = "loha"
    elif any(r.startswith("lokr_") for r in roles):
        kind = "lokr"
    elif "diff" in roles or "diff_b" in roles:
        kind = "full"
    else:
        kind = "lora"
    required, optional = _NEEDS[kind]
    missing = required - roles.keys()
    if kind == "lokr":
        for side in ("w1", "w2"):
            if (
                f"lokr_{side}" not in roles
                and not {f"lokr_{side}_a", f"lokr_{side}_b"} <= roles.keys()
            ):
                missing.add(f"lokr_{side} (or lokr_{side}_a and lokr_{side}_b)")
    if kind == "loha" and ("hada_t1" in roles) != ("hada_t2" in roles):
        missing.add("hada_t1 and hada_t2 together")
    if "lokr_t2" in roles and not {"lokr_w2_a", "lokr_w2_b"} <= roles.keys():
        missing.add("lokr_w2_a and lokr_w2_b with lokr_t2")
    extra = roles.keys() - required - optional
    if missing or extra:
        what = ", ".join(sorted(missing)) + " missing" if missing else ""
        what += ("; " if what and extra else "") + (
            ", ".join(sorted(extra)) + " unexpected" if extra else ""
        )
        raise EmberError(f"{name}: {module} is an incomplete or mixed {kind} update ({what})")
    return kind


def _peft_config(metadata: Mapping[str, str], name: str) -> dict:
    """diffusers' `lora_adapter_metadata` (PEFT's LoraConfig per part), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise EmberError(f"{name}: unreadable lora_adapter_metadata (not JSON)") from None
    return config if isinstance(config, dict) else {}


def _alpha(roles, path: str, part: str, peft: dict) -> tuple[float | None, bool]:
    if "alpha" in roles:
        return float(roles["alpha"].float().item()), False
    prefix = {UNET_PART: "unet.", TEXT2_PART: "text_encoder_2."}.get(part, "text_encoder.")
    if prefix + "lora_alpha" not in peft:
        return None, False
    alpha = peft[prefix + "lora_alpha"]
    # PEFT matches pattern keys against the end of the module name (peft.tuners.tuners_utils).
    for pattern, value in (peft.get(prefix + "alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    rank = peft.get(prefix + "r")
    for pattern, value in (peft.get(prefix + "rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            rank = value
            break
    stored = roles["down"].shape[0] if "down" in roles else rank
    if rank is not None and stored != rank:
        raise EmberError(f"{path}: rank {stored} differs from lora_adapter_metadata's r={rank}")
    return float(alpha), bool(peft.get(prefix + "use_rslora", False))


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {title}: {shown}"


# ---------------------------------------------------------------------------------------------
# matching names to the model's parameters


@dataclass(frozen=True)
class _Index:
    """(part, style, name) -> the module's path in `LatentDiffusion` (ldm names)."""

    modules: dict[tuple[str, str, str], str]


_indexes: weakref.WeakKeyDictionary[torch.nn.Module, _Index] = weakref.WeakKeyDictionary()


def _index(model: torch.nn.Module, unet_cfg) -> _Index:
    """Every module with a weight, under each name a LoRA may give it; cached per model."""
    hit = _indexes.get(model)
    if hit is not None:
        return hit
    modules: dict[tuple[str, str, str], str] = {}
    unet_weights: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if path.startswith(keymaps.UNET):
            local = path[len(keymaps.UNET) :]
            unet_weights[local + ".weight"] = weight
            _add(modules, UNET_PART, local, path)
        else:
            for prefix, parts in _text_prefixes(unet_cfg, model):
                if path.startswith(prefix):
                    local = path[len(prefix) :]
                    for part in parts:
                        _add(modules, part, local, path)
                        if local.startswith("text_model."):  # transformers 5 drops the level
                            _add(modules, part, local[len("text_model.") :], path)
    # The diffusers layout of the same U-Net modules, from the one ldm <-> diffusers table.
    by_id = {id(w): k for k, w in unet_weights.items()}
    diffusers = keymaps.unet_ldm_to_diffusers(unet_weights, unet_cfg)
    for key, weight in diffusers.items():
        ldm = by_id[id(weight)][: -len(".weight")]
        _add(modules, UNET_PART, key[: -len(".weight")], keymaps.UNET + ldm)
    index = _Index(modules)
    _indexes[model] = index  # weakly: an unloaded model is not kept alive by its index
    return index


def _text_prefixes(unet_cfg, model: torch.nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(module-path prefix, the LoRA parts naming it) of each text encoder: SD's one; SDXL's
    CLIP-L (`lora_te1_`, `text_encoder.`) and bigG (`lora_te2_`, `text_encoder_2.`)."""
    if not unet_cfg.adm_in_channels:
        return [(keymaps.TEXT + "transformer.", (TEXT_PART,))]
    from ember.sdxl_files import EMBEDDERS

    count = len(model.text_encoders)
    if count == 1:  # the refiner: bigG alone
        return [(f"{EMBEDDERS}0.transformer.", (TEXT2_PART,))]
    return [
        (f"{EMBEDDERS}0.transformer.", (TEXT_PART, TEXT1_PART)),
        (f"{EMBEDDERS}1.transformer.", (TEXT2_PART,)),
    ]


def _add(modules: dict, part: str, local: str, path: str) -> None:
    modules.setdefault((part, "dot", local), path)
    modules.setdefault((part, "kohya", local.replace(".", "_")), path)


def _family(width: int, table: Mapping[int, str]) -> str:
    return f" ({table[width]})" if width in table else ""


def _check_architecture(lora: LoraFile, cfg) -> None:
    """Name the architecture a LoRA is for when its names or widths are not the model's."""
    if lora.other_architecture:
        raise EmberError(
            f"{lora.name} is a LoRA for {lora.other_architecture}; the model {cfg.name!r} is "
            f"SD 1.x/2.x-shaped"
        )
    if lora.parts & set(_SDXL_TEXT_PARTS) and not cfg.sdxl:
        raise EmberError(
            f"{lora.name} is a LoRA for SDXL (two text encoders); the model {cfg.name!r} is "
            f"SD 1.x/2.x-shaped"
        )
    encoders = {TEXT_PART: cfg.text, TEXT1_PART: cfg.text, TEXT2_PART: cfg.text_2 or cfg.text}
    for adapter in lora.adapters:
        if adapter.kind != "lora":
            continue
        width = adapter.tensors["down"].flatten(1).shape[1]
        name = adapter.module.replace("_", ".")
        if adapter.part == UNET_PART and name.endswith(("attn2.to.k", "attn2.to.v")):
            what, ours, table = "cross-attention", cfg.unet.context_dim, _CONTEXT_FAMILIES
        elif adapter.part in encoders and name.endswith("self.attn.q.proj"):
            what, ours, table = "text-encoder", encoders[adapter.part].hidden_size, _TEXT_FAMILIES
        else:
            continue
        if width != ours:
            family = table.get(width, f"a model of {what} width {width}")
            raise EmberError(
                f"{lora.name} is a LoRA for {family} ({what} width {width}); the model "
                f"{cfg.name!r} has {what} width {ours}{_family(ours, table)}"
            )


# ---------------------------------------------------------------------------------------------
# merging


@dataclass
class _Step:
    adapter: Adapter
    weight: float
    path: str  # module path in the model
    dora: tuple[torch.Tensor, bool] | None


class MergedLoras:
    """LoRAs merged into a model's weights; `remove()` restores the originals bit-identically."""

    def __init__(self, params: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor],
                 selections: list[tuple[LoraFile, float, float]],
                 on_remove: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self._params = params
        self._originals = originals
        self.selections = list(selections)
        self._on_remove = on_remove

    @property
    def touched(self) -> list[str]:
        """Names of the parameters the merge changed."""
        return list(self._originals)

    def remove(self) -> None:
        """Copy every saved original back (a no-op the second time)."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self._params[name].copy_(original)
        if self._originals:
            self._on_remove()
        self._originals = {}
        self.selections = []

    def __enter__(self) -> MergedLoras:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def merge_loras(loaded, selections: list[tuple[LoraFile, float, float]]) -> MergedLoras:
    """Merge each (file, text_encoder_weight, unet_weight) into `loaded.model`, in order.

    Every name, width and shape is checked before any weight changes; an update is then added in
    fp32 and cast to the parameter's dtype. The originals of touched parameters are kept for
    `MergedLoras.remove()`.
    """
    model = loaded.model
    index = _index(model, loaded.config.unet)
    params = dict(model.named_parameters())
    steps: list[_Step] = []
    for lora, text_weight, unet_weight in selections:
        _check_architecture(lora, loaded.config)
        unknown: list[str] = []
        for adapter in lora.adapters:
            path = index.modules.get((adapter.part, adapter.style, adapter.module))
            if path is None:
                unknown.extend(adapter.keys)
                continue
            target = params[path + ".weight"]
            # Shapes only: the same code on meta tensors finds every mismatch without the maths.
            meta = {k: v.to("meta") for k, v in adapter.tensors.items()}
            compute_delta(dataclasses.replace(adapter, tensors=meta), target.shape)
            if "diff_b" in adapter.tensors:
                bias = params.get(path + ".bias")
                if bias is None or bias.shape != adapter.tensors["diff_b"].shape:
                    raise EmberError(f"{adapter.keys[0]}: diff_b does not fit the module's bias")
            dora = dora_parts(adapter, target.shape)
            weight = unet_weight if adapter.part == UNET_PART else text_weight
            steps.append(_Step(adapter, float(weight), path, dora))
        if unknown:
            raise EmberError(
                f"{lora.name}: {_listing('keys match no module of the model', sorted(unknown))}"
            )
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for step in steps:
            if step.weight == 0.0:
                continue
            name = step.path + ".weight"
            param = params[name]
            originals.setdefault(name, param.detach().clone())
            delta = compute_delta(step.adapter, param.shape)  # fp32
            if step.dora is not None:
                delta = apply_dora(param.float(), delta, *step.dora)
            # W + w * delta in fp32 (a bf16 W is promoted), rounded once to the weight's dtype:
            # one fp32 temporary per weight, not three.
            param.copy_(torch.add(param, delta, alpha=step.weight))
            if "diff_b" in step.adapter.tensors:
                bias_name = step.path + ".bias"
                bias = params[bias_name]
                originals.setdefault(bias_name, bias.detach().clone())
                diff_b = step.adapter.tensors["diff_b"].float()
                bias.copy_((bias.float() + step.weight * diff_b).to(bias.dtype))
    changed = {id(s.adapter) for s in steps if s.adapter.part == UNET_PART and s.weight != 0.0}
    previous = loaded.unet_adapters
    loaded.unet_adapters = previous + tuple(
        f"{lora.sha256}:{unet_weight}"
        for lora, _, unet_weight in selections
        if any(id(a) in changed for a in lora.adapters)
    )
    return MergedLoras(
        params, originals, selections, lambda: setattr(loaded, "unet_adapters", previous)
    )
