"""The bundled default model: present, small, licensed on record, and used with no flags."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ember.catalog import DEFAULT_MODEL
from ember.checkpoints import file_hashes
from ember.cli import main

CARD = DEFAULT_MODEL.parent / "model_card.json"


def test_bundled_model_is_small_and_its_card_matches_it():
    # weights, card and eval sheets together within 60 MB
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.parent.iterdir()) <= 60_000_000
    card = json.loads(CARD.read_text())
    assert card["sha256"] == file_hashes(DEFAULT_MODEL)[0]
    assert {s["part"] for s in card["stages"]} == {"vae", "unet"}
    for stage in card["stages"]:
        data = stage["data"]
        assert data["unlicensed_images"] == 0
        assert {s["spdx"] for s in data["sources"]} <= {"CC0-1.0", "Apache-2.0", "CC-BY-4.0"}
    # the training budget: everything (VAE + U-Net, every stage, with the U-Net's latent and
    # text caching) within 4 hours of the 2-core CPU
    for stage in card["stages"]:
        assert stage["cost"]["cache_wall_seconds"] is not None
    total = sum(s["cost"]["wall_seconds"] + s["cost"]["cache_wall_seconds"] for s in card["stages"])
    assert card["total_wall_seconds"] == pytest.approx(total)
    assert card["total_wall_seconds"] <= 4 * 3600
    text = (DEFAULT_MODEL.parent / "MODEL_CARD.md").read_text()
    assert "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0" in text


def test_generate_with_no_model_flag_uses_the_bundled_model(tmp_path):
    out = tmp_path / "p.png"
    assert (
        main(["generate", "a slice of pizza, twemoji style", "--steps", "4", "-q", "-o", str(out)])
        == 0
    )
    img = Image.open(out)
    assert img.size == (64, 64)
    assert np.asarray(img).std() > 5, "a flat image"
    card = json.loads(CARD.read_text())
    record = json.loads(img.text["ember"])
    assert record["model_name"] == card["name"] == "ember-small"
    assert record["model_sha256"] == card["sha256"]
    assert record["params"]["cfg"] == 5.0  # the guidance its evaluation scores are measured at
    # ... and the layout guidance: what a user gets by default is what the card's scores measure
    shapes_eval = card["evaluation"]["geneval in-distribution"]
    assert record["params"]["layout_guidance"] == shapes_eval["layout_guidance"] > 0


def test_penultimate_minilm_model_round_trips_through_diffusers(tmp_path):
    # Preset ember-small-z8p reads MiniLM's fifth layer. Its diffusers folder holds a 5-layer BERT
    # (diffusers pipelines take the last hidden state) and generates the same image as the file.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(DEFAULT_MODEL), "pt") as f:
        meta = dict(f.metadata())
    weights = load_file(DEFAULT_MODEL)

    def variant(layer: str | int) -> Path:  # the bundled weights, reading MiniLM at `layer`
        cfg = json.loads(meta["ember_config"])
        cfg["text"]["layer"] = layer
        path = tmp_path / f"{layer}.safetensors"
        save_file(weights, path, meta | {"ember_config": json.dumps(cfg)})
        return path

    single, last = variant("penultimate"), variant("last")
    folder = tmp_path / "pen-diffusers"
    assert main(["convert", str(single), str(folder), "--format", "diffusers"]) == 0
    hf = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert hf["num_hidden_layers"] == 5
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("encoder.layer.5.")]
    images = []
    for model in (single, folder, last):
        out = tmp_path / f"{model.name}.png"
        args = ["generate", "a red circle left of a blue square", "--model", str(model)]
        assert (
            main([*args, "--steps", "4", "--seed", "3", "-q", "--no-watermark", "-o", str(out)])
            == 0
        )
        images.append(np.asarray(Image.open(out).convert("RGB")).astype(int))
    # The same image up to one rounding step: the folder's truncated encoder and the file's full one
    # round differently on some CPUs (seen on an AVX2-only EPYC), and layout guidance's backward
    # pass can carry that into a pixel. The model's pixels: the watermark's lattice could turn one
    # such step into a few grey levels.
    assert np.abs(images[0] - images[1]).max() <= 1
    assert np.abs(images[0] - images[2]).max() > 1, "the layer choice changed nothing"
    # A numbered layer (here the fourth) exports the four layers it uses.
    fourth = variant(4)
    folder4 = tmp_path / "l4-diffusers"
    assert main(["convert", str(fourth), str(folder4), "--format", "diffusers"]) == 0
    assert (
        json.loads((folder4 / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 4
    )
    with safe_open(str(folder4 / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(("encoder.layer.4.", "encoder.layer.5."))]
    pair = []
    for model in (fourth, folder4):
        out = tmp_path / f"{model.name}-4.png"
        args = ["generate", "a red circle left of a blue square", "--model", str(model)]
        assert (
            main([*args, "--steps", "4", "--seed", "3", "-q", "--no-watermark", "-o", str(out)])
            == 0
        )
        pair.append(np.asarray(Image.open(out).convert("RGB")).astype(int))
    assert np.abs(pair[0] - pair[1]).max() <= 1
    assert np.abs(pair[0] - images[0]).max() > 1
