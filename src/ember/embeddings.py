"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors named in a prompt.

A1111's semantics (behaviour reproduced, code written afresh; stable-diffusion-webui
`modules/textual_inversion/textual_inversion.py`, `modules/sd_hijack_clip.py`): an embedding is
named by its file's stem; wherever a prompt's tokens contain the tokens of that name, all the
embedding's vectors take their place (one token position each), with the prompt's emphasis.
Embeddings whose width differs from the text encoder's are skipped (A1111 lists them as skipped);
naming one in a prompt is an error here rather than a silent no-op.

Files: A1111 `.pt` (`string_to_param`, read with `torch.load(weights_only=True)`: no code runs),
`.safetensors` with `emb_params` (A1111) or a single tensor (diffusers' `learned_embeds`, keyed by
its token), and diffusers' `learned_embeds.bin` (a pickle, read as the `.pt`).

Applying follows diffusers' `load_textual_inversion`: the vectors become new rows of the text
encoder's token-embedding table and the tokenizer encodes the name to their ids, so prompts go
through the ordinary path (`ember.prompts`). `AppliedEmbeddings.remove()` puts the original table
back (the same tensor: bit-identical) and forgets the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.files import sha256_file

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_SDXL_KEYS = ("clip_g", "clip_l")


@dataclass(frozen=True)
class Embedding:
    """One embedding file: `vectors` (n_vectors, width) in float32."""

    name: str
    path: str
    sha256: str  # of the whole file
    a1111_hash: str  # the first 12 hex digits A1111 writes in "TI hashes"
    vectors: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def find_embeddings(folder: str | Path) -> dict[str, Path]:
    """Embedding files under `folder` (subfolders too, as A1111 walks them) by name (file stem).

    Sorted by path; where two files share a stem the first is kept. Hidden and empty files are
    skipped; a missing folder has none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if (
            path.suffix.lower() in EMBEDDING_SUFFIXES
            and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            and path.stat().st_size > 0
        ):
            found.setdefault(path.stem, path)
    return found


def read_embedding(path: str | Path) -> Embedding:
    """Read one embedding file; EmberError (one line) for anything unreadable or of another layout."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmberError(
            f"{path.name}: not an embedding file; expected {', '.join(EMBEDDING_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EmberError(f"embedding {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is bad input
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EmberError(f"{path.name}: unreadable embedding file ({reason})") from None
    vectors = _vectors_of(data, path.name)
    sha = sha256_file(path)
    # A1111 hashes the whole file for every format (`hashes.sha256(path, "textual_inversion/...")`).
    return Embedding(path.stem, str(path), sha, sha[:12], vectors)


def _vectors_of(data: object, name: str) -> torch.Tensor:
    """The (n, width) vectors of a loaded file, by A1111's `create_embedding_from_data` layouts."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1:
            raise EmberError(f"{name}: string_to_param holds {len(tensors)} terms; expected one")
        vec = tensors[0]
    elif isinstance(data, dict) and "emb_params" in data:  # A1111 .safetensors
        vec = data["emb_params"]
    elif isinstance(data, dict) and all(k in data for k in _SDXL_KEYS):
        raise EmberError(
            f"{name} is an SDXL embedding (clip_g/clip_l); ember's models take SD 1.x/2.x ones"
        )
    elif isinstance(data, dict) and len(data) == 1:  # diffusers learned_embeds: {token: tensor}
        vec = next(iter(data.values()))
    elif isinstance(data, torch.Tensor):
        vec = data
    else:
        keys = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        raise EmberError(
            f"{name}: not a textual-inversion embedding (found {keys}); expected string_to_param "
            "(A1111 .pt), emb_params or a single tensor"
        )
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point():
        raise EmberError(f"{name}: the embedding is not a floating-point tensor")
    if vec.ndim == 1:  # diffusers stores one vector as (width,)
        vec = vec[None]
    if vec.ndim != 2 or 0 in vec.shape:
        raise EmberError(
            f"{name}: embedding of shape {tuple(vec.shape)}; expected (vectors, width)"
        )
    if not torch.isfinite(vec).all():
        raise EmberError(f"{name}: the embedding holds NaN or infinite values")
    return vec.detach().to(torch.float32).contiguous().clone()


def read_embeddings(folder: str | Path) -> tuple[list[Embedding], dict[str, str]]:
    """Every embedding in `folder` (`find_embeddings`), and name -> error for those unreadable,
    which a folder of downloads may hold beside good ones (A1111 logs them and goes on)."""
    good, bad = [], {}
    for name, path in find_embeddings(folder).items():
        try:
            good.append(read_embedding(path))
        except EmberError as exc:
            bad[name] = str(exc)
    return good, bad


@dataclass
class AppliedEmbeddings:
    """Embeddings added to a loaded model; `remove()` undoes it exactly."""

    embeddings: dict[str, Embedding]  # applied, by name
    skipped: dict[str, str]  # name -> why (width)
    _tokenizer: object = field(repr=False)
    _table: torch.nn.Embedding = field(repr=False)
    _weight_before: torch.nn.Parameter = field(repr=False)
    _weight_after: torch.nn.Parameter = field(repr=False)
    _patterns: dict[tuple[int, ...], str] = field(repr=False)  # name's plain ids -> name
    _removed: bool = field(default=False, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.embeddings)

    def remove(self) -> None:
        """Restore the tokenizer and the encoder's table as they were (the same tensor)."""
        if self._removed:
            return
        if self._table.weight is not self._weight_after:
            raise RuntimeError("embeddings applied later must be removed first")
        self._table.weight = self._weight_before
        self._table.num_embeddings = self._weight_before.shape[0]
        for name in self.embeddings:
            self._tokenizer.remove_word(name)
        self._removed = True

    def hashes(self, names: list[str]) -> str:
        """A1111's infotext value for `TI hashes`: "name: hash12, name2: hash12" (quote it when
        writing the infotext, as A1111 does for values with commas or colons)."""
        return ", ".join(f"{_infotext_name(n)}: {self.embeddings[n].a1111_hash}" for n in names)


def _infotext_name(name: str) -> str:
    # A1111 replaces the separators of the list in names.
    return name.replace(":", "").replace(",", "")


def apply_embeddings(
    loaded, embeddings: list[Embedding], unreadable: dict[str, str] | None = None
) -> AppliedEmbeddings:
    """Add `embeddings` to `loaded` (a `checkpoints.LoadedModel`): each becomes `n_vectors` new
    rows of the text encoder's token table and its name encodes to their ids.

    Embeddings whose width is not the encoder's are left out and listed in `skipped`. A name that
    tokenises as an earlier one does is skipped too (A1111 keeps one of the two as well). The
    `unreadable` files of the folder (name -> why) are listed in `skipped` as well, so a prompt
    that names one is an error rather than its name read as words.
    """
    tokenizer = loaded.tokenizer
    table = loaded.model.text_encoders[0].token_embedding()
    before = table.weight
    rows, width = before.shape
    taken = _patterns_of(tokenizer)
    kept: dict[str, Embedding] = {}
    skipped: dict[str, str] = {}
    patterns: dict[tuple[int, ...], str] = {}
    new_rows: list[torch.Tensor] = []
    for emb in embeddings:
        pattern = tuple(tokenizer.encode_plain(emb.name))
        if not pattern or emb.name in kept or pattern in patterns or pattern in taken:
            skipped[emb.name] = f"embedding {emb.name}: its name is empty or already taken"
            continue
        patterns[pattern] = emb.name
        if loaded.config.sdxl:
            skipped[emb.name] = f"embedding {emb.name}: embeddings for SDXL are not supported yet"
            continue
        if emb.width != width:
            skipped[emb.name] = (
                f"embedding {emb.name} is {emb.width} wide; this model's text encoder takes "
                f"{width}-wide embeddings"
            )
            continue
        ids = list(range(rows, rows + emb.vectors.shape[0]))
        rows += len(ids)
        tokenizer.add_word(emb.name, ids)
        kept[emb.name] = emb
        new_rows.append(emb.vectors)
    for name, why in (unreadable or {}).items():
        pattern = tuple(tokenizer.encode_plain(name))
        if pattern and pattern not in patterns and pattern not in taken:
            patterns[pattern] = name
            skipped[name] = f"embedding {name} cannot be used: {why}"
    after = before
    if new_rows:
        extra = torch.cat(new_rows).to(device=before.device, dtype=before.dtype)
        after = torch.nn.Parameter(torch.cat([before.detach(), extra]), requires_grad=False)
        table.weight = after
        table.num_embeddings = after.shape[0]
    return AppliedEmbeddings(kept, skipped, tokenizer, table, before, after, patterns)


def _patterns_of(tokenizer) -> set[tuple[int, ...]]:
    """The token runs of words added to `tokenizer` earlier (by another `apply_embeddings`)."""
    return {tuple(tokenizer.encode_plain(name)) for name in tokenizer.added_words}


def embeddings_used(text: str, applied: AppliedEmbeddings) -> list[str]:
    """Names of the applied embeddings a prompt uses, in order of first use (for `TI hashes`).

    The prompt is read as the encoder reads it: extra-network tags dropped, each emphasis run
    tokenised on its own. Naming a skipped embedding (e.g. of another width) is an EmberError.
    """
    from ember.models.tokenizer import find_words
    from ember.prompts import BREAK, BREAK_WEIGHT, parse_prompt_attention, strip_extra_networks

    used: list[str] = []
    for run, weight in parse_prompt_attention(strip_extra_networks(text)):
        if run == BREAK and weight == BREAK_WEIGHT:
            continue
        for item in find_words(applied._tokenizer.encode_plain(run), applied._patterns):
            if not isinstance(item, tuple):
                continue
            name = applied._patterns[item]
            if name in applied.skipped:
                raise EmberError(applied.skipped[name])
            if name not in used:
                used.append(name)
    return used
