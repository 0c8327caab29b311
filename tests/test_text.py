"""Tokenizers, text encoders, OpenCLIP conversion and A1111 prompt handling (ember.models.text,
ember.prompts). References: transformers' CLIPTokenizer/CLIPTextModel and BertTokenizer/BertModel,
a from-scratch OpenAI BPE and a from-scratch OpenCLIP text forward written below, A1111's documented
parser outputs."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import unicodedata

import pytest
import regex
import torch
import torch.nn.functional as F
from transformers import BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ember.config import CLIP_L, MINILM, OPENCLIP_H, TINY_TEXT
from ember.models.text import (
    HF_PREFIX,
    OPENCLIP_EXTRA_KEYS,
    ClipTextEncoder,
    build_text_encoder,
    hf_to_openclip,
    load_minilm_pretrained,
    openclip_to_hf,
    text_config_from_hf,
    text_config_to_hf,
)
from ember.models.tokenizer import build_tokenizer, bytes_to_unicode, load_clip_bpe, minilm_path
from ember.prompts import (
    encode_prompt,
    encode_prompts,
    parse_prompt_attention,
    tokenize_weighted,
)

TINY_OPENCLIP = dataclasses.replace(
    TINY_TEXT, num_layers=3, hidden_act="gelu", layer="penultimate", pad_token_id=0
)
TRICKY = [
    "a photo of an astronaut riding a horse on mars",
    "A   Photo\tOF\n\na CAT!!  ",
    "Hello, world... it's 2024-01-02; price: $3.50 (approx.) #tag @user",
    "don't won't they're we've I'm you'll he'd",
    "1234567 3.14159 1e-5 0x1F",
    "café naïve résumé Ångström ÉCOLE straße İstanbul ΣΟΦΟΣ",
    "日本語のテキスト 中文 한국어 emoji 🐱🚀👍🏽 ",
    "e\u0301 combining accent, zero\u200bwidth, non\u00a0breaking",
    "<|startoftext|> special <|endoftext|> tokens",
    "masterpiece, best quality, " * 30,
    "",
    "   ",
]


# --- an independent OpenAI-style CLIP BPE (clip/simple_tokenizer.py algorithm, no ftfy) ---
class ReferenceBPE:
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    )

    def __init__(self) -> None:
        self.vocab, merges = load_clip_bpe()
        self.rank = {m: i for i, m in enumerate(merges)}
        self.byte_char = bytes_to_unicode()

    @functools.cache  # noqa: B019 - test helper, lives as long as the test
    def bpe(self, word: str) -> tuple[str, ...]:
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
        # Per-character lower case, as the tokenizers library does; OpenAI's `str.lower()` differs
        # only for a word-final capital sigma (ς rather than σ).
        text = "".join(c.lower() for c in text)
        ids = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[t] for t in self.bpe(word)]
        return ids


@pytest.fixture(scope="module")
def clip_tok():
    return build_tokenizer(CLIP_L)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    enc = build_text_encoder(TINY_TEXT).eval()
    with torch.no_grad():  # a trained final norm's shift: at its initial (1, 0) every state's mean
        enc.transformer.text_model.final_layer_norm.bias.normal_(0, 0.5)  # is 0 (no emphasis)
    return enc


@pytest.fixture(scope="module")
def hf_folder_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer loaded from vocab.json/merges.txt written here."""
    folder = tmp_path_factory.mktemp("clip_tok")
    vocab, merges = load_clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(str(folder))


def test_clip_vocab_layout():
    vocab, merges = load_clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize("text", TRICKY)
def test_clip_tokenizer_ids(clip_tok, hf_folder_tokenizer, text):
    ids = clip_tok.encode(text)
    assert ids == hf_folder_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == ReferenceBPE().encode(text)


def test_clip_tokenizer_known_ids(clip_tok):
    # Well-known ids of the OpenAI CLIP vocabulary ("a photo of a cat").
    assert clip_tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert clip_tok.encode_padded("a cat")[:5] == [49406, 320, 2368, 49407, 49407]
    assert len(clip_tok.encode_padded("word " * 100)) == 77


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H])
def test_exported_tokenizer_matches(cfg, tmp_path):
    tok = build_tokenizer(cfg)
    tok.save_pretrained(tmp_path)
    hf = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert hf.pad_token_id == cfg.pad_token_id and hf.model_max_length == 77
    for text in ["a photo of a cat", "masterpiece, best quality, " * 30, ""]:
        got = hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert got == tok.encode_padded(text)
    assert tok.encode_padded("")[:3] == [49406, 49407, cfg.pad_token_id]


def test_minilm_tokenizer():
    tok = build_tokenizer(MINILM)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (101, 102, 0)
    assert tok.encode("Hello World") == [7592, 2088]
    assert tok.encode_padded("hello") == [101, 7592, 102] + [0] * 29
    # tokenizer.json pads and truncates to 128; `encode` must do neither.
    assert len(tok.encode("masterpiece, best quality, " * 30)) == 150
    assert tok.encode("") == []


MINILM_TEXTS = [
    *TRICKY,
    "a slice of pizza, twemoji style",
    "Crème Brûlée 🍮 at 3:45pm!! ÀÉÎÕÜ ñ ç",
    "NUMBERS: 1,000,000 and the 42nd of 7.5e-3",
    "unbelievably-long_words__with.dots/and\\slashes",
    "[CLS] a [SEP] b [PAD] [MASK] [UNK]",
    "x" * 150,
]


@pytest.fixture(scope="module")
def minilm_references():
    """transformers' BertTokenizer as ember used it (from the folder) and as built from vocab.txt
    alone (transformers' own BERT pipeline, independent of tokenizer.json)."""
    folder = minilm_path()
    return [
        BertTokenizer.from_pretrained(str(folder)),
        BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True),
    ]


@pytest.mark.parametrize("text", MINILM_TEXTS)
def test_minilm_tokenizer_matches_transformers(minilm_references, text):
    ids = build_tokenizer(MINILM).encode(text)
    for ref in minilm_references:
        assert ids == ref(text, add_special_tokens=False)["input_ids"]


def test_minilm_exported_tokenizer_matches(tmp_path):
    tok = build_tokenizer(MINILM)
    tok.save_pretrained(tmp_path)
    hf = BertTokenizer.from_pretrained(str(tmp_path))
    assert hf.model_max_length == 32
    for text in ["a slice of pizza, twemoji style", "word " * 40, ""]:
        got = hf(text, padding="max_length", max_length=32, truncation=True)["input_ids"]
        assert got == tok.encode_padded(text)


def _hf_clip(cfg, layers=None):
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers if layers is None else layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_length,
            hidden_act=cfg.hidden_act,
        )
    ).eval()


def _load_truncated(hf, encoder):
    """Load `encoder`'s weights into a (possibly shallower) reference model."""
    sd = {k.removeprefix(HF_PREFIX): v for k, v in encoder.state_dict().items()}
    keep = set(hf.state_dict())
    hf.load_state_dict({k: v for k, v in sd.items() if k in keep}, strict=True)
    return hf


def _ids(clip_tok, *texts):
    return torch.tensor([clip_tok.encode_padded(t) for t in texts])


def test_tiny_clip_matches_transformers(tiny, clip_tok):
    keys = list(tiny.state_dict())
    assert f"{HF_PREFIX}encoder.layers.0.self_attn.q_proj.weight" in keys
    assert all(k.startswith(HF_PREFIX) for k in keys)
    ids = _ids(clip_tok, "a red cube", "a photo of a dog on the beach")
    ref = _load_truncated(_hf_clip(TINY_TEXT), tiny)
    assert torch.equal(tiny(ids), ref(ids)[0])


def test_clip_skip_and_penultimate(clip_tok):
    torch.manual_seed(1)
    cfg = dataclasses.replace(TINY_TEXT, num_layers=3)
    last = build_text_encoder(cfg).eval()
    pen = build_text_encoder(dataclasses.replace(cfg, layer="penultimate")).eval()
    pen.load_state_dict(last.state_dict())
    ids = _ids(clip_tok, "a house on a hill")
    # Skipping k-1 layers == a model with k-1 fewer layers (how diffusers stores SD 2.x).
    two = _load_truncated(_hf_clip(cfg, layers=2), last)(ids)[0]
    one = _load_truncated(_hf_clip(cfg, layers=1), last)(ids)[0]
    torch.testing.assert_close(last(ids, clip_skip=2), two, rtol=0, atol=1e-6)
    torch.testing.assert_close(pen(ids), two, rtol=0, atol=1e-6)
    torch.testing.assert_close(pen(ids, clip_skip=2), one, rtol=0, atol=1e-6)
    assert not torch.allclose(last(ids), two)
    with pytest.raises(ValueError, match="clip_skip"):
        pen(ids, clip_skip=3)


def _openclip_forward(sd, ids, layers):
    """OpenCLIP's text transformer (open_clip `TextTransformer`), written against its names."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    width = x.shape[-1]
    heads = TINY_OPENCLIP.num_heads
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[p + "attn.in_proj_weight"],
                "in_proj_bias": sd[p + "attn.in_proj_bias"],
                "out_proj.weight": sd[p + "attn.out_proj.weight"],
                "out_proj.bias": sd[p + "attn.out_proj.bias"],
            }
        )
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        x = x + F.linear(F.gelu(h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)


def test_openclip_round_trip_and_outputs(clip_tok):
    torch.manual_seed(2)
    enc = build_text_encoder(TINY_OPENCLIP).eval()
    extras = {
        "text_projection": torch.randn(32, 32),
        "logit_scale": torch.tensor(4.6052),
    }
    openclip = hf_to_openclip({**enc.state_dict(), **extras})
    assert "transformer.resblocks.0.attn.in_proj_weight" in openclip
    assert all(openclip[k] is extras[k] for k in OPENCLIP_EXTRA_KEYS)
    back = openclip_to_hf(openclip)
    assert back.keys() == {**enc.state_dict(), **extras}.keys()
    for key, value in {**enc.state_dict(), **extras}.items():
        assert torch.equal(back[key], value), key
    again = hf_to_openclip(back)
    assert again.keys() == openclip.keys()
    assert all(torch.equal(again[k], openclip[k]) for k in openclip)

    fresh = build_text_encoder(TINY_OPENCLIP).eval()
    fresh.load_state_dict({k: v for k, v in back.items() if k not in OPENCLIP_EXTRA_KEYS})
    ids = torch.tensor([build_tokenizer(TINY_OPENCLIP).encode_padded("a castle, at dusk")])
    ref = _openclip_forward(openclip, ids, layers=TINY_OPENCLIP.num_layers - 1)  # penultimate
    torch.testing.assert_close(fresh(ids), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="visual.proj"):
        openclip_to_hf({**openclip, "visual.proj": torch.zeros(1)})


def test_text_config_hf_round_trip():
    assert text_config_from_hf(text_config_to_hf(CLIP_L)) == CLIP_L
    assert text_config_from_hf(text_config_to_hf(MINILM)) == MINILM
    # SD 2.x folders hold the 23 layers in use; read back, it is the same function of the ids.
    sd2 = text_config_from_hf(text_config_to_hf(OPENCLIP_H))
    assert (sd2.num_layers, sd2.layer, sd2.pad_token_id) == (23, "last", 0)
    legacy = {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768}
    legacy |= {"intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    legacy |= {"hidden_act": "quick_gelu", "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
    assert text_config_from_hf(legacy) == CLIP_L


# transformers' default (sdpa) attention is what ember ran until it dropped transformers; its
# eager attention (additive mask) differs from sdpa by up to 6e-5 itself after six layers.
@pytest.mark.parametrize("attention,atol", [("sdpa", 1e-5), ("eager", 1e-4)])
def test_minilm_matches_transformers_bert(attention, atol):
    enc = load_minilm_pretrained()
    # transformers' own loading of the same file.
    ref = BertModel.from_pretrained(
        str(minilm_path()), add_pooling_layer=False, attn_implementation=attention
    ).eval()
    # The names are BertModel's (without pooler), so ldm files and diffusers folders load as is.
    assert list(enc.state_dict()) == [f"transformer.{k}" for k in ref.state_dict()]
    assert not list(enc.buffers())
    tok = build_tokenizer(MINILM)
    texts = ["a slice of pizza, twemoji style", "", "A RED circle left of a blue square!"]
    texts += ["word " * 40]  # a full window: no padding at all
    ids = torch.tensor([tok.encode_padded(t) for t in texts])  # (4, 32)
    assert (ids == 0).any() and (ids[-1] != 0).all()
    with torch.no_grad():
        hidden = ref(
            input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True
        ).hidden_states
        for clip_skip in (1, 2):
            got = enc(ids, clip_skip=clip_skip)
            assert got.shape == (4, 32, 384)
            assert (got - hidden[-clip_skip]).abs().max() <= atol, clip_skip
    with pytest.raises(ValueError, match="clip_skip"):
        enc(ids, clip_skip=7)
    # layer="penultimate" (preset ember-small-z8p) is BERT's fifth layer, clip skip on top.
    pen = load_minilm_pretrained(dataclasses.replace(MINILM, layer="penultimate"))
    with torch.no_grad():
        for clip_skip in (1, 2):
            got = pen(ids, clip_skip=clip_skip)
            assert (got - hidden[-1 - clip_skip]).abs().max() <= atol, clip_skip
    with pytest.raises(ValueError, match="clip_skip"):
        pen(ids, clip_skip=6)
    # A layer number k reads BERT's k-th layer (hidden_states[k]); 0 or 7 is refused.
    fourth = load_minilm_pretrained(dataclasses.replace(MINILM, layer=4))
    with torch.no_grad():
        assert (fourth(ids) - hidden[4]).abs().max() <= atol
    for bad in (0, 7, "first"):
        with pytest.raises(ValueError, match="text layer"):
            dataclasses.replace(MINILM, layer=bad)


def test_minilm_meta_build_then_assign():
    enc = load_minilm_pretrained()
    with torch.device("meta"):
        meta = build_text_encoder(MINILM)
    meta.load_state_dict(enc.state_dict(), strict=True, assign=True)
    ids = torch.tensor([build_tokenizer(MINILM).encode_padded("a cat")])
    with torch.no_grad():
        assert torch.equal(meta(ids), enc(ids))


def test_default_model_generates_without_transformers(tmp_path):
    # `ember generate` with the bundled model, as the command line runs it, in a fresh interpreter:
    # importing transformers would cost seconds of start-up.
    out = tmp_path / "x.png"
    script = (
        "import sys\n"
        "from ember.cli import main\n"
        f"assert main(['generate', 'a slice of pizza, twemoji style', '--steps', '1', '-q',"
        f" '-o', {str(out)!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_minilm_offline_embedding():
    tok = build_tokenizer(MINILM)
    enc = load_minilm_pretrained()
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell sharply."]
    ids = torch.tensor([tok.encode_padded(t) for t in texts])
    with torch.no_grad():
        z = enc(ids)  # (3, 32, 384)
    assert z.shape == (3, 32, 384)
    mask = (ids != 0).float()[..., None]
    emb = F.normalize((z * mask).sum(1) / mask.sum(1), dim=-1)
    related, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert related > 0.6 and related > unrelated + 0.3


# --- prompts ---------------------------------------------------------------------------------
PARSE_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b:1.2)", [("a", 1.2), ("BREAK", -1.0), ("b", 1.2)]),
    ("a BREAKFAST", [("a BREAKFAST", 1.0)]),
    ("[a] [[b]]", [("a", 1 / 1.1), (" ", 1.0), ("b", 1 / 1.1 / 1.1)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("x:1.2) y] z", [("x:1.2) y] z", 1.0)]),
    (r"a\\b \q", [("a\\b q", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_rejects_bad_weight():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


def test_tokenize_weighted_chunks(clip_tok):
    cat, dog, comma = clip_tok.encode("cat")[0], clip_tok.encode("dog")[0], clip_tok.encode(",")[0]
    chunks = tokenize_weighted("cat " * 70 + ", " + "(dog:1.5) " * 10, clip_tok)
    # Chunk full at 75 with a comma 5 back: the four dogs after it move to the next chunk.
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids == [49406] + [cat] * 70 + [comma] + [49407] * 5
    assert chunks[1].ids[:12] == [49406] + [dog] * 10 + [49407]
    assert chunks[1].weights[1:11] == pytest.approx([1.5] * 10) and chunks[1].weights[11] == 1.0
    # BREAK ends a chunk; SD 2.x pads after the first eos with 0.
    sd2 = build_tokenizer(OPENCLIP_H)
    broken = tokenize_weighted("a BREAK b", sd2)
    assert [c.ids[:4] for c in broken] == [[49406, 320, 49407, 0], [49406, 321, 49407, 0]]
    assert len(tokenize_weighted("cat " * 75, clip_tok)) == 1
    assert len(tokenize_weighted("cat " * 76, clip_tok)) == 2


def test_plain_prompt_equals_diffusers_encoding(tiny, clip_tok):
    hf_tok = clip_tok.to_transformers()
    for text in ["a photo of an astronaut riding a horse on mars", ""]:
        ids = hf_tok(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            expected = _load_truncated(_hf_clip(TINY_TEXT), tiny)(ids.input_ids)[0]
        torch.testing.assert_close(encode_prompt(text, clip_tok, tiny), expected)


def test_plain_prompt_equals_diffusers_encoding_sd2():
    torch.manual_seed(3)
    enc = build_text_encoder(TINY_OPENCLIP).eval()
    tok = build_tokenizer(TINY_OPENCLIP)
    ids = tok.to_transformers()("a castle at dusk", padding="max_length", return_tensors="pt")
    assert ids.input_ids[0, -1] == 0
    with torch.no_grad():  # diffusers' SD 2.x layout: the penultimate layer is the last one kept
        expected = _load_truncated(_hf_clip(TINY_OPENCLIP, layers=2), enc)(ids.input_ids)[0]
    torch.testing.assert_close(encode_prompt("a castle at dusk", tok, enc), expected)


def test_weighted_and_long_prompts(tiny, clip_tok):
    plain = encode_prompt("a red cube on a table", clip_tok, tiny)
    weighted = encode_prompt("a (red:1.5) cube on a table", clip_tok, tiny)
    assert weighted.shape == plain.shape == (1, 77, 32)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert not torch.allclose(weighted, plain)
    # A1111 "Original" emphasis, spelled out: scale token 2 ("red") by 1.5, restore the mean.
    w = torch.ones(77, 1)
    w[2] = 1.5
    torch.testing.assert_close(weighted, plain * w * (plain.mean() / (plain * w).mean()))

    long = encode_prompt("a house on a hill, " * 20, clip_tok, tiny)
    assert long.shape == (1, 154, 32)
    cond, uncond = encode_prompts("a house on a hill, " * 20, "blurry", clip_tok, tiny)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[:, :77], encode_prompt("blurry", clip_tok, tiny))
    torch.testing.assert_close(uncond[:, 77:], encode_prompt("", clip_tok, tiny))
    assert encode_prompt("a BREAK b", clip_tok, tiny).shape == (1, 154, 32)


def test_minilm_prompt_chunks():
    tok = build_tokenizer(MINILM)
    chunks = tokenize_weighted("word " * 40, tok)
    assert [len(c.ids) for c in chunks] == [32, 32]
    assert chunks[0].ids[0] == 101 and chunks[0].ids[-1] == 102
    assert chunks[1].ids[11:13] == [102, 0]


def test_meta_build_then_assign(tiny, clip_tok):
    with torch.device("meta"):
        enc = ClipTextEncoder(TINY_TEXT)
    enc.load_state_dict(tiny.state_dict(), strict=True, assign=True)
    ids = _ids(clip_tok, "a cat")
    assert torch.equal(enc(ids), tiny(ids))
