"""The built-in CLIP tokenizer (ember.models.tokenizer) encodes without `transformers` and gives the
ids of transformers' `CLIPTokenizer` over the same vocabulary, built as the export path builds it
(`_make_clip_tokenizer`, eos as pad so "!" is not special), with `add_special_tokens=False`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata

import pytest

from ember.config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, SDXL_CLIP_L
from ember.models.tokenizer import (
    CLIP_EOS,
    _clip_encoding_backend,
    _make_clip_tokenizer,
    build_tokenizer,
)

PROMPTS = [
    # plain
    "a photo of an astronaut riding a horse on mars",
    "a photo of a cat",
    "masterpiece, best quality, " * 30,
    # A1111 weighting and alternation syntax
    "(masterpiece:1.2), [cat|dog]",
    "((best quality)), [[low res]], (red hair:0.8), {a|b}, <lora:detail:0.7>, AND a dog",
    "a \\(escaped\\) paren, [from:to:0.5], BREAK next chunk",
    # whitespace
    "a\tcat\n\non  a\u00a0mat\r\n",
    "  leading and trailing  ",
    "ideographic\u3000space, em\u2003space, thin\u2009space, line\u2028separator",
    "zero\u200bwidth joiner\u200dand\ufeffbom",
    " ",
    "\n\t\n",
    # case
    "A PHOTO OF A CAT",
    "ΣΟΦΟΣ İstanbul ǅemal Straße STRASSE",
    # accents, NFC and NFD forms
    "café naïve résumé Ångström",
    unicodedata.normalize("NFD", "café naïve résumé Ångström"),
    "e\u0301 o\u0308 a\u030a",
    "\u212b angstrom sign, \ufb01 ligature, \u2126 ohm sign",
    # scripts and symbols
    "日本語のテキスト 中文提示词 한국어",
    "Привет мир, مرحبا, שלום, नमस्ते",
    "🐱🚀👍🏽 👨\u200d👩\u200d👧 🇯🇵 ❤️",
    "♪ © ® ™ ° ± × ÷ → ∞",
    # digits
    "1234567 3.14159 1e-5 0x1F 2024-01-02 1,000,000",
    "１２３ fullwidth, ٣ arabic-indic, ² superscript",
    # apostrophes
    "don't won't it's they're we've I'm you'll he'd",
    "DON'T IT'S THEY'RE",
    "don’t it’s ‘quoted’ \"double\" 'single' rock'n'roll",
    # long words
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious" * 8,
    "a" * 300,
    # "!" is never special
    "!",
    "!!!",
    "wow! a cat!! really!!!",
    # bos/eos typed in a prompt
    "<|startoftext|>",
    "<|endoftext|>",
    "<|startoftext|>a cat<|endoftext|>",
    "<|endoftext|><|endoftext|> <|startoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|endoftext| < |endoftext| > <|endoftext>",
    # control characters and empty
    "bell\x07 null\x00 del\x7f",
    "",
]


@pytest.fixture(scope="module")
def reference():
    return _make_clip_tokenizer(CLIP_EOS, 10**9)


def _ref_ids(reference, text: str) -> list[int]:
    return reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_equal_transformers(reference, text):
    assert build_tokenizer(CLIP_L).encode(text) == _ref_ids(reference, text)


def test_random_strings_equal_transformers(reference):
    # Characters from every category above, mixed at random: catches what a hand list misses.
    pool = "aZé日🐱1٣ !'’s<|>()[]:\t\n\u00a0\u0301\u200b_-.,"
    words = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'t", "'ll", "don't", "!"]
    rng = random.Random(0)
    tok = build_tokenizer(CLIP_L)
    for _ in range(300):
        parts = rng.choices([*pool, *words], k=rng.randint(0, 40))
        text = "".join(parts)
        assert tok.encode(text) == _ref_ids(reference, text), repr(text)


def test_known_ids_and_no_special_exclamation():
    tok = build_tokenizer(CLIP_L)
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("!") == [256] and tok.encode("!!!") == [995]
    assert tok.encode("a<|endoftext|>b") == [320, 49407, 321]
    # SD 2.x pads with id 0 ("!"); a typed "!" still encodes as the word "!</w>".
    sd2 = build_tokenizer(OPENCLIP_H)
    assert sd2.encode_padded("!")[:4] == [49406, 256, 49407, 0]


def test_pipeline_equals_transformers(reference):
    # Every part that encoding runs, option by option, as the `tokenizers` JSON spells it.
    ours = json.loads(_clip_encoding_backend().to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "model", "truncation", "padding"):
        assert ours[key] == theirs[key], key
    assert ours["post_processor"] is None


def test_encoding_does_not_import_transformers():
    script = (
        "import sys\n"
        "from ember.config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, SDXL_CLIP_L\n"
        "from ember.models.tokenizer import build_tokenizer\n"
        "for cfg in (CLIP_L, OPENCLIP_H, SDXL_CLIP_L, OPENCLIP_BIGG):\n"
        "    tok = build_tokenizer(cfg)\n"
        "    assert tok.encode('a photo of a cat') == [320, 1125, 539, 320, 2368]\n"
        "    assert len(tok.encode_padded('a cat!')) == 77\n"
        "assert 'tokenizers' in sys.modules\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "assert not loaded, loaded\n"
    )
    assert {c.kind for c in (CLIP_L, OPENCLIP_H, SDXL_CLIP_L, OPENCLIP_BIGG)} == {"clip"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
