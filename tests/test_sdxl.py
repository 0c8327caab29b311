"""SDXL against diffusers: a tiny random SDXL pipeline built by diffusers (`conftest.build_sdxl_folder`)
gives the same images in ember as in `StableDiffusionXL(Img2Img|Inpaint)Pipeline`, from the folder
and from its single-file conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ember.cli import main

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle left of a blue square"
NEGATIVE = "blurry"
WIDTH, HEIGHT = 64, 48  # non-square: height and width must not be swapped anywhere
STEPS = 5
CFG = 5.0
SEED = 1234

SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}),
}


def _uint8(images) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def diffusers_image(folder, sampler="euler", *, mode="txt2img", negative=NEGATIVE, **kwargs):
    cls = {
        "txt2img": diffusers.StableDiffusionXLPipeline,
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
    }[mode]
    pipe = cls.from_pretrained(folder)
    name, overrides = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    if mode == "txt2img":
        kwargs.update(height=HEIGHT, width=WIDTH)
    out = pipe(
        prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kwargs,
    ).images[0]  # fmt: skip
    return _uint8(out)


def ember_image(tmp_path, model, sampler="euler", *extra, negative=NEGATIVE, name="e.png"):
    out = tmp_path / name
    args = ["generate", PROMPT, "--model", str(model), "--sampler", sampler, "--steps", str(STEPS)]
    args += ["--cfg", str(CFG), "--seed", str(SEED), "--size", f"{WIDTH}x{HEIGHT}"]
    args += ["--negative", negative] if negative else []
    args += ["--dtype", "fp32", "-o", str(out), "-q", *extra]
    assert main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def assert_close(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 2, f"{what}: max pixel difference {diff}/255"
    assert ref.std() > 1, "reference image is flat: the comparison would prove nothing"


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(tmp_path, sdxl_folder, sampler):
    ref = diffusers_image(sdxl_folder, sampler)
    assert_close(ember_image(tmp_path, sdxl_folder, sampler), ref, sampler)


def test_micro_conditioning_and_empty_negative_match_diffusers(tmp_path, sdxl_folder):
    """Explicit original size and crop reach label_emb as diffusers sends them; an empty negative
    is zeros (diffusers' force_zeros_for_empty_prompt), not the encoding of ""."""
    ref = diffusers_image(
        sdxl_folder, negative=None, original_size=(96, 128), crops_coords_top_left=(8, 16)
    )
    args = ["--original-width", "128", "--original-height", "96"]
    args += ["--crop-top", "8", "--crop-left", "16"]
    got = ember_image(tmp_path, sdxl_folder, "euler", *args, negative="")
    assert_close(got, ref, "micro-conditioning")
    plain = ember_image(tmp_path, sdxl_folder, "euler", negative="", name="plain.png")
    assert np.abs(plain.astype(int) - got.astype(int)).max() > 2, "the size numbers changed nothing"


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    init = (rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[8:40, 16:48] = 255
    Image.fromarray(init).save(folder / "init.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def test_img2img_matches_diffusers(tmp_path, sdxl_folder, init_and_mask):
    init, _ = init_and_mask
    ref = diffusers_image(sdxl_folder, mode="img2img", image=Image.open(init), strength=0.6)
    got = ember_image(
        tmp_path, sdxl_folder, "euler", "--init-image", str(init), "--strength", "0.6"
    )
    assert_close(got, ref, "img2img")


def test_inpainting_matches_diffusers(tmp_path, sdxl_folder, init_and_mask):
    init, mask = init_and_mask
    ref = diffusers_image(
        sdxl_folder, mode="inpaint", image=Image.open(init), mask_image=Image.open(mask),
        strength=0.75, height=HEIGHT, width=WIDTH,
    )  # fmt: skip
    args = ["--init-image", str(init), "--mask", str(mask), "--strength", "0.75"]
    got = ember_image(tmp_path, sdxl_folder, "euler", *args)
    assert_close(got, ref, "inpainting")


# ---------------------------------------------------------------------------------------------
# files: single file <-> diffusers folder, what the tensors tell


def test_single_file_round_trip_gives_the_same_image_and_diffusers_reads_it(tmp_path, sdxl_folder):
    single = tmp_path / "xl.safetensors"
    assert main(["convert", str(sdxl_folder), str(single), "--format", "single-file"]) == 0
    tensors = load_file(single)
    # Stability's names: CLIP-L in the transformers layout, bigG in OpenCLIP's, label_emb.
    for key in ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "model.diffusion_model.label_emb.0.0.weight"):  # fmt: skip
        assert key in tensors
    # As other tools write it, without ember's metadata: the config comes from the tensors alone.
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    back = tmp_path / "back"
    assert main(["convert", str(bare), str(back), "--format", "diffusers"]) == 0
    ref = ember_image(tmp_path, sdxl_folder, name="ref.png")
    for model in (single, bare, back):
        assert (ember_image(tmp_path, model, name=f"{model.name}.png") == ref).all(), model.name
    # diffusers' own single-file loader reads the export (offline: configs from a local folder).
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(bare), config=str(back))
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, part).state_dict(), getattr(theirs, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in b), part


def test_distilled_depths_read_from_tensors_and_diffusers_configs():
    """SSD-1B and Vega drop transformer blocks unevenly: every block's depth is read back from
    the tensors, and written to and read from diffusers' config (reverse_transformer_layers...)."""
    from ember.config import UNetConfig
    from ember.keymaps import (
        unet_config_from_diffusers,
        unet_config_to_diffusers,
        unet_ldm_to_diffusers,
    )
    from ember.models.ldm import DiffusionWrapper
    from ember.models.unet import UNetModel
    from ember.sdxl_files import unet_config_from_tensors

    cfg = UNetConfig(
        model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
        num_head_channels=64, context_dim=192, use_linear_in_transformer=True,
        transformer_depth_input=(0, 0, 1, 2, 2, 3), transformer_depth_middle=2,
        transformer_depth_output=(3, 2, 1, 2, 1, 1, 0, 0, 0), adm_in_channels=128 + 6 * 256,
    )  # fmt: skip
    with torch.device("meta"):
        ours = DiffusionWrapper(UNetModel(cfg)).state_dict()
    assert unet_config_from_tensors({"model." + k: v for k, v in ours.items()}) == cfg
    conf = unet_config_to_diffusers(cfg)
    assert unet_config_from_diffusers(conf) == cfg
    names = {k: v for k, v in conf.items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**names).state_dict()
    local = {k[len("diffusion_model.") :]: v for k, v in ours.items()}
    mapped = unet_ldm_to_diffusers(local, cfg)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


# ---------------------------------------------------------------------------------------------
# prompts: A1111 syntax on both encoders


@pytest.fixture(scope="module")
def loaded(sdxl_folder):
    from ember.checkpoints import load_model

    return load_model(sdxl_folder)


def test_prompt_syntax_reaches_both_encoders(loaded):
    from ember.conditioning import encode_sdxl_prompt, encode_sdxl_prompts

    plain, pooled = encode_sdxl_prompt(loaded, "a cat")
    assert plain.shape == (1, 77, 64 + 128) and pooled.shape == (1, 128)
    # BREAK: two 77-token windows, each encoded on its own, side by side in the context.
    broken, broken_pooled = encode_sdxl_prompt(loaded, "a cat BREAK a dog")
    dog, _ = encode_sdxl_prompt(loaded, "a dog")
    assert torch.allclose(broken, torch.cat([plain, dog], dim=1), atol=1e-6)
    assert torch.allclose(broken_pooled, pooled, atol=1e-6)  # the first window's, as A1111 pools
    # Emphasis changes both encoders' halves of the context.
    weighted, _ = encode_sdxl_prompt(loaded, "a (cat:1.5)")
    for half in (slice(0, 64), slice(64, None)):
        assert not torch.allclose(weighted[..., half], plain[..., half])
    # A long prompt takes as many windows on both; the negative is padded to the same length.
    cond, uncond, _, _ = encode_sdxl_prompts(loaded, "a cat, " * 40, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 192)
    # An empty negative is zeros, context and pooled.
    _, zeros, _, zero_pooled = encode_sdxl_prompts(loaded, "a cat", "")
    assert not zeros.any() and not zero_pooled.any()
