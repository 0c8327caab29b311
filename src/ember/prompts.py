"""Prompt syntax, long-prompt chunking and weighted encoding, with AUTOMATIC1111's semantics.

Sources (behaviour reproduced, code written afresh): stable-diffusion-webui
`modules/prompt_parser.py` (`parse_prompt_attention`), `modules/sd_hijack_clip.py`
(`tokenize_line`, `process_tokens`: chunking, comma backtracking, "Original" emphasis) and
`modules/sd_samplers_cfg_denoiser.py` (`pad_cond_uncond`: padding cond/uncond with empty chunks).

Syntax: `(text)` x1.1, `[text]` /1.1, `(text:1.3)` x1.3, nesting multiplies, `\\(` `\\)` `\\[` `\\]`
`\\\\` are literals, unbalanced openers apply to the end of the prompt, unmatched closers are text,
`BREAK` (upper case, a word of its own) ends the current chunk.

Extra-network tags, `<lora:NAME:WEIGHT>` and `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` (A1111's
`extra_networks` syntax), select LoRAs: `lora_tags` reads them and the text encoder never sees them.

`layout_from_prompt` reads a plain prompt's spatial relation or count ("a cat left of a dog",
"three red squares") as the regions layout guidance steers towards.

One chunk is `max_length` tokens: `[bos] + (max_length - 2) + [eos]`, padded with eos and,
where the pad id differs (SD 2.x), everything after the first eos is set to pad, as A1111 does.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from ember.diffusion.layout import Box, Count, Region
from ember.models.text import TextEncoder
from ember.models.tokenizer import Tokenizer

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # marker weight of a BREAK entry, as in A1111's parse output
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


class LoraTag(NamedTuple):
    """`<lora:NAME:TE:UNET>`: a LoRA named in a prompt, with its text-encoder and U-Net weights."""

    name: str
    te_weight: float
    unet_weight: float


def strip_extra_networks(text: str) -> str:
    """The prompt as the text encoder sees it: extra-network tags removed (A1111 does the same)."""
    return _EXTRA_NETWORK.sub("", text)


def lora_tags(text: str) -> list[LoraTag]:
    """The `<lora:...>` tags of a prompt. `<lora:NAME>` is weight 1; `<lora:NAME:W>` applies W to
    both models; `<lora:NAME:TE:UNET>` or `te=`/`unet=` set each. ValueError for a malformed tag or
    another kind of extra network (ember has only LoRAs)."""
    tags = []
    for kind, args in _EXTRA_NETWORK.findall(text):
        if kind != "lora":
            raise ValueError(f"<{kind}:...> is not supported; ember loads <lora:NAME:WEIGHT> tags")
        name, *rest = [a.strip() for a in args.split(":")]
        positional = [a for a in rest if "=" not in a]
        named = dict(a.split("=", 1) for a in rest if "=" in a)
        if not name or len(positional) > 2 or set(named) - {"te", "unet"}:
            raise ValueError(
                f"malformed tag <lora:{args}>: use <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>"
            )
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"malformed weight in <lora:{args}>") from None
        tags.append(LoraTag(name, te, unet))
    return tags


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(text, weight)` runs; `("BREAK", -1.0)` marks a chunk break.

    Semantics of A1111's `parse_prompt_attention`, scanned left to right:
    an opener pushes the current output position; `)` pops a round opener and multiplies every
    run since by 1.1, `:w)` by `w`, `]` pops a square opener and divides by 1.1; closers with
    no opener (and `:w)` with no round opener) are literal text; a backslash escapes the
    next bracket or backslash and is dropped before any other character; openers left at the
    end apply to the rest of the prompt. Neighbouring runs of equal weight are merged.

    One deliberate difference: A1111 multiplies BREAK's marker weight inside brackets, which turns
    it into the literal word "break" with a negative weight; here BREAK always breaks.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_since(start: int, factor: float) -> None:
        for entry in res[start:]:
            if not entry[2]:
                entry[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(chunk)):
            if i > 0:
                res.append([BREAK, BREAK_WEIGHT, True])
            res.append([part, 1.0, False])

    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            nxt = text[pos + 1 : pos + 2]
            if nxt and nxt in _ESCAPABLE:
                res.append([nxt, 1.0, False])
                pos += 2
            else:
                # A1111 drops a backslash that escapes nothing but keeps an empty run in its place
                # (which can stop neighbouring runs from merging).
                res.append(["", 1.0, False])
                pos += 1
        elif char == "(":
            round_open.append(len(res))
            pos += 1
        elif char == "[":
            square_open.append(len(res))
            pos += 1
        elif char == ":":
            weighted = _WEIGHT_CLOSE.match(text, pos)
            if weighted and round_open:
                try:
                    weight = float(weighted[1])
                except ValueError:
                    raise ValueError(
                        f"invalid emphasis weight {weighted[1]!r} in prompt at character {pos}"
                    ) from None
                multiply_since(round_open.pop(), weight)
                pos = weighted.end()
            elif weighted:
                add_text(weighted[0])
                pos = weighted.end()
            else:
                add_text(":")
                pos += 1
        elif char == ")" and round_open:
            multiply_since(round_open.pop(), ROUND_MULTIPLIER)
            pos += 1
        elif char == "]" and square_open:
            multiply_since(square_open.pop(), SQUARE_MULTIPLIER)
            pos += 1
        elif char in ")]":
            add_text(char)
            pos += 1
        else:
            end = pos + 1
            while end < len(text) and text[end] not in _SPECIAL:
                end += 1
            add_text(text[pos:end])
            pos = end

    # Outermost first, the order in which A1111 applies leftover openers (float products).
    for start in round_open:
        multiply_since(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_since(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for entry in res:
        if merged and not entry[2] and not merged[-1][2] and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    if not merged:
        return [("", 1.0)]
    return [(t, w) for t, w, _ in merged]


class PromptChunk(NamedTuple):
    """One encoder window: `max_length` ids (bos ... eos, pads) and a weight per id."""

    ids: list[int]
    weights: list[float]


def tokenize_weighted(
    text: str, tokenizer: Tokenizer, *, comma_backtrack: int = COMMA_BACKTRACK
) -> list[PromptChunk]:
    """Tokenise a prompt with emphasis into chunks of `tokenizer.max_length` ids.

    A1111's `tokenize_line`: each parsed run is tokenised on its own; a chunk holds
    `max_length - 2` content tokens; when a chunk is full and its last comma is at most
    `comma_backtrack` tokens back, the tokens after that comma move to the next chunk
    (0 disables this); BREAK closes the current chunk; an empty prompt still gives one chunk.
    A textual-inversion embedding's ids (`ember.embeddings`) that do not fit in the current chunk
    start the next one.
    """
    size = tokenizer.max_length - 2
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        full += [tokenizer.pad_token_id] * (size - len(ids))
        chunks.append(PromptChunk(full, [1.0, *weights, *[1.0] * (size + 1 - len(ids))]))
        ids, weights, last_comma = [], [], -1

    for run, weight in parse_prompt_attention(text):
        if run == BREAK and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for token in tokenizer.encode(run):
            if token == comma_id:
                last_comma = len(ids)
            elif (
                comma_backtrack > 0
                and len(ids) == size
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == size:
                close_chunk()
            if ids and len(ids) + tokenizer.word_length(token) > size:
                close_chunk()  # a multi-vector embedding is never split (A1111's tokenize_line)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


@torch.no_grad()
def encode_chunks(
    chunks: list[PromptChunk], encoder: TextEncoder, clip_skip: int = 1
) -> torch.Tensor:
    """Encode chunks in one batch and apply emphasis -> (1, max_length * k, D).

    A1111's "Original" emphasis per chunk: `z *= weights; z *= original_mean / new_mean`
    (means over the whole chunk). Chunks whose weights are all 1 are left untouched, which is the
    same result exactly, so a plain prompt equals the plain diffusers encoding bit for bit.
    """
    device = next(encoder.parameters()).device
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (k, L)
    return _emphasise(encoder(ids, clip_skip=clip_skip), chunks)


@torch.no_grad()
def encode_chunks_pooled(
    chunks: list[PromptChunk], encoder: TextEncoder, clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_chunks` of an encoder with a projection (SDXL's bigG), and the pooled embedding
    (1, P) of the first chunk, unweighted, as A1111 takes it for long prompts."""
    device = next(encoder.parameters()).device
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (k, L)
    z, pooled = encoder.encode(ids, clip_skip=clip_skip)
    return _emphasise(z, chunks), pooled[:1]


def _emphasise(z: torch.Tensor, chunks: list[PromptChunk]) -> torch.Tensor:
    """(k, L, D) states of k chunks with their weights applied -> (1, L * k, D)."""
    weights = torch.tensor([c.weights for c in chunks], dtype=z.dtype, device=z.device)  # (k, L)
    emphasised = (weights != 1.0).any(dim=1)
    if emphasised.any():
        original_mean = z.mean(dim=(1, 2), keepdim=True)
        weighted = z * weights[..., None]
        weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
        z = torch.where(emphasised[:, None, None], weighted, z)
    return z.reshape(1, -1, z.shape[-1])


def encode_prompt(
    text: str, tokenizer: Tokenizer, encoder: TextEncoder, clip_skip: int = 1
) -> torch.Tensor:
    """Prompt -> context (1, max_length * k, D) with A1111 emphasis, BREAK and chunking."""
    return encode_chunks(tokenize_weighted(text, tokenizer), encoder, clip_skip)


def encode_prompts(
    prompt: str,
    negative_prompt: str,
    tokenizer: Tokenizer,
    encoder: TextEncoder,
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) contexts of equal length, ready for one batched CFG call.

    The shorter is extended with encodings of the empty prompt, chunk by chunk, as A1111's
    `pad_cond_uncond` option does.
    """
    cond = encode_prompt(strip_extra_networks(prompt), tokenizer, encoder, clip_skip)
    uncond = encode_prompt(strip_extra_networks(negative_prompt), tokenizer, encoder, clip_skip)
    if cond.shape[1] != uncond.shape[1]:
        empty = encode_prompt("", tokenizer, encoder, clip_skip)  # (1, L, D)
        length = max(cond.shape[1], uncond.shape[1])

        def pad(z: torch.Tensor) -> torch.Tensor:
            repeats = (length - z.shape[1]) // empty.shape[1]
            return torch.cat([z, empty.repeat(1, repeats, 1)], dim=1)

        cond, uncond = pad(cond), pad(uncond)
    return cond, uncond


# Layout prompts: where the objects a prompt names should go, for layout guidance
# (`ember.diffusion.layout`), read from its plain English ("left of", "three").

# Relation phrases -> (box of the subject, box of the object). Longest phrases first.
_LEFT, _RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
_TOP, _BOTTOM = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
RELATIONS: dict[tuple[str, ...], tuple[Box, Box]] = {
    ("to", "the", "left", "of"): (_LEFT, _RIGHT),
    ("to", "the", "right", "of"): (_RIGHT, _LEFT),
    ("on", "the", "left", "of"): (_LEFT, _RIGHT),
    ("on", "the", "right", "of"): (_RIGHT, _LEFT),
    ("left", "of"): (_LEFT, _RIGHT),
    ("right", "of"): (_RIGHT, _LEFT),
    ("above",): (_TOP, _BOTTOM),
    ("over",): (_TOP, _BOTTOM),
    ("below",): (_BOTTOM, _TOP),
    ("under",): (_BOTTOM, _TOP),
    ("beneath",): (_BOTTOM, _TOP),
}
# Counts that get a quadrant each. ember's shapes world puts three or four objects in distinct
# quadrants (`ember.data.shapes.layout_scene`) and two anywhere. Only three leaves a quadrant
# empty, which a model that has learnt the four-quadrant grid tends to fill (the bundled model drew
# four for "three ..." in 11 of 20 images): four fill every quadrant and need no layout.
COUNTS = {"three": 3, "3": 3}
# Words that end the object's phrase after a relation ("... a blue square on a white background").
_PHRASE_END = {"and", "on", "in", "with", "against", "at", "near", "next"}
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def layout_from_prompt(prompt: str, tokenizer: Tokenizer) -> list[Region] | list[Count]:
    """The layout a plain prompt's first spatial relation, or else its count, implies; or [].

    "a red circle left of a blue square on a white background": the subject is the word just before
    the relation ("circle", left half), the object is the last word of the phrase after it, up to
    the next comma or "on"/"in"/"with"/... ("square", right half). "three red squares on a white
    background": a prompt that starts with a number in `COUNTS` has the last word of the phrase
    after the number counted ("squares", a `Count` of 3; `_count`). Token positions count the
    tokenizer's start token. Prompts the analysis cannot map onto tokens exactly (emphasis syntax,
    BREAK, longer than one window) get no layout rather than a wrong one.
    """
    prompt = strip_extra_networks(prompt)
    chunks = tokenize_weighted(prompt, tokenizer)
    if len(chunks) != 1 or any(w != 1.0 for w in chunks[0].weights):
        return []  # emphasis, BREAK or more than one window
    words = _WORD.findall(prompt.lower())
    positions: list[tuple[int, ...]] = []
    ids: list[int] = []
    for w in words:
        word_ids = tokenizer.encode(w)
        positions.append(tuple(range(1 + len(ids), 1 + len(ids) + len(word_ids))))  # after bos
        ids += word_ids
    if chunks[0].ids[1 : len(ids) + 2] != [*ids, tokenizer.eos_token_id]:
        return []  # the words do not tokenise as the whole prompt does
    return _relation(words, positions) or _count(words, positions)


def _phrase_end(words: list[str], start: int) -> int:
    """Index just past the phrase from `start`: up to a comma, "on", "and", ... or the end."""
    end = start
    while end < len(words) and words[end].isalnum() and words[end] not in _PHRASE_END:
        end += 1
    return end


def _count(words: list[str], positions: list[tuple[int, ...]]) -> list[Count]:
    """A count prompt's counted word: "three red squares on a white background" -> "squares", 3.

    Only a prompt that starts with its number is a count of things to lay out: in "a smiling face
    with three hearts" or "a speaker with three sound waves" the number describes part of one
    drawing, and in "three o'clock" it counts nothing (the counted word must be a plural in -s).
    """
    if not words or words[0] not in COUNTS:
        return []
    end = _phrase_end(words, 1)
    if end == 1 or not words[end - 1].endswith("s"):
        return []
    return [Count(positions[end - 1], COUNTS[words[0]])]


def _relation(words: list[str], positions: list[tuple[int, ...]]) -> list[Region]:
    """The subject's and the object's regions of the first relation in `words`, or []."""
    for i in range(1, len(words)):
        for phrase, (subject_box, object_box) in RELATIONS.items():
            if tuple(words[i : i + len(phrase)]) != phrase:
                continue
            subject = i - 1
            if not words[subject].isalnum():
                return []
            j = i + len(phrase)
            end = _phrase_end(words, j)
            if end == j:
                return []
            obj = end - 1
            return [Region(positions[subject], subject_box), Region(positions[obj], object_box)]
    return []
