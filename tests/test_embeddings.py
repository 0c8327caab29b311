"""Textual-inversion embeddings and a diffusers folder's own tokenizer, against diffusers.

A tiny random SD 1.x pipeline built by diffusers (`conftest.build_diffusers_folder`); diffusers
loads each embedding with `load_textual_inversion` (its token: the embedding's file name, which is
what names it in an A1111/ember prompt), ember with `apply_embeddings`; the images must agree as
tests/test_engine.py's do. Then the bad inputs: one EmberError line each.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember import checkpoints, diffusers_folder, pipeline
from ember.config import get_preset
from ember.embeddings import (
    SINGLE,
    apply_embeddings,
    embeddings_used,
    find_embeddings,
    read_embedding,
    read_embeddings,
)
from ember.errors import EmberError
from ember.models.tokenizer import build_tokenizer
from ember.settings import GenerationParams

diffusers = pytest.importorskip("diffusers")

SIZE, STEPS, CFG, SEED = 64, 6, 5.0, 1234
WIDTH = 32  # the tiny preset's text width
PROMPT = "a photo of zqemb, red kwemb"
NEGATIVE = "blurry, xvemb"


def write_embeddings(folder, width: int = WIDTH) -> dict[str, torch.Tensor]:
    """The three layouts the issue names, with random vectors of a clearly visible size."""
    gen = torch.Generator().manual_seed(7)
    vecs = {
        "zqemb": torch.randn(3, width, generator=gen),  # A1111 .pt, 3 vectors
        "xvemb": torch.randn(2, width, generator=gen),  # A1111 .safetensors (emb_params)
        "kwemb": torch.randn(1, width, generator=gen),  # diffusers learned_embeds
    }
    folder.mkdir(parents=True, exist_ok=True)
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vecs["zqemb"]},
        "name": "zqemb",
        "step": 1000,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
    }
    torch.save(a1111, folder / "zqemb.pt")
    save_file({"emb_params": vecs["xvemb"]}, str(folder / "xvemb.safetensors"))
    save_file({"<kw-token>": vecs["kwemb"]}, str(folder / "kwemb.safetensors"))
    return vecs


def diffusers_image(folder, files, *, prompt=PROMPT, negative=NEGATIVE) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    for name, path in files.items():
        pipe.load_textual_inversion(str(path), token=name)
    out = pipe(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def ember_image(loaded, *, prompt=PROMPT, negative=NEGATIVE) -> np.ndarray:
    params = GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        sampler="euler",
        schedule="default",
        steps=STEPS,
        cfg=CFG,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        layout_guidance=0.0,
    )
    pixels = pipeline.generate(loaded, params)[0]  # (3, H, W) in [0, 1]
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    write_embeddings(folder)
    return folder


def test_embeddings_in_prompt_and_negative_match_diffusers(sd1_folder, emb_dir):
    files = find_embeddings(emb_dir)
    assert sorted(files) == ["kwemb", "xvemb", "zqemb"]
    ref = diffusers_image(sd1_folder, files)
    loaded = checkpoints.load_model(sd1_folder)
    plain = ember_image(loaded)
    table = loaded.model.cond_stage_model.token_embedding().weight
    applied = apply_embeddings(loaded, [read_embedding(p) for p in files.values()])
    assert applied.skipped == {}
    got = ember_image(loaded)
    assert max_diff(got, ref) <= 2
    assert max_diff(got, plain) > 10, "the embeddings changed nothing: the test would prove nothing"
    assert embeddings_used(PROMPT, applied) == ["zqemb", "kwemb"]
    assert embeddings_used(NEGATIVE, applied) == ["xvemb"]
    applied.remove()
    assert loaded.model.cond_stage_model.token_embedding().weight is table
    assert (ember_image(loaded) == plain).all(), "remove() must restore the model exactly"


def test_multi_vector_embedding_alone_in_negative_prompt(sd1_folder, emb_dir):
    files = {"zqemb": emb_dir / "zqemb.pt"}
    negative = "zqemb"
    ref = diffusers_image(sd1_folder, files, prompt="a red square", negative=negative)
    loaded = checkpoints.load_model(sd1_folder)
    apply_embeddings(loaded, [read_embedding(files["zqemb"])])
    assert max_diff(ember_image(loaded, prompt="a red square", negative=negative), ref) <= 2


def test_read_embedding_layouts_and_hashes(emb_dir):
    import hashlib

    vecs = write_embeddings(emb_dir / "again")
    for name, vec in vecs.items():
        (path,) = (emb_dir / "again").glob(f"{name}.*")
        emb = read_embedding(path)
        assert emb.name == name and list(emb.vectors) == [SINGLE]
        assert torch.equal(emb.vectors[SINGLE], vec)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert (emb.sha256, emb.a1111_hash) == (sha, sha[:12])
    # diffusers writes one vector as (width,) too
    save_file({"<t>": vecs["kwemb"][0]}, str(emb_dir / "flat.safetensors"))
    flat = read_embedding(emb_dir / "flat.safetensors")
    assert (flat.n_vectors, flat.widths) == (1, {SINGLE: WIDTH})


def test_ti_hashes_and_chunking(sd1_folder, emb_dir):
    loaded = checkpoints.load_model(sd1_folder)
    embs = [read_embedding(p) for p in find_embeddings(emb_dir).values()]
    applied = apply_embeddings(loaded, embs)
    hashes = {e.name: e.a1111_hash for e in embs}
    assert applied.hashes(["zqemb", "kwemb"]) == (
        f"zqemb: {hashes['zqemb']}, kwemb: {hashes['kwemb']}"
    )
    # emphasis, extra-network tags and BREAK: the name is still found, once per name
    assert embeddings_used("(ZQEMB:1.2) <lora:x:1> BREAK [zqemb], xvemb", applied) == [
        "zqemb",
        "xvemb",
    ]
    assert embeddings_used("zqembs and kw emb", applied) == []
    # a 3-vector embedding that does not fit in the first chunk starts the next (A1111)
    from ember.prompts import tokenize_weighted

    chunks = tokenize_weighted("a " * 74 + "zqemb", loaded.tokenizer)
    zq = list(loaded.tokenizer.added_words["zqemb"])
    assert len(chunks) == 2 and chunks[1].ids[1:4] == zq and zq[0] not in chunks[0].ids
    applied.remove()
    assert loaded.tokenizer.added_words == {}


def test_wrong_width_is_skipped_and_one_error_line_when_named(sd1_folder, tmp_path):
    write_embeddings(tmp_path, width=1024)
    loaded = checkpoints.load_model(sd1_folder)
    embs, bad = read_embeddings(tmp_path)
    assert bad == {}
    applied = apply_embeddings(loaded, embs)
    assert applied.names == [] and set(applied.skipped) == {"zqemb", "xvemb", "kwemb"}
    assert loaded.tokenizer.added_words == {}
    with pytest.raises(EmberError) as info:
        embeddings_used("a photo of zqemb", applied)
    assert "\n" not in str(info.value) and "1024" in str(info.value) and "32" in str(info.value)
    assert embeddings_used("a photo of a cat", applied) == []


@pytest.mark.parametrize(
    ("name", "data", "named"),
    [
        ("cut.pt", None, "unreadable"),
        ("noise.safetensors", bytes(range(256)) * 4, "unreadable"),
        ("noise.pt", bytes(range(256)) * 4, "unreadable"),
        ("other.safetensors", {"a": torch.zeros(2, 4), "b": torch.zeros(2)}, "not a textual"),
        ("xl.safetensors", {"clip_g": torch.zeros(1, 8), "clip_l": torch.zeros(2, 4)}, "as many"),
        ("half.safetensors", {"clip_g": torch.zeros(1, 8)}, "both"),
        ("ints.safetensors", {"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, "floating"),
        ("nan.safetensors", {"emb_params": torch.full((1, 4), float("nan"))}, "NaN"),
        ("terms.pt", {"string_to_param": {"*": torch.zeros(1, 4), "x": torch.zeros(1, 4)}}, "2"),
        ("code.pt", {"f": print}, "unreadable"),
    ],
)
def test_bad_embedding_files_are_one_line_errors(tmp_path, name, data, named):
    path = tmp_path / name
    if name == "cut.pt":
        torch.save({"string_to_param": {"*": torch.randn(4, 64)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif isinstance(data, bytes):
        path.write_bytes(data)
    elif name.endswith(".safetensors"):
        save_file(data, str(path))
    else:
        torch.save(data, path)
    with pytest.raises(EmberError) as info:
        read_embedding(path)
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)
    assert name.split(".")[0] in read_embeddings(tmp_path)[1]


def test_find_embeddings_walks_subfolders(tmp_path):
    write_embeddings(tmp_path / "sub")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert sorted(find_embeddings(tmp_path)) == ["kwemb", "xvemb", "zqemb"]
    assert find_embeddings(tmp_path / "missing") == {}


# --- a diffusers folder whose tokenizer is not CLIP's ---------------------------------------------

WORDS = ["a", "red", "circle", "left", "of", "blue", "square", "blurry", "photo"]


def write_tiny_vocabulary(folder):
    """A CLIP-style BPE vocabulary of a few hundred tokens, in an order unlike CLIP's: letters,
    letters with </w>, one merge chain per word, then the specials."""
    from ember.models.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *reversed(chars), *(c + "</w>" for c in chars)]
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    merges = list(dict.fromkeys(merges))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


@pytest.fixture(scope="module")
def own_tokenizer_folder(tmp_path_factory, sd1_folder):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("own-tok") / "own-tokenizer"
    shutil.copytree(sd1_folder, folder)
    files = tmp_path_factory.mktemp("vocab")
    write_tiny_vocabulary(files)
    tok = CLIPTokenizer(
        vocab=str(files / "vocab.json"),
        merges=str(files / "merges.txt"),
        model_max_length=77,
    )
    tok.add_tokens(["<concept>"])  # an added token, saved with the folder
    shutil.rmtree(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    shutil.copy(files / "vocab.json", folder / "tokenizer" / "vocab.json")
    shutil.copy(files / "merges.txt", folder / "tokenizer" / "merges.txt")
    return folder


def load_with_folder_tokenizer(folder):
    """What `checkpoints.load_model` does once it reads the tokenizer with
    `diffusers_folder.read_tokenizer` (the call that replaces `build_tokenizer` there)."""
    sd, cfg, extra = diffusers_folder.read_diffusers(folder)
    model = checkpoints.build_model(cfg, sd)
    tokenizer = diffusers_folder.read_tokenizer(folder, cfg.text)
    return checkpoints.LoadedModel(model, tokenizer, cfg, str(folder), folder.name, "", "", extra)


def test_folder_with_its_own_tokenizer_matches_diffusers(own_tokenizer_folder):
    prompt, negative = "a red circle left of a <concept> blue square", "blurry photo"
    ref = diffusers_image(own_tokenizer_folder, {}, prompt=prompt, negative=negative)
    cfg, _ = diffusers_folder.inspect_diffusers(own_tokenizer_folder)
    assert (cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.pad_token_id) == (0, 1, 1)
    loaded = load_with_folder_tokenizer(own_tokenizer_folder)
    ids = loaded.tokenizer.encode("red <concept>")
    assert ids[0] < 1000 and ids[-1] == max(loaded.tokenizer.to_transformers().get_vocab().values())
    assert max_diff(ember_image(loaded, prompt=prompt, negative=negative), ref) <= 2
    # CLIP's own vocabulary gives another image: the comparison tells the tokenizers apart
    clip = dataclasses.replace(loaded, tokenizer=build_tokenizer(get_preset("tiny").text))
    assert max_diff(ember_image(clip, prompt=prompt, negative=negative), ref) > 10
