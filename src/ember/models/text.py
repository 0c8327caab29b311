"""Frozen text encoders: CLIP (SD 1.x), OpenCLIP (SD 2.x) and MiniLM (ember-small); their
tokenizers are `ember.models.tokenizer`.

Contract (docs/architecture.md): `TextEncoder.forward(ids (B, L) long, clip_skip=1) -> (B, L, D)`.

Both encoders are plain torch under transformers' parameter names (`models/clip.py`,
`models/bert.py`), so running a model never imports `transformers` (about 4 s of start-up);
exporting a diffusers folder still uses it for the config files.

State-dict names: SD 1.x single files hold the text model as
`cond_stage_model.transformer.text_model.*` (the transformers 4 `CLIPTextModel` layout).
transformers 5 dropped the `text_model` level from `CLIPTextModel`, so `ClipTextEncoder.transformer`
is a small holder whose `text_model` is the `ClipText`; the keys below the encoder read
`transformer.text_model.*` and SD 1.x files load without renaming. SD 2.x files store OpenCLIP
names (`cond_stage_model.model.*`); `openclip_to_hf` / `hf_to_openclip` convert losslessly.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.config import MINILM, TextConfig
from ember.errors import EmberError
from ember.models.bert import BERT_LAYER_NORM_EPS, BERT_MAX_POSITIONS, BERT_TYPE_VOCAB, Bert
from ember.models.clip import ClipText
from ember.models.tokenizer import minilm_path

# ---------------------------------------------------------------------------------------------
# Encoders


def clip_text_config(cfg: TextConfig, num_layers: int | None = None) -> Any:
    """The transformers `CLIPTextConfig` of `cfg` (layer-norm eps 1e-5, no dropout, as CLIP)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers if num_layers is None else num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


# The `BertConfig` fields that shape the network (dropout and pad id do not): `load_pretrained`
# checks them against the model folder's config.json.
_BERT_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
)


def bert_fields(cfg: TextConfig) -> dict[str, Any]:
    """The transformers `BertConfig` fields of `cfg`, as plain values (no `transformers` import)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": BERT_MAX_POSITIONS,
        "type_vocab_size": BERT_TYPE_VOCAB,
        "layer_norm_eps": BERT_LAYER_NORM_EPS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": cfg.pad_token_id,
    }


def bert_config(cfg: TextConfig) -> Any:
    """The transformers `BertConfig` of `cfg` (diffusers export, tests)."""
    from transformers import BertConfig

    return BertConfig(**bert_fields(cfg))


class TextEncoder(nn.Module):
    """Base of ember's text encoders: `forward(ids (B, L) long, clip_skip=1) -> (B, L, D)`."""

    cfg: TextConfig

    def token_embedding(self) -> nn.Embedding:
        """The token-embedding table (one row per token id); add-ons such as textual-inversion
        embeddings swap its weight for a longer one and back."""
        raise NotImplementedError

    def _check(self, ids: torch.Tensor, clip_skip: int, depth: int) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"token ids must be (B, L), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"{ids.shape[1]} tokens; at most {self.cfg.max_length} per window")
        rows = self.token_embedding().weight.shape[0]
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < rows:
            bad = int(ids.max()) if int(ids.max()) >= rows else int(ids.min())
            raise EmberError(
                f"token id {bad} is outside the text encoder's {rows}-row embedding table: "
                "the tokenizer does not match this text encoder"
            )
        if not 1 <= clip_skip <= depth:
            raise ValueError(f"clip_skip {clip_skip} outside [1, {depth}]")
        # Positions are passed explicitly: the models' non-persistent position_ids buffers are not
        # in any state dict and stay on the meta device after `load_state_dict(assign=True)`.
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


class _TextModelHolder(nn.Module):
    """Restores the `text_model.` level transformers 5 removed, so keys match SD 1.x files."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model


class ClipTextEncoder(TextEncoder):
    """CLIP / OpenCLIP text transformer (`models/clip.py`, transformers' `CLIPTextModel` in plain
    torch), causal mask only.

    Layer choice follows ldm and A1111: `layer="last"` returns `last_hidden_state` (final layer
    norm applied); `clip_skip=k > 1` takes `hidden_states[-k]` and applies the final layer norm
    (A1111 `sd_hijack_clip.py`, "CLIP_stop_at_last_layers"); `layer="penultimate"` (SD 2.x,
    ldm `FrozenOpenCLIPEmbedder(layer="penultimate")`) starts one layer earlier, clip_skip on top.
    No attention mask is passed: SD encodes padding positions too, and only the causal mask applies.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.kind != "clip":
            raise ValueError(f"ClipTextEncoder needs kind='clip', got {cfg.kind!r}")
        self.cfg = cfg
        self.transformer = _TextModelHolder(ClipText(cfg))
        if cfg.projection_dim:
            # OpenCLIP's `text_projection` (D, P) parameter, stored as transformers' (P, D) Linear.
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        return self.encode(ids, clip_skip)[0]

    def encode(
        self, ids: torch.Tensor, clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states (B, L, D), pooled (B, projection_dim) or None without a projection).

        The pooled embedding is SDXL's (sgm `FrozenOpenCLIPEmbedder2`, transformers
        `CLIPTextModelWithProjection.text_embeds`): the final layer's normed state at the first
        end-of-text token, projected; clip skip does not change it.
        """
        position_ids = self._check(ids, clip_skip, self.cfg.depth)
        skip = clip_skip + self.cfg.num_layers - self.cfg.depth
        model, n = self.transformer.text_model, self.cfg.num_layers
        # The pooled embedding needs every layer; the context only those up to its own.
        states = model(ids, position_ids, n if self.cfg.projection_dim else n + 1 - skip)
        context = states[n + 1 - skip]
        if skip == 1 or self.cfg.final_norm:
            context = model.final_layer_norm(context)
        if not self.cfg.projection_dim:
            return context, None
        eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # (B,) first end-of-text
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = model.final_layer_norm(states[-1][rows, eos])
        return context, self.text_projection(last)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer BERT, Wang et al. 2020; sentence-transformers) per-token states.

    Padding is masked out of attention, as BERT and sentence-transformers use it; `clip_skip=k`
    returns the output of the k-th layer from the end (BERT is post-norm: no extra norm needed).
    `layer="penultimate"` starts one layer earlier (layer 5 of 6), clip_skip on top: the last layer
    is tuned for mean-pooled sentence similarity and weakens word order and attribute binding.
    Weights are random until `load_pretrained()` (or a checkpoint) fills them.
    """

    def __init__(self, cfg: TextConfig = MINILM) -> None:
        super().__init__()
        if cfg.kind != "minilm":
            raise ValueError(f"MiniLMTextEncoder needs kind='minilm', got {cfg.kind!r}")
        self.cfg = cfg
        self.transformer = Bert(cfg)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.embeddings["word_embeddings"]

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        position_ids = self._check(ids, clip_skip, self.cfg.depth)
        keep = (ids != self.cfg.pad_token_id)[:, None, None, :]  # (B, 1, 1, L)
        return self.transformer(ids, position_ids, keep, self.cfg.depth - clip_skip + 1)

    def load_pretrained(self, folder: str | Path | None = None) -> MiniLMTextEncoder:
        """Fill the weights from all-MiniLM-L6-v2's `model.safetensors` (offline, strict).

        An encoder built on the meta device takes the file's tensors as they are (`assign=True`).
        """
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else minilm_path()
        theirs = json.loads((folder / "config.json").read_text())
        ours = bert_fields(self.cfg)
        for key in _BERT_ARCH_KEYS:
            if theirs.get(key) != ours[key]:
                raise ValueError(f"{folder}: {key}={theirs.get(key)}, config expects {ours[key]}")
        sd = load_file(str(folder / "model.safetensors"))
        # The pooler is unused (we return token states); position_ids is derived, not learned.
        sd = {
            k: v
            for k, v in sd.items()
            if not k.startswith("pooler.") and k != "embeddings.position_ids"
        }
        on_meta = any(p.is_meta for p in self.parameters())
        self.transformer.load_state_dict(sd, strict=True, assign=on_meta)
        return self


def load_minilm_pretrained(cfg: TextConfig = MINILM) -> MiniLMTextEncoder:
    """A `MiniLMTextEncoder` with the pretrained all-MiniLM-L6-v2 weights, in eval mode."""
    with torch.device("meta"):  # no random initialisation only to overwrite it
        encoder = MiniLMTextEncoder(cfg)
    return encoder.load_pretrained().eval()


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The (randomly initialised) encoder of `cfg`; weights come from a checkpoint or
    `load_minilm_pretrained`. Works under `torch.device("meta")`."""
    if cfg.kind == "clip":
        return ClipTextEncoder(cfg)
    if cfg.kind == "minilm":
        return MiniLMTextEncoder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose 'clip' or 'minilm'")


# ---------------------------------------------------------------------------------------------
# OpenCLIP (SD 2.x single files) <-> transformers names

HF_PREFIX = "transformer.text_model."
# OpenCLIP tensors that CLIPTextModel has no place for; they ride along under their own names.
OPENCLIP_EXTRA_KEYS = ("text_projection", "logit_scale")
HF_POSITION_IDS_KEY = HF_PREFIX + "embeddings.position_ids"

_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# `attn.in_proj_weight` joins its suffix with "_", every other parameter with ".".
_OPENCLIP_BLOCK_RE = re.compile(
    r"transformer\.resblocks\.(\d+)\.(?:(attn\.in_proj)_|(.+)\.)(weight|bias)"
)
_HF_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_HF_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_encoder(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower names -> a `ClipTextEncoder` with a projection (SDXL's bigG): as
    `openclip_to_hf`, with `text_projection` (D, P) as the Linear's (P, D) weight; `logit_scale`
    (unused) is dropped. Unknown keys raise `ValueError`."""
    out = openclip_to_hf({k: v for k, v in sd.items() if k != "logit_scale"})
    if "text_projection" in out:
        out["text_projection.weight"] = out.pop("text_projection").t().contiguous()
    return out


def encoder_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `openclip_to_encoder` (without `logit_scale`)."""
    sd = dict(sd)
    if "text_projection.weight" in sd:
        sd["text_projection"] = sd.pop("text_projection.weight").t().contiguous()
    return hf_to_openclip(sd)


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower names -> `ClipTextEncoder` names (`transformer.text_model.*`).

    Input keys are relative to `cond_stage_model.model.` (ldm `FrozenOpenCLIPEmbedder`); the fused
    `attn.in_proj_{weight,bias}` (rows q, k, v, as `nn.MultiheadAttention`) is split into
    `q_proj`/`k_proj`/`v_proj`. `text_projection` and `logit_scale` are returned unchanged under
    their own names (no `transformer.` prefix): pop them before `load_state_dict` and hand them back
    to `hf_to_openclip` to write an identical file. Unknown keys raise `ValueError`.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        block = _OPENCLIP_BLOCK_RE.fullmatch(key)
        if key in OPENCLIP_EXTRA_KEYS:
            out[key] = value
        elif key in _OPENCLIP_TOP:
            out[HF_PREFIX + _OPENCLIP_TOP[key]] = value
        elif block and block[2]:
            prefix = f"{HF_PREFIX}encoder.layers.{block[1]}.self_attn."
            # clone: safetensors refuses to save views that share one storage.
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{name}_proj.{block[4]}"] = part.clone()
        elif block and block[3] in _OPENCLIP_BLOCK:
            hf = _OPENCLIP_BLOCK[block[3]]
            out[f"{HF_PREFIX}encoder.layers.{block[1]}.{hf}.{block[4]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in an OpenCLIP text model: {sorted(unknown)}")
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `openclip_to_hf`: `transformer.text_model.*` (+ extras) -> OpenCLIP names.

    q/k/v are concatenated back into `attn.in_proj_*`; `position_ids`, derived and absent from
    OpenCLIP, is dropped. A round trip returns tensors equal to the originals.
    """
    top = {hf: oc for oc, hf in _OPENCLIP_TOP.items()}
    block = {hf: oc for oc, hf in _OPENCLIP_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in OPENCLIP_EXTRA_KEYS:
            out[key] = value
            continue
        if key == HF_POSITION_IDS_KEY:
            continue
        rel = key.removeprefix(HF_PREFIX) if key.startswith(HF_PREFIX) else None
        layer = _HF_LAYER_RE.fullmatch(rel) if rel is not None else None
        if rel in top:
            out[top[rel]] = value
        elif layer and layer[2] in _HF_QKV:
            qkv.setdefault((layer[1], layer[3]), {})[_HF_QKV[layer[2]]] = value
        elif layer and layer[2] in block:
            out[f"transformer.resblocks.{layer[1]}.{block[layer[2]]}.{layer[3]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in a CLIP text model: {sorted(unknown)}")
    for (index, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {index} {kind}: q/k/v incomplete, found {sorted(parts)}")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


# ---------------------------------------------------------------------------------------------
# diffusers folders (text_encoder/config.json)


def text_config_from_hf(config: dict[str, Any], *, pad_token_id: int | None = None) -> TextConfig:
    """`TextConfig` from a diffusers `text_encoder/config.json` (CLIPTextModel or BertModel).

    The folder is read literally: an SD 2.x folder holds 23 layers and uses the last one, which
    computes what a 24-layer `layer="penultimate"` encoder does. The pad id lives in the tokenizer,
    not in this file (which carries the legacy 1/0/2 ids); pass it, or get 0 for OpenCLIP-trained
    models (`hidden_act="gelu"`) and 49407 for OpenAI CLIP (`quick_gelu`).
    """
    if config.get("model_type") == "bert":
        return TextConfig(
            kind="minilm",
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            max_length=MINILM.max_length,
            hidden_act=config.get("hidden_act", "gelu"),
            pad_token_id=config.get("pad_token_id", 0) if pad_token_id is None else pad_token_id,
            bos_token_id=MINILM.bos_token_id,
            eos_token_id=MINILM.eos_token_id,
        )
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"unsupported text encoder model_type {config.get('model_type')!r}")
    act = config.get("hidden_act", "quick_gelu")
    return TextConfig(
        kind="clip",
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        max_length=config.get("max_position_embeddings", 77),
        hidden_act=act,
        layer="last",
        pad_token_id=(0 if act == "gelu" else 49407) if pad_token_id is None else pad_token_id,
    )


def text_config_to_hf(cfg: TextConfig) -> dict[str, Any]:
    """diffusers `text_encoder/config.json` for `cfg`.

    For `layer="penultimate"` it describes `num_layers - 1` layers (Stability's SD 2.x folders do
    the same, since diffusers pipelines take `last_hidden_state`), and for a layer number k, k
    layers: when writing such a folder, drop the blocks above (`text_model.encoder.layers.{k}.*` on).
    """
    if cfg.kind == "minilm":
        config = bert_config(dataclasses.replace(cfg, num_layers=cfg.depth, layer="last")).to_dict()
        config["architectures"] = ["BertModel"]
        return config
    config = clip_text_config(cfg, num_layers=cfg.depth).to_dict()
    config["architectures"] = ["CLIPTextModel"]
    return config
