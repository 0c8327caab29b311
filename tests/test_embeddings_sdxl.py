"""SDXL textual-inversion embeddings against diffusers.

An SDXL embedding file holds `clip_l` (n, CLIP-L width) and `clip_g` (n, bigG width); diffusers
loads them with `load_textual_inversion(sd["clip_l"], text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)` and the same with `clip_g`, `text_encoder_2`, `tokenizer_2`; ember's
image of the tiny random SDXL pipeline (`conftest.build_sdxl_folder`: CLIP-L 64 wide, bigG 128)
must agree as tests/test_sdxl.py's do. Then the kinds that do not fit: skipped, one line each.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ember import checkpoints
from ember.embeddings import (
    CLIP_G,
    CLIP_L,
    apply_embeddings,
    embeddings_used,
    read_embedding,
    read_embeddings,
)
from ember.errors import EmberError
from test_sdxl import assert_close, diffusers_image, ember_image, generated

WIDTH_L, WIDTH_G = 64, 128  # the tiny SDXL's CLIP-L and bigG widths
PROMPT = "a red circle left of a xlemb blue square"


def write_sdxl_embedding(path, width_l: int = WIDTH_L, width_g: int = WIDTH_G, n: int = 2):
    """A random SDXL embedding; vectors large enough to move the tiny model's image."""
    gen = torch.Generator().manual_seed(11)
    parts = {
        CLIP_L: torch.randn(n, width_l, generator=gen),
        CLIP_G: torch.randn(n, width_g, generator=gen),
    }
    if path.suffix == ".pt":
        torch.save(parts, path)
    else:
        save_file(parts, str(path))
    return parts


def tables(loaded) -> list[torch.nn.Parameter]:
    return [encoder.token_embedding().weight for encoder in loaded.model.text_encoders]


@pytest.fixture(scope="module")
def loaded(sdxl_folder):
    return checkpoints.load_model(sdxl_folder)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-embeddings")
    write_sdxl_embedding(folder / "xlemb.safetensors")
    return folder


@pytest.fixture(scope="module")
def reference(sdxl_folder, emb_dir) -> np.ndarray:
    """diffusers' image with the embedding loaded into both encoders, each its own part."""
    parts = load_file(str(emb_dir / "xlemb.safetensors"))

    def load_both(pipe):
        pipe.load_textual_inversion(
            parts[CLIP_L], token="xlemb", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            parts[CLIP_G], token="xlemb", text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )  # fmt: skip

    return diffusers_image(sdxl_folder, prompt=PROMPT, prepare=load_both)


def test_sdxl_embedding_matches_diffusers_in_both_encoders(loaded, emb_dir, reference):
    from ember.conditioning import encode_sdxl_prompt

    emb = read_embedding(emb_dir / "xlemb.safetensors")
    plain = generated(loaded, PROMPT)
    plain_context, plain_pooled = encode_sdxl_prompt(loaded, PROMPT)
    before = tables(loaded)
    copies = [t.detach().clone() for t in before]
    applied = apply_embeddings(loaded, [emb])
    try:
        assert applied.skipped == {} and applied.names == ["xlemb"]
        # each encoder's new rows are its own part of the file
        for weight, old, part in zip(tables(loaded), copies, (CLIP_L, CLIP_G), strict=True):
            assert torch.equal(weight[: len(old)], old)
            assert torch.equal(weight[len(old) :], emb.vectors[part])
        got = generated(loaded, PROMPT)
        context, pooled = encode_sdxl_prompt(loaded, PROMPT)
        assert embeddings_used(PROMPT, applied) == ["xlemb"]
    finally:
        applied.remove()
    assert_close(got, reference, "SDXL embedding")
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 10, "the embedding changes nothing"
    # both encoders read it: each half of the context moves, and bigG's pooled output
    assert not torch.allclose(context[..., :WIDTH_L], plain_context[..., :WIDTH_L])
    assert not torch.allclose(context[..., WIDTH_L:], plain_context[..., WIDTH_L:])
    assert not torch.allclose(pooled, plain_pooled)
    # remove(): both tables are the very tensors they were, unchanged, and both tokenizers forget
    for weight, old, copy in zip(tables(loaded), before, copies, strict=True):
        assert weight is old and torch.equal(weight, copy)
    assert [t.added_words for t in loaded.tokenizers] == [{}, {}]
    assert (generated(loaded, PROMPT) == plain).all(), "remove() must restore the model exactly"


def test_ember_generate_with_an_sdxl_embedding_records_ti_hashes(
    tmp_path, sdxl_folder, emb_dir, reference
):
    """Through the CLI (the service applies the embeddings folder): diffusers' image, and A1111's
    `TI hashes` (the whole file's sha256, 12 digits) in the infotext and the record."""
    from ember.images import INFOTEXT_KEY, read_png_text, read_record

    got = ember_image(tmp_path, sdxl_folder, "euler", "--embeddings-dir", str(emb_dir),
                      prompt=PROMPT, name="xl.png")  # fmt: skip
    assert_close(got, reference, "SDXL embedding through ember generate")
    sha = hashlib.sha256((emb_dir / "xlemb.safetensors").read_bytes()).hexdigest()
    pairs = read_png_text(tmp_path / "xl.png")[INFOTEXT_KEY].splitlines()[-1]
    assert f'TI hashes: "xlemb: {sha[:12]}"' in pairs, pairs
    assert [(e["name"], e["sha256"]) for e in read_record(tmp_path / "xl.png").embeddings] == [
        ("xlemb", sha)
    ]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_read_sdxl_embedding_and_ti_hash(tmp_path, suffix):
    path = tmp_path / f"xlemb{suffix}"
    parts = write_sdxl_embedding(path, n=3)
    emb = read_embedding(path)
    assert sorted(emb.vectors) == [CLIP_G, CLIP_L]
    assert all(torch.equal(emb.vectors[p], parts[p]) for p in parts)
    assert (emb.n_vectors, emb.widths) == (3, {CLIP_L: WIDTH_L, CLIP_G: WIDTH_G})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()  # A1111: the whole file, as for SD 1.x
    assert (emb.sha256, emb.a1111_hash) == (sha, sha[:12])


def assert_skipped_and_named_is_an_error(applied, name: str, *words: str) -> None:
    assert applied.names == [] and set(applied.skipped) == {name}
    why = applied.skipped[name]
    assert "\n" not in why and all(w in why for w in words), why
    with pytest.raises(EmberError) as info:
        embeddings_used(f"a photo of {name}", applied)
    assert str(info.value) == why
    assert embeddings_used("a photo of a cat", applied) == []


def test_sd1_embedding_on_sdxl_is_skipped(loaded, tmp_path):
    """A single-tensor embedding as wide as CLIP-L still does not fit SDXL (A1111 compares its
    width with both encoders' together); the model is left as it was."""
    save_file({"emb_params": torch.randn(2, WIDTH_L)}, str(tmp_path / "oldemb.safetensors"))
    before = tables(loaded)
    embs, bad = read_embeddings(tmp_path)
    assert bad == {}
    applied = apply_embeddings(loaded, embs)
    assert_skipped_and_named_is_an_error(
        applied, "oldemb", "SD 1.x/2.x, 64 wide", "SDXL (clip_l 64, clip_g 128 wide)"
    )
    assert all(a is b for a, b in zip(tables(loaded), before, strict=True))
    assert [t.added_words for t in loaded.tokenizers] == [{}, {}]
    applied.remove()


def test_sdxl_embedding_on_sd1_is_skipped(sd1_folder, tmp_path):
    """Even with a clip_l part as wide as the SD 1.x encoder (32 in the tiny preset)."""
    write_sdxl_embedding(tmp_path / "xlemb.safetensors", width_l=32)
    sd1 = checkpoints.load_model(sd1_folder)
    before = tables(sd1)
    applied = apply_embeddings(sd1, read_embeddings(tmp_path)[0])
    assert_skipped_and_named_is_an_error(
        applied, "xlemb", "SDXL (clip_l 32, clip_g 128 wide)", "SD 1.x/2.x, 32 wide"
    )
    assert tables(sd1) == before and sd1.tokenizer.added_words == {}


def test_the_refiner_takes_clip_g(tmp_path_factory, tmp_path):
    """The refiner has bigG alone: it takes the clip_g part (ComfyUI's rule)."""
    from conftest import build_sdxl_folder

    folder = build_sdxl_folder(tmp_path_factory.mktemp("refiner") / "tiny-refiner", refiner=True)
    refiner = checkpoints.load_model(folder)
    parts = write_sdxl_embedding(tmp_path / "xlemb.safetensors")
    (before,) = tables(refiner)
    applied = apply_embeddings(refiner, [read_embedding(tmp_path / "xlemb.safetensors")])
    assert applied.names == ["xlemb"]
    (weight,) = tables(refiner)
    assert torch.equal(weight[len(before) :], parts[CLIP_G])
    assert refiner.tokenizer.added_words == {"xlemb": (len(before), len(before) + 1)}
    applied.remove()
    assert tables(refiner)[0] is before
