"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors named in a prompt.

A1111's semantics (behaviour reproduced, code written afresh; stable-diffusion-webui
`modules/textual_inversion/textual_inversion.py`, `modules/sd_hijack_clip.py`): an embedding is
named by its file's stem; wherever a prompt's tokens contain the tokens of that name, all the
embedding's vectors take their place (one token position each), with the prompt's emphasis.
Embeddings that do not fit the model's text encoders are skipped (A1111 lists them as skipped);
naming one in a prompt is an error here rather than a silent no-op.

Files: A1111 `.pt` (`string_to_param`, read with `torch.load(weights_only=True)`: no code runs),
`.safetensors` with `emb_params` (A1111) or a single tensor (diffusers' `learned_embeds`, keyed by
its token), and diffusers' `learned_embeds.bin` (a pickle, read as the `.pt`). An SDXL embedding
holds one tensor per text encoder, `clip_l` (n, 768) and `clip_g` (n, 1280): A1111's
`textual_inversion_key` gives CLIP ViT-L the first and OpenCLIP bigG the second, as diffusers'
`load_textual_inversion(state_dict["clip_l"], text_encoder=pipe.text_encoder, ...)` and
`(state_dict["clip_g"], text_encoder=pipe.text_encoder_2, ...)` do. Given the SDXL refiner (bigG
only), `apply_embeddings` adds `clip_g` (ComfyUI's rule); the service applies the embeddings folder
to the base model alone, so the refiner reads their names as words, as in A1111 (whose refiner, 1280
wide, skips 2048-wide SDXL embeddings).

Applying follows diffusers' `load_textual_inversion`: the vectors become new rows of each text
encoder's token-embedding table and each tokenizer encodes the name to its encoder's new ids, so
prompts go through the ordinary path (`ember.prompts`, `ember.conditioning`).
`AppliedEmbeddings.remove()` puts every original table back (the same tensors: bit-identical) and
forgets the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.files import sha256_file

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
# The part of an embedding each text encoder takes: SDXL files hold `clip_l` (CLIP ViT-L) and
# `clip_g` (OpenCLIP bigG); SD 1.x/2.x files one tensor for their one encoder.
CLIP_L, CLIP_G, SINGLE = "clip_l", "clip_g", "single"


@dataclass(frozen=True)
class Embedding:
    """One embedding file: `vectors` maps each part (`SINGLE`, or `CLIP_L` and `CLIP_G` for an
    SDXL file) to its (n_vectors, width) float32 tensor; every part has the same n_vectors."""

    name: str
    path: str
    sha256: str  # of the whole file
    a1111_hash: str  # the first 12 hex digits A1111 writes in "TI hashes"
    vectors: dict[str, torch.Tensor]

    @property
    def n_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {part: int(vec.shape[1]) for part, vec in self.vectors.items()}


def describe_widths(widths: dict[str, int]) -> str:
    """A kind of embedding and its widths, for messages: "SD 1.x/2.x, 768 wide" or
    "SDXL (clip_l 768, clip_g 1280 wide)"."""
    if set(widths) == {SINGLE}:
        return f"SD 1.x/2.x, {widths[SINGLE]} wide"
    return "SDXL (" + ", ".join(f"{part} {width}" for part, width in widths.items()) + " wide)"


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


def _vectors_of(data: object, name: str) -> dict[str, torch.Tensor]:
    """The parts of a loaded file, by A1111's `create_embedding_from_data` layouts."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1:
            raise EmberError(f"{name}: string_to_param holds {len(tensors)} terms; expected one")
        return {SINGLE: _checked(tensors[0], name)}
    if isinstance(data, dict) and "emb_params" in data:  # A1111 .safetensors
        return {SINGLE: _checked(data["emb_params"], name)}
    if isinstance(data, dict) and (CLIP_L in data or CLIP_G in data):  # SDXL
        if not (CLIP_L in data and CLIP_G in data):
            raise EmberError(f"{name}: an SDXL embedding needs both {CLIP_L} and {CLIP_G}")
        parts = {part: _checked(data[part], f"{name} ({part})") for part in (CLIP_L, CLIP_G)}
        counts = {part: vec.shape[0] for part, vec in parts.items()}
        if len(set(counts.values())) != 1:
            raise EmberError(
                f"{name}: SDXL embedding with {counts[CLIP_L]} {CLIP_L} and {counts[CLIP_G]} "
                f"{CLIP_G} vectors; expected as many of each"
            )
        return parts
    if isinstance(data, dict) and len(data) == 1:  # diffusers learned_embeds: {token: tensor}
        return {SINGLE: _checked(next(iter(data.values())), name)}
    if isinstance(data, torch.Tensor):
        return {SINGLE: _checked(data, name)}
    keys = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
    raise EmberError(
        f"{name}: not a textual-inversion embedding (found {keys}); expected string_to_param "
        f"(A1111 .pt), emb_params, {CLIP_L} and {CLIP_G} (SDXL) or a single tensor"
    )


def _checked(vec: object, name: str) -> torch.Tensor:
    """`vec` as a (n, width) float32 copy; EmberError for anything else."""
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
class _Table:
    """One text encoder's token table and tokenizer: the weight before and after applying."""

    tokenizer: object
    table: torch.nn.Embedding
    before: torch.nn.Parameter
    after: torch.nn.Parameter


@dataclass
class AppliedEmbeddings:
    """Embeddings added to a loaded model; `remove()` undoes it exactly."""

    embeddings: dict[str, Embedding]  # applied, by name
    skipped: dict[str, str]  # name -> why (width, kind)
    _tables: list[_Table] = field(repr=False)  # one per text encoder
    _patterns: dict[tuple[int, ...], str] = field(repr=False)  # name's plain ids -> name
    _removed: bool = field(default=False, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.embeddings)

    @property
    def _tokenizer(self):
        """The tokenizer prompts are searched for names with (the first encoder's, as A1111's
        `GeneralConditioner.tokenize`; SDXL's two share CLIP's vocabulary)."""
        return self._tables[0].tokenizer

    def remove(self) -> None:
        """Restore every tokenizer and encoder table as they were (the same tensors)."""
        if self._removed:
            return
        if any(t.table.weight is not t.after for t in self._tables):
            raise RuntimeError("embeddings applied later must be removed first")
        for t in self._tables:
            t.table.weight = t.before
            t.table.num_embeddings = t.before.shape[0]
            for name in self.embeddings:
                t.tokenizer.remove_word(name)
        self._removed = True

    def hashes(self, names: list[str]) -> str:
        """A1111's infotext value for `TI hashes`: "name: hash12, name2: hash12" (quote it when
        writing the infotext, as A1111 does for values with commas or colons)."""
        return ", ".join(f"{_infotext_name(n)}: {self.embeddings[n].a1111_hash}" for n in names)


def _infotext_name(name: str) -> str:
    # A1111 replaces the separators of the list in names.
    return name.replace(":", "").replace(",", "")


def model_parts(cfg) -> list[str]:
    """The embedding part each text encoder of a model (`config.ModelConfig`) takes, in
    `model.text_encoders` order: on SDXL models (base and refiner) the encoder with a projection
    is bigG (`clip_g`), the other CLIP ViT-L (`clip_l`); SD 1.x/2.x take the single tensor."""
    if not cfg.sdxl:
        return [SINGLE] * len(cfg.text_encoders())
    return [CLIP_G if t.projection_dim else CLIP_L for t in cfg.text_encoders()]


def apply_embeddings(
    loaded, embeddings: list[Embedding], unreadable: dict[str, str] | None = None
) -> AppliedEmbeddings:
    """Add `embeddings` to `loaded` (a `checkpoints.LoadedModel`): each becomes `n_vectors` new
    rows of every text encoder's token table (the part that encoder takes, `model_parts`) and
    each tokenizer encodes its name to its encoder's new ids.

    Embeddings of another kind or width than the encoders take are left out and listed in
    `skipped`. A name that tokenises as an earlier one does is skipped too (A1111 keeps one of the
    two as well). The `unreadable` files of the folder (name -> why) are listed in `skipped` as
    well, so a prompt that names one is an error rather than its name read as words.
    """
    tokenizers = loaded.tokenizers
    tables = [encoder.token_embedding() for encoder in loaded.model.text_encoders]
    assert len(tables) == len(tokenizers), "one tokenizer per text encoder"
    parts = model_parts(loaded.config)
    wants = {part: t.weight.shape[1] for part, t in zip(parts, tables, strict=True)}
    rows = [t.weight.shape[0] for t in tables]
    taken = [_patterns_of(tok) for tok in tokenizers]
    claimed: list[set[tuple[int, ...]]] = [set() for _ in tokenizers]
    kept: dict[str, Embedding] = {}
    skipped: dict[str, str] = {}
    patterns: dict[tuple[int, ...], str] = {}
    new_rows: list[list[torch.Tensor]] = [[] for _ in tables]
    for emb in embeddings:
        names = [tuple(tok.encode_plain(emb.name)) for tok in tokenizers]
        if emb.name in kept or any(
            not p or p in c or p in t for p, c, t in zip(names, claimed, taken, strict=True)
        ):
            skipped[emb.name] = f"embedding {emb.name}: its name is empty or already taken"
            continue
        patterns[names[0]] = emb.name
        for pattern, seen in zip(names, claimed, strict=True):
            seen.add(pattern)
        if any(emb.widths.get(part) != width for part, width in wants.items()):
            skipped[emb.name] = (
                f"embedding {emb.name} does not fit this model: it is "
                f"{describe_widths(emb.widths)}; the model takes {describe_widths(wants)}"
            )
            continue
        for i, (part, tok) in enumerate(zip(parts, tokenizers, strict=True)):
            tok.add_word(emb.name, range(rows[i], rows[i] + emb.n_vectors))
            rows[i] += emb.n_vectors
            new_rows[i].append(emb.vectors[part])
        kept[emb.name] = emb
    for name, why in (unreadable or {}).items():
        pattern = tuple(tokenizers[0].encode_plain(name))
        if pattern and pattern not in patterns and pattern not in taken[0]:
            patterns[pattern] = name
            skipped[name] = f"embedding {name} cannot be used: {why}"
    applied = []
    for table, tok, extra in zip(tables, tokenizers, new_rows, strict=True):
        before = after = table.weight
        if extra:
            added = torch.cat(extra).to(device=before.device, dtype=before.dtype)
            after = torch.nn.Parameter(torch.cat([before.detach(), added]), requires_grad=False)
            table.weight = after
            table.num_embeddings = after.shape[0]
        applied.append(_Table(tok, table, before, after))
    return AppliedEmbeddings(kept, skipped, applied, patterns)


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
