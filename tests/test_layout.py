"""Layout guidance: the prompt analysis, the energy, and what generation does with them."""

import dataclasses
import json

import pytest
import torch

from ember.checkpoints import load_model
from ember.config import TextConfig
from ember.diffusion.layout import (
    Count,
    Region,
    box_mask,
    count_energy,
    guided_layers,
    layout_energy,
    record_attention,
)
from ember.errors import EmberError
from ember.models.tokenizer import build_clip_tokenizer
from ember.pipeline import generate
from ember.prompts import layout_from_prompt
from ember.settings import GenerationParams
from pngcheck import same_image

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
TOP, BOTTOM = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(TextConfig())


def _named(prompt, tokenizer, regions):
    """The words at each region's token positions, decoded back from the framed ids."""
    ids = tokenizer.encode_padded(prompt)
    return [[ids[i] for i in r.tokens] for r in regions]


@pytest.mark.parametrize(
    ("prompt", "subject", "obj", "boxes"),
    [
        ("a red circle left of a blue square on a white background", "circle", "square",
         (LEFT, RIGHT)),
        ("A photo of a cat to the right of a dog, sharp focus", "cat", "dog", (RIGHT, LEFT)),
        ("an orange heart above a blue circle", "heart", "circle", (TOP, BOTTOM)),
        ("a pink triangle below an orange star on a black background", "triangle", "star",
         (BOTTOM, TOP)),
        ("a cup on the left of a slice of pizza with cheese", "cup", "pizza", (LEFT, RIGHT)),
    ],
)  # fmt: skip
def test_relation_prompts_name_their_objects_and_boxes(tokenizer, prompt, subject, obj, boxes):
    regions = layout_from_prompt(prompt, tokenizer)
    assert [r.box for r in regions] == list(boxes)
    assert _named(prompt, tokenizer, regions) == [
        tokenizer.encode(subject),
        tokenizer.encode(obj),
    ]


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle and a blue square on a white background",  # no relation
        "a slice of pizza, twemoji style",
        "a (red:1.3) circle left of a blue square",  # emphasis changes tokenisation: left alone
        "left of a blue square",  # no subject
        "a red circle left of",  # no object
        "two white crosses on a black background",  # two objects go anywhere in the shapes world
        "four white stars on a blue background",  # four fill every quadrant
        "a smiling face with smiling eyes and three hearts, noto style",  # part of one drawing
        "three o'clock",  # counts nothing
        "three, on a white background",  # no counted phrase
    ],
)
def test_prompts_without_a_plain_relation_or_count_get_no_layout(tokenizer, prompt):
    assert layout_from_prompt(prompt, tokenizer) == []


@pytest.mark.parametrize(
    ("prompt", "word"),
    [
        ("three red squares on a white background", "squares"),
        ("3 small brown cats, watercolour", "cats"),
        ("three hearts", "hearts"),
    ],
)
def test_prompts_that_start_with_three_count_their_plural(tokenizer, prompt, word):
    regions = layout_from_prompt(prompt, tokenizer)
    assert [(type(r), r.n) for r in regions] == [(Count, 3)]
    assert _named(prompt, tokenizer, regions) == [tokenizer.encode(word)]


def test_count_energy_empties_the_emptiest_quadrant_and_fills_the_others():
    # 4x4 map: quadrant shares (top-left, top-right, bottom-left, bottom-right)
    def spread(shares):
        a = torch.zeros(4, 4)
        a[:2, :2], a[:2, 2:], a[2:, :2], a[2:, 2:] = (s / 4 for s in shares)
        return a.flatten()

    assert count_energy(spread([1 / 3, 1 / 3, 0, 1 / 3]), 3, 4, 4).item() == pytest.approx(0.0)
    assert count_energy(spread([0.25] * 4), 3, 4, 4).item() == pytest.approx(0.0625)
    assert count_energy(spread([0.4, 0.3, 0.2, 0.1]), 3, 4, 4).item() == pytest.approx(0.01)
    # all in one quadrant: two of the other three hold none of the 1/6 each should reach
    assert count_energy(spread([1, 0, 0, 0]), 3, 4, 4).item() == pytest.approx(2 / 36)
    # as a layout region: the tokens' attention is renormalised, then the same energy
    probs = torch.stack([spread([0.4, 0.3, 0.2, 0.1]) * 0.5, torch.full((16,), 0.5 / 16)], dim=1)
    assert layout_energy(probs, [Count((0,), 3)], 4, 4).item() == pytest.approx(0.01)


def test_box_mask_and_energy_measure_attention_inside_the_box():
    assert box_mask(LEFT, 2, 4).tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert box_mask(TOP, 2, 2).tolist() == [1, 1, 0, 0]
    probs = torch.zeros(4, 3)  # 2x2 map, 3 tokens
    probs[0, 1] = probs[2, 1] = 0.5  # token 1 all in the left column
    probs[1, 2] = probs[3, 2] = 0.5  # token 2 all in the right column
    inside = [Region((1,), LEFT), Region((2,), RIGHT)]
    swapped = [Region((1,), RIGHT), Region((2,), LEFT)]
    assert layout_energy(probs, inside, 2, 2).item() == pytest.approx(0.0)
    assert layout_energy(probs, swapped, 2, 2).item() == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return load_model(tiny_model_file)


@pytest.mark.parametrize("prompt", ["a red circle left of a blue square", "three red squares"])
def test_one_guidance_step_lowers_the_energy(tiny, prompt):
    """The gradient step generation takes moves the attention of each object towards its layout."""
    from ember.diffusion.denoisers import Conditioning, EpsDenoiser
    from ember.diffusion.layout import LayoutGuidedDenoiser
    from ember.pipeline import encode_text

    regions = layout_from_prompt(prompt, tiny.tokenizer)
    unet = tiny.model.model.diffusion_model
    layers = guided_layers(unet)
    cond = Conditioning(encode_text(tiny, GenerationParams(prompt=prompt))[0])
    inner = EpsDenoiser(lambda x, t, c: unet(x, t, c), tiny.config.schedule)
    side = tiny.config.size // tiny.config.vae.downsample
    guided = LayoutGuidedDenoiser(
        inner, inner, layers, [regions], strength=1.0, sigma_stop=0.0, latent_hw=(side, side)
    )
    x = torch.randn(
        1, tiny.config.vae.embed_dim, side, side, generator=torch.Generator().manual_seed(0)
    )
    sigma = torch.tensor([5.0])

    def energy(latent):
        with torch.no_grad(), record_attention(layers) as maps:
            inner(latent, sigma, cond)
        return sum(layout_energy(m[0], regions, *_hw(m.shape[1])) for m in maps).item()

    grad = guided.energy_grad(x, sigma, cond)
    assert grad.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    # a small step: a count's energy follows whichever quadrant is emptiest, so it is not smooth
    assert energy(x - 0.01 * grad) < energy(x) < energy(x + 0.01 * grad)


def _hw(n):
    side = int(n**0.5)
    return side, side


def _params(prompt="a red circle left of a blue square", **kw):
    base = dict(sampler="euler", steps=4, cfg=3.0, seed=1, width=64, height=64)
    return GenerationParams(prompt=prompt, **{**base, **kw})


def _image(loaded, **kw):
    return generate(loaded, _params(**kw))


def test_guidance_changes_relation_and_count_prompts_and_nothing_else(tiny):
    plain = _image(tiny)
    assert torch.equal(_image(tiny, layout_guidance=0.0), plain)
    assert (_image(tiny, layout_guidance=2.0) - plain).abs().max() > 1e-3
    three = "three red squares"
    assert (
        _image(tiny, prompt=three, layout_guidance=2.0) - _image(tiny, prompt=three)
    ).abs().max() > 1e-3
    # A prompt without a relation or count gets the very same image with or without guidance.
    for other in ("a red circle and a blue square", "two red squares"):
        assert torch.equal(
            _image(tiny, prompt=other), _image(tiny, prompt=other, layout_guidance=2.0)
        )


def test_guidance_strength_out_of_range_is_refused(tiny):
    with pytest.raises(EmberError, match="layout guidance 11"):
        _image(tiny, layout_guidance=11.0)
    with pytest.raises(EmberError, match="layout guidance"):
        _image(tiny, layout_guidance=float("nan"))


def test_batched_requests_keep_their_own_images(tiny):
    """A relation prompt batched with a plain one: each image is what it would be alone."""
    from ember.pipeline import generate_batch

    rel = _params(layout_guidance=2.0)
    other = dataclasses.replace(rel, prompt="a green star right of a black heart", seed=7)
    plain = dataclasses.replace(rel, prompt="a red circle and a blue square", seed=3)
    both = generate_batch(tiny, [rel, other, plain])
    for params, image in zip([rel, other, plain], both, strict=True):
        torch.testing.assert_close(image, generate(tiny, params), atol=1e-4, rtol=0)


def test_cli_records_the_strength_and_regenerates_the_same_png(tmp_path, tiny_model_file, capsys):
    from PIL import Image

    from ember.cli import main

    def run(*extra):
        return main(["generate", "a red circle left of a blue square", "--model",
                     str(tiny_model_file), "--steps", "3", "-q", *extra])  # fmt: skip

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run("--layout-guidance", "2", "-o", str(a)) == 0
    text = Image.open(a).text
    assert json.loads(text["ember"])["params"]["layout_guidance"] == 2.0
    assert "Layout guidance: 2" in text["parameters"]
    assert main(["generate", "--from", str(a), "-q", "-o", str(b)]) == 0
    assert same_image(a, b)
    # The tiny preset records no strength of its own: off unless asked for.
    assert run("-o", str(b)) == 0
    assert json.loads(Image.open(b).text["ember"])["params"]["layout_guidance"] == 0.0
    capsys.readouterr()
    assert run("--layout-guidance", "-1", "-o", str(tmp_path / "c.png")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layout guidance -1" in err
    assert not (tmp_path / "c.png").exists()


def test_ember_models_default_to_guidance_and_files_can_record_their_own():
    from ember.config import EMBER_SMALL_LAYOUT, ModelConfig, get_preset

    bundled_era = json.loads(get_preset("ember-small-z8p").to_json())
    del bundled_era["layout_guidance"]  # files written before the field existed
    assert ModelConfig.from_json(json.dumps(bundled_era)).default_layout_guidance == (
        EMBER_SMALL_LAYOUT
    )
    assert get_preset("sd15").default_layout_guidance == 0.0
    custom = {**bundled_era, "name": "my-model", "layout_guidance": 0.5}
    assert ModelConfig.from_json(json.dumps(custom)).default_layout_guidance == 0.5
    del custom["layout_guidance"]
    assert ModelConfig.from_json(json.dumps(custom)).default_layout_guidance == 0.0
