"""The one definition of the generation settings: what every front-end derives from it."""

from __future__ import annotations

import dataclasses

import pytest

from ember.cli import build_parser
from ember.config import PRESETS
from ember.errors import EmberError
from ember.settings import (
    FIELDS,
    SERVER_LIMITS,
    GenerationParams,
    LoraChoice,
    batch_key,
    resolve,
    validate,
)

# A value inside each field's range that differs from its default.
OTHER = {"prompt": "x", "negative_prompt": "y", "sampler": "euler", "schedule": "karras", "timestep_spacing": "trailing",
         "steps": 7, "cfg": 3.0, "seed": 5, "width": 256, "height": 128, "batch": 2,
         "strength": 0.5, "clip_skip": 2, "layout_guidance": 1.5, "eta": 0.3,
         "loras": (LoraChoice("style", 0.5, 0.8),), "original_width": 1024,
         "original_height": 768, "crop_left": 16, "crop_top": 8, "refiner": "refiner",
         "refiner_switch_at": 0.7, "tome": 0.5, "deepcache": 3,
         "vae_tiling": "on"}  # fmt: skip
# A value outside each numeric field's range.
BAD = {"steps": 0, "cfg": 101.0, "seed": 2**32, "width": 100, "height": 4096, "batch": 65,
       "strength": 1.5, "clip_skip": 13, "layout_guidance": 11.0, "eta": -1.0,
       "original_width": 0, "crop_top": -1, "refiner_switch_at": 1.5, "tome": 0.8,
       "deepcache": 0}  # fmt: skip

BASE = GenerationParams(
    "a red circle", sampler="dpmpp_2m", steps=20, width=64, height=64, cfg=5.0, layout_guidance=0.0
)


def test_every_field_has_help_and_the_tables_above_cover_it():
    assert set(OTHER) == set(FIELDS)
    assert all(f.metadata["help"] for f in FIELDS.values())


@pytest.mark.parametrize("name", list(FIELDS))
def test_batch_key_changes_exactly_with_the_shared_fields(name):
    other = dataclasses.replace(BASE, **{name: OTHER[name]})
    assert (batch_key(other) != batch_key(BASE)) == FIELDS[name].metadata["shared"]


def test_lora_tags_in_the_prompt_are_part_of_the_batch_key():
    tagged = dataclasses.replace(BASE, prompt="a red circle <lora:style:0.7>")
    assert batch_key(tagged) != batch_key(BASE)
    same = dataclasses.replace(BASE, prompt="a blue circle <lora:style:0.7>")
    assert batch_key(same) == batch_key(tagged)
    with pytest.raises(EmberError, match="hypernet"):
        validate(dataclasses.replace(BASE, prompt="<hypernet:x:1>"))
    with pytest.raises(EmberError, match="weight"):
        validate(dataclasses.replace(BASE, prompt="<lora:x:nan>"))


def test_layout_guidance_and_guidance_are_shared():
    """The pipeline runs one guidance setting per batch (the server's batch-key bug)."""
    assert FIELDS["layout_guidance"].metadata["shared"] and FIELDS["cfg"].metadata["shared"]


@pytest.mark.parametrize("name", list(BAD))
def test_validate_refuses_out_of_range_values_naming_the_field(name):
    with pytest.raises(EmberError, match=name.replace("_", " ")):
        validate(dataclasses.replace(BASE, **{name: BAD[name]}))


def test_server_limits_are_lower_and_named():
    big = dataclasses.replace(BASE, steps=200)
    assert validate(big).steps == 200
    with pytest.raises(EmberError, match="steps 200 is not allowed: use 1 to 150"):
        validate(big, SERVER_LIMITS)
    with pytest.raises(EmberError, match="prompt of 4001 characters"):
        validate(dataclasses.replace(BASE, prompt="x" * 4001), SERVER_LIMITS)
    with pytest.raises(EmberError, match="over the limit of 1048576 pixels"):
        validate(dataclasses.replace(BASE, width=2048, height=1024), SERVER_LIMITS)


def test_validate_resolves_a1111_sampler_names():
    p = validate(dataclasses.replace(BASE, sampler="DPM++ 2M Karras"))
    assert (p.sampler, p.schedule) == ("dpmpp_2m", "karras")
    with pytest.raises(EmberError, match="sampler"):
        validate(dataclasses.replace(BASE, sampler="nope"))


def test_resolve_fills_the_models_defaults_once_and_keeps_what_was_given():
    model = PRESETS["ember-small"]
    p = resolve(GenerationParams("x"), model)
    assert (p.width, p.height, p.cfg, p.layout_guidance) == (64, 64, 5.0, 2.0)
    sd = resolve(GenerationParams("x"), PRESETS["sd15"])
    assert (sd.width, sd.cfg, sd.layout_guidance) == (512, 7.0, 0.0)
    given = GenerationParams("x", width=128, cfg=1.0, layout_guidance=0.0)
    assert resolve(given, model) == dataclasses.replace(
        given, height=64, sampler="dpmpp_2m", steps=20
    )
    drawn = resolve(GenerationParams("x", seed=-1), model)
    assert 0 <= drawn.seed < 2**32 and resolve(drawn, model) == drawn
    with pytest.raises(EmberError, match="cfg is not set"):
        validate(dataclasses.replace(BASE, cfg=None))
    assert (p.sampler, p.steps, p.timestep_spacing) == ("dpmpp_2m", 20, None)
    turbo = dataclasses.replace(
        PRESETS["sd21-base"], sampler="euler", steps=1, guidance=1.0, timestep_spacing="trailing"
    )
    t = resolve(GenerationParams("x"), turbo)
    assert (t.sampler, t.steps, t.cfg, t.timestep_spacing) == ("euler", 1, 1.0, "trailing")
    assert resolve(GenerationParams("x", steps=4), turbo).steps == 4


def test_spacing_names_and_a1111_sgm_uniform():
    p = validate(dataclasses.replace(BASE, schedule="SGM Uniform"))
    assert (p.schedule, p.timestep_spacing) == ("default", "trailing")
    with pytest.raises(EmberError, match="spacing"):
        validate(dataclasses.replace(BASE, timestep_spacing="sideways"))
    with pytest.raises(EmberError, match="default schedule"):
        validate(dataclasses.replace(BASE, schedule="karras", timestep_spacing="trailing"))
    with pytest.raises(EmberError, match="lcm"):
        validate(dataclasses.replace(BASE, sampler="lcm", steps=51))


def _generate_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["generate"]


def test_cli_flags_are_generated_from_the_fields():
    gen = _generate_parser()
    flags = {o: a for a in gen._actions for o in a.option_strings}
    for name, f in FIELDS.items():
        if name in ("prompt", "width", "height"):
            continue
        flag = f.metadata["flag"] or "--" + name.replace("_", "-")
        assert flag in flags, name
        assert f.metadata["help"] in flags[flag].help, name
    assert "--size" in flags
    args = gen.parse_args(
        [
            "p",
            "--cfg",
            "3",
            "--size",
            "96x32",
            "--negative",
            "n",
            "--eta",
            "0",
            "--lora",
            "a.safetensors",
            "--lora",
            "C:/x/b.safetensors:0.5:0.25",
        ]
    )
    from ember.settings import params_from_args

    p = params_from_args(args)
    assert (p.prompt, p.cfg, p.width, p.height, p.negative_prompt, p.eta) == (
        "p",
        3.0,
        96,
        32,
        "n",
        0,
    )
    assert p.steps is None and p.layout_guidance is None  # left to the model
    assert p.loras == (LoraChoice("a.safetensors"), LoraChoice("C:/x/b.safetensors", 0.5, 0.25))


def test_job_request_model_is_generated_from_the_fields():
    from ember.server.app import JobRequest

    schema = JobRequest.model_json_schema()["properties"]
    for name, f in FIELDS.items():
        assert name in schema
        assert schema[name].get("description") == f.metadata["help"]
    assert {"mode", "init_image", "mask", "model"} <= set(schema)
    assert JobRequest().seed == -1  # a job without a seed gets a random one
