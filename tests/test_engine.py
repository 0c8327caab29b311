"""The whole engine against diffusers: same folder, prompt, seed and sampler give the same image.

A tiny SD-1.x-shaped pipeline with random weights is built by diffusers itself and saved as a
diffusers folder; ember loads that folder (and its single-file conversion) through the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ember.cli import main

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle left of a blue square"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 6
CFG = 5.0
SEED = 1234

# ember sampler -> (diffusers scheduler class, config overrides)
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}),
    "ddim": ("DDIMScheduler", {}),
}


def diffusers_images(
    folder, sampler, *, image=None, mask=None, strength=0.75, batch=1
) -> np.ndarray:
    cls_name, overrides = SCHEDULERS[sampler]
    if mask is not None:
        cls = diffusers.StableDiffusionInpaintPipeline
    elif image is not None:
        cls = diffusers.StableDiffusionImg2ImgPipeline
    else:
        cls = diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
    kwargs = dict(
        prompt=[PROMPT] * batch,
        negative_prompt=[NEGATIVE] * batch,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=gens,
        output_type="np",
    )
    if image is None or mask is not None:
        kwargs.update(height=SIZE, width=SIZE)
    if image is not None:
        kwargs.update(image=image, strength=strength)
    if mask is not None:
        kwargs.update(mask_image=mask)
    if sampler == "ddim":
        kwargs["eta"] = 0.0
    out = pipe(**kwargs).images
    return (out * 255).round().astype(np.uint8)


def ember_image(tmp_path, model, sampler, *extra, name="e.png") -> np.ndarray:
    out = tmp_path / name
    args = ["generate", PROMPT, "--negative", NEGATIVE, "--model", str(model), "--sampler", sampler]
    args += ["--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED)]
    # Parity with diffusers' fp32 reference is an fp32 property; bf16 has tests/test_bf16.py.
    # The model's pixels: no watermark (`ember.watermark`) on top.
    args += ["--size", f"{SIZE}x{SIZE}", "--dtype", "fp32", "-o", str(out), "-q", "--no-watermark"]
    args += extra
    assert main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(tmp_path, sd1_folder, sampler):
    ref = diffusers_images(sd1_folder, sampler)[0]
    got = ember_image(tmp_path, sd1_folder, sampler, "--schedule", "default")
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 2, f"{sampler}: max pixel difference {diff}/255"
    assert ref.std() > 1, "reference image is flat: the comparison would prove nothing"


def test_img2img_matches_diffusers(tmp_path, sd1_folder):
    rng = np.random.default_rng(0)
    init = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    init_path = tmp_path / "init.png"
    Image.fromarray(init).save(init_path)
    ref = diffusers_images(sd1_folder, "euler", image=Image.fromarray(init), strength=0.6)[0]
    got = ember_image(
        tmp_path, sd1_folder, "euler", "--init-image", str(init_path), "--strength", "0.6"
    )
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def inpaint_inputs(tmp_path_factory):
    """(init, mask) as uint8 arrays and as PNG paths: random pixels, a white (repaint) box."""
    folder = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(0)
    init = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 16:56] = 255
    Image.fromarray(init).save(folder / "init.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return init, mask, folder / "init.png", folder / "mask.png"


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("dpmpp_2m", 1.0), ("euler", 0.6)])
def test_inpainting_model_matches_diffusers(
    tmp_path, sd1_inpaint_folder, inpaint_inputs, sampler, strength
):
    """A 9-channel inpainting U-Net (sd-v1-5-inpainting's design: noisy latents, mask and
    masked-image latents) gives `StableDiffusionInpaintPipeline`'s image for the same seed: pure
    noise at full strength, the init image noised to the first sigma below it."""
    init, mask, init_path, mask_path = inpaint_inputs
    ref = diffusers_images(
        sd1_inpaint_folder, sampler, image=Image.fromarray(init), mask=Image.fromarray(mask),
        strength=strength,
    )[0]  # fmt: skip
    got = ember_image(
        tmp_path, sd1_inpaint_folder, sampler, "--schedule", "default", "--init-image",
        str(init_path), "--mask", str(mask_path), "--strength", str(strength),
    )  # fmt: skip
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 2, f"{sampler} at strength {strength}: max pixel difference {diff}/255"
    assert ref.std() > 1, "reference image is flat: the comparison would prove nothing"


def test_inpainting_model_sees_diffusers_mask_and_masked_image(sd1_inpaint_folder, inpaint_inputs):
    """The channels beside the noisy latents are diffusers' own: the mask, and the latents of the
    image with the repainted region grey (0 in the VAE's [-1, 1], as the inpainting models were
    trained), sampled with the seed's generator after the init image's sample and the initial
    noise. A tiny random U-Net barely reacts to these channels (black instead of grey moves its
    image by a few /255), so they are compared here directly."""
    from ember.checkpoints import load_model
    from ember.images import uint8_to_tensor
    from ember.pipeline import Inputs, generators, initial_latents
    from ember.settings import GenerationParams, resolve, validate

    init, mask, _, _ = inpaint_inputs
    seen = {}

    def first_step(pipe, step, t, tensors):
        seen.setdefault("concat", torch.cat([tensors["mask"], tensors["masked_image_latents"]], 1))
        return {}

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        sd1_inpaint_folder, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(
        prompt=PROMPT, image=Image.fromarray(init), mask_image=Image.fromarray(mask), height=SIZE,
        width=SIZE, num_inference_steps=STEPS, strength=0.6, guidance_scale=1.0,
        output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=first_step,
        callback_on_step_end_tensor_inputs=["mask", "masked_image_latents"],
    )  # fmt: skip
    loaded = load_model(sd1_inpaint_folder)
    params = GenerationParams(
        prompt=PROMPT, seed=SEED, width=SIZE, height=SIZE, steps=STEPS, strength=0.6
    )
    params = validate(resolve(params, loaded.config))
    inputs = Inputs(uint8_to_tensor(init), uint8_to_tensor(mask))
    latents = initial_latents(loaded, params, [inputs], [1], generators(SEED, 1))
    torch.testing.assert_close(latents.concat, seen["concat"], atol=1e-4, rtol=1e-4)


def test_inpainting_model_without_a_mask_repaints_everything(
    tmp_path, sd1_inpaint_folder, inpaint_inputs
):
    """txt2img and mask-less img2img on a 9-channel model run (as A1111 does) as inpainting with
    everything masked: the same image as an explicit all-white mask."""
    _, _, init_path, _ = inpaint_inputs
    white = tmp_path / "white.png"
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(white)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(grey)
    flags = ("--schedule", "default")
    txt2img = ember_image(tmp_path, sd1_inpaint_folder, "euler", *flags)
    masked = ember_image(tmp_path, sd1_inpaint_folder, "euler", *flags, "--init-image",
                         str(grey), "--mask", str(white), "--strength", "1")  # fmt: skip
    assert np.array_equal(txt2img, masked) and txt2img.std() > 1
    img2img = ember_image(tmp_path, sd1_inpaint_folder, "euler", *flags, "--init-image",
                          str(init_path), "--strength", "0.6")  # fmt: skip
    masked = ember_image(tmp_path, sd1_inpaint_folder, "euler", *flags, "--init-image",
                         str(init_path), "--mask", str(white), "--strength", "0.6")  # fmt: skip
    assert np.array_equal(img2img, masked)


def test_v_prediction_matches_diffusers(tmp_path, sd2v_folder):
    ref = diffusers_images(sd2v_folder, "euler")[0]
    got = ember_image(tmp_path, sd2v_folder, "euler")
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_batch_images_match_diffusers_per_seed(tmp_path, sd1_folder):
    ref = diffusers_images(sd1_folder, "euler_a", batch=2)
    args = ["generate", PROMPT, "--negative", NEGATIVE, "--model", str(sd1_folder)]
    args += ["--sampler", "euler_a", "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED)]
    args += ["--size", f"{SIZE}x{SIZE}", "--batch", "2", "--dtype", "fp32", "-q", "--no-watermark"]
    args += ["-o", str(tmp_path / "b.png")]
    assert main(args) == 0
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / f"b-{i}.png").convert("RGB"))
        assert np.abs(got.astype(int) - ref[i].astype(int)).max() <= 2


def test_convert_roundtrip_same_image_and_tensors(tmp_path, sd1_folder):
    from safetensors.torch import load_file

    single = tmp_path / "x.safetensors"
    assert main(["convert", str(sd1_folder), str(single), "--format", "single-file"]) == 0
    a = ember_image(tmp_path, sd1_folder, "euler", name="a.png")
    b = ember_image(tmp_path, single, "euler", name="b.png")
    assert (a == b).all()
    back = tmp_path / "back"
    assert main(["convert", str(single), str(back), "--format", "diffusers"]) == 0
    for part, file in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ]:
        orig = load_file(sd1_folder / part / file)
        new = load_file(back / part / file)
        orig = {k: v for k, v in orig.items() if not k.endswith("position_ids")}
        new = {k: v for k, v in new.items() if not k.endswith("position_ids")}
        assert orig.keys() == new.keys(), part
        for k in orig:
            assert torch.equal(orig[k], new[k]), f"{part}: {k}"
