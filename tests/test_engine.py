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


def diffusers_images(folder, sampler, *, img2img=None, strength=0.75, batch=1) -> np.ndarray:
    cls_name, overrides = SCHEDULERS[sampler]
    if img2img is None:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
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
    if img2img is None:
        kwargs.update(height=SIZE, width=SIZE)
    else:
        kwargs.update(image=img2img, strength=strength)
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
    ref = diffusers_images(sd1_folder, "euler", img2img=Image.fromarray(init), strength=0.6)[0]
    got = ember_image(
        tmp_path, sd1_folder, "euler", "--init-image", str(init_path), "--strength", "0.6"
    )
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


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
