"""SDXL against diffusers: a tiny random SDXL pipeline built by diffusers (`conftest.build_sdxl_folder`)
gives the same images in ember as in `StableDiffusionXL(Img2Img|Inpaint)Pipeline`, from the folder
and from its single-file conversion."""

from __future__ import annotations

import json

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


def diffusers_image(
    folder, sampler="euler", *, mode="txt2img", prompt=PROMPT, negative=NEGATIVE, lora=None,
    prepare=None, **kwargs,
):  # fmt: skip
    """diffusers' image of the module's settings; `lora`: (path, scale) loaded and fused first;
    `prepare(pipe)` runs before generating (e.g. to load textual-inversion embeddings)."""
    cls = {
        "txt2img": diffusers.StableDiffusionXLPipeline,
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
    }[mode]
    pipe = cls.from_pretrained(folder)
    name, overrides = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora[0]))
        pipe.fuse_lora(lora_scale=lora[1])
    if prepare is not None:
        prepare(pipe)
    if mode == "txt2img":
        kwargs.update(height=HEIGHT, width=WIDTH)
    out = pipe(
        prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kwargs,
    ).images[0]  # fmt: skip
    return _uint8(out)


def ember_image(
    tmp_path, model, sampler="euler", *extra, prompt=PROMPT, negative=NEGATIVE, name="e.png"
):
    out = tmp_path / name
    args = ["generate", prompt, "--model", str(model), "--sampler", sampler, "--steps", str(STEPS)]
    args += ["--cfg", str(CFG), "--seed", str(SEED), "--size", f"{WIDTH}x{HEIGHT}"]
    args += ["--negative", negative] if negative else []
    args += ["--dtype", "fp32", "-o", str(out), "-q", *extra]
    assert main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def generated(loaded, prompt: str = PROMPT) -> np.ndarray:
    """ember's euler image of the module's settings, in process (with what is merged now)."""
    from ember.images import tensor_to_uint8
    from ember.pipeline import generate
    from ember.settings import GenerationParams

    params = GenerationParams(
        prompt=prompt, negative_prompt=NEGATIVE, sampler="euler", steps=STEPS, cfg=CFG, seed=SEED,
        width=WIDTH, height=HEIGHT,
    )  # fmt: skip
    return tensor_to_uint8(generate(loaded, params))[0]


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


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("dpmpp_2m", 1.0), ("euler", 0.75)])
def test_inpainting_model_matches_diffusers(
    tmp_path, sdxl_inpaint_folder, init_and_mask, sampler, strength
):
    """A 9-channel SDXL inpainting U-Net gives `StableDiffusionXLInpaintPipeline`'s image."""
    init, mask = init_and_mask
    ref = diffusers_image(
        sdxl_inpaint_folder, sampler, mode="inpaint", image=Image.open(init),
        mask_image=Image.open(mask), strength=strength, height=HEIGHT, width=WIDTH,
    )  # fmt: skip
    args = ["--init-image", str(init), "--mask", str(mask), "--strength", str(strength)]
    assert_close(ember_image(tmp_path, sdxl_inpaint_folder, sampler, *args), ref, sampler)


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
    save_file(tensors | {"denoiser.sigmas": torch.ones(1000)}, str(bare))  # as sgm may save it
    back = tmp_path / "back"
    assert main(["convert", str(bare), str(back), "--format", "diffusers"]) == 0
    ref = ember_image(tmp_path, sdxl_folder, name="ref.png")
    for model in (bare, back):  # (`single` differs from `bare` only by ember's metadata)
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


# ---------------------------------------------------------------------------------------------
# LoRA: kohya's SDXL names through the one loader

# (ldm module, out, in, conv kernel) of the tiny SDXL U-Net, as kohya's sd-scripts name SDXL's.
LORA_UNET = [
    ("input_blocks.4.1.transformer_blocks.1.attn1.to_q", 128, 128, None),
    ("input_blocks.5.1.transformer_blocks.0.attn2.to_k", 128, 192, None),
    ("middle_block.1.transformer_blocks.0.attn2.to_out.0", 128, 128, None),
    ("output_blocks.1.1.transformer_blocks.1.ff.net.0.proj", 1024, 128, None),
    ("input_blocks.4.1.proj_in", 128, 128, None),
    ("input_blocks.1.0.in_layers.2", 32, 32, (3, 3)),
]
# diffusers 0.42 renames text-encoder attention LoRAs to modules transformers 5 lacks (see
# tests/test_lora.py): both encoders are compared on their MLPs.
LORA_TEXT = [
    ("lora_te1_", "encoder.layers.0.mlp.fc1", 37, 64),
    ("lora_te2_", "encoder.layers.1.mlp.fc2", 128, 37),
]


def kohya_sdxl_lora(alpha: float = 2.0, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    sd = {}
    modules = [("lora_unet_", m, o, i, k) for m, o, i, k in LORA_UNET]
    modules += [(p, "text_model." + m, o, i, None) for p, m, o, i in LORA_TEXT]
    for prefix, module, out, inp, kernel in modules:
        name = prefix + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *(kernel or ()), generator=gen)
        up = (out, rank, 1, 1) if kernel else (out, rank)
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def test_kohya_lora_matches_diffusers(tmp_path, sdxl_folder, loaded):
    from ember.lora import merge_loras, read_lora

    path = tmp_path / "xl-lora.safetensors"
    save_file(kohya_sdxl_lora(), str(path))
    scale = 0.8
    ref = diffusers_image(sdxl_folder, lora=(path, scale))
    base = generated(loaded)
    lora = read_lora(path)
    merged = merge_loras(loaded, [(lora, scale, scale)])
    try:
        got = generated(loaded)
        touched = merged.touched
    finally:
        merged.remove()
    assert any(".embedders.0." in k for k in touched) and any(".embedders.1." in k for k in touched)
    assert np.abs(ref.astype(int) - base.astype(int)).max() > 10, "the LoRA changes nothing"
    assert_close(got, ref, "LoRA")
    assert (generated(loaded) == base).all()


# ---------------------------------------------------------------------------------------------
# the refiner


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    from conftest import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("refiner") / "tiny-refiner", refiner=True)


def test_base_and_refiner_match_diffusers(tmp_path, sdxl_folder, refiner_folder):
    """ember's --refiner/--refiner-switch-at 0.8 hands over where diffusers' denoising_end /
    denoising_start do (below timestep 200), with the refiner's bigG-only conditioning and
    aesthetic score, and decodes with the refiner's VAE."""
    steps = 5  # linspace: t = 999, 749, 500, 250 for the base, 0 for the refiner

    def scheduled(pipe):
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="linspace"
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    base = scheduled(diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder))
    refiner = scheduled(diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder))
    gen = torch.Generator("cpu").manual_seed(SEED)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                  guidance_scale=CFG, generator=gen)  # fmt: skip
    latents = base(
        **common, height=HEIGHT, width=WIDTH, denoising_end=0.8, output_type="latent"
    ).images
    ref = _uint8(refiner(**common, image=latents, denoising_start=0.8, output_type="np").images[0])
    args = ["--refiner", str(refiner_folder), "--refiner-switch-at", "0.8", "--steps", str(steps)]
    got = ember_image(tmp_path, sdxl_folder, "euler", *args)
    assert_close(got, ref, "base + refiner")
    alone = ember_image(tmp_path, sdxl_folder, "euler", "--steps", str(steps), name="alone.png")
    assert np.abs(alone.astype(int) - got.astype(int)).max() > 2, "the refiner changed nothing"
    info = Image.open(tmp_path / "e.png").text["parameters"]
    assert "Refiner: tiny-refiner [" in info and "Refiner switch at: 0.8" in info


# ---------------------------------------------------------------------------------------------
# SDXL-Turbo's recipe with TAESDXL; memory


def test_turbo_recipe_with_taesdxl_matches_diffusers(tmp_path, sdxl_folder):
    """1 step, trailing spacing, no guidance, decoded by a TAESD-shaped tiny autoencoder given
    with --vae (TAESDXL has TAESD's architecture): diffusers' SDXL pipeline with that
    AutoencoderTiny gives the same image."""
    from test_fewstep_pipeline import TINY_TAESD  # 2x, as the tiny SDXL VAE

    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(**TINY_TAESD).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # default init nearly zeroes a ReLU stack
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))
    folder = tmp_path / "taesdxl"
    vae.save_pretrained(folder)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, vae=vae)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    pipe.set_progress_bar_config(disable=True)
    ref = _uint8(pipe(
        prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, height=HEIGHT, width=WIDTH,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0])  # fmt: skip
    out = tmp_path / "turbo.png"
    args = ["generate", PROMPT, "--model", str(sdxl_folder), "--sampler", "euler", "--steps", "1"]
    args += ["--cfg", "1", "--timestep-spacing", "trailing", "--vae", str(folder), "--seed"]
    args += [str(SEED), "--size", f"{WIDTH}x{HEIGHT}", "--dtype", "fp32", "-o", str(out), "-q"]
    assert main(args) == 0
    assert_close(np.asarray(Image.open(out).convert("RGB")), ref, "turbo + TAESDXL")


def test_a_model_too_big_for_free_memory_is_one_line(capsys, tmp_path, sdxl_folder, monkeypatch):
    monkeypatch.setattr("ember.device.available_memory", lambda: 2**20)
    args = ["generate", "x", "--model", str(sdxl_folder), "-o", str(tmp_path / "x.png"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GiB of memory" in err and "available" in err, err


def test_a1111_api_lists_sdxl_models_and_takes_a_refiner(tmp_path, sdxl_folder, refiner_folder):
    """/sdapi/v1/sd-models lists SDXL models; txt2img's refiner_checkpoint / refiner_switch_at
    give `ember generate --refiner`'s image and infotext; a refiner that is not a listed model
    (a path, say) is a 422."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from ember.server.app import create_app
    from ember.server.engine import ModelEngine
    from server_support import make_settings

    cli = ember_image(tmp_path, sdxl_folder, "euler", "--refiner", str(refiner_folder),
                      "--refiner-switch-at", "0.5", "--schedule", "automatic")  # fmt: skip
    engine = ModelEngine([refiner_folder], sdxl_folder, dtype="fp32")
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS,
            "sampler_name": "Euler", "cfg_scale": CFG, "width": WIDTH, "height": HEIGHT,
            "refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.5}  # fmt: skip
    with TestClient(create_app(make_settings(tmp_path / "data"), engine)) as c:
        names = [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
        assert set(names) == {"tiny-sdxl", "tiny-refiner"}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
        assert np.abs(png[..., :3].astype(int) - cli.astype(int)).max() == 0
        assert "Refiner: tiny-refiner [" in json.loads(r.json()["info"])["infotexts"][0]
        r = c.post("/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": str(refiner_folder)})
        assert r.status_code == 422 and "unknown model" in r.text


# ---------------------------------------------------------------------------------------------
# full size, on the meta device (no weights exist here; shapes are what a real file must fit)

SDXL_UNET_CONFIG = {  # the architecture fields of SDXL 1.0 base's unet/config.json
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    "UpBlock2D"], "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
}  # fmt: skip
SDXL_REFINER_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D", "UpBlock2D"], "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4, "use_linear_projection": True,
}  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "conf"), [("sdxl", SDXL_UNET_CONFIG), ("sdxl-refiner", SDXL_REFINER_UNET_CONFIG)]
)
def test_full_size_presets_are_the_published_architectures(preset, conf):
    from ember.config import get_preset
    from ember.keymaps import unet_config_from_diffusers, unet_ldm_to_diffusers
    from ember.models.ldm import build_on_meta
    from ember.models.text import build_text_encoder
    from ember.sdxl_files import detect_sdxl_config, internal_to_sgm

    cfg = get_preset(preset)
    assert unet_config_from_diffusers(conf) == cfg.unet
    model = build_on_meta(cfg, build_text_encoder)
    ours = model.state_dict()
    unet = {
        k[len("model.diffusion_model.") :]: v for k, v in ours.items() if k.startswith("model.")
    }
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**conf).state_dict()
    mapped = unet_ldm_to_diffusers(unet, cfg.unet)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.items()}
    if preset == "sdxl":
        assert sum(v.numel() for v in unet.values()) == 2_567_463_684  # SDXL's U-Net
    # What a real file holds, under sgm's names, is detected as this very config.
    assert detect_sdxl_config(internal_to_sgm(ours, cfg, {})) == cfg


def test_peft_lora_matches_diffusers_and_reaches_text_encoder_2(tmp_path, sdxl_folder, loaded):
    """diffusers' own SDXL LoRA format (PEFT lora_A/B, alpha per part in lora_adapter_metadata):
    its `unet.` part gives diffusers' image; its `text_encoder.` and `text_encoder_2.` parts (which
    diffusers 0.42 with transformers 5 cannot load: 'Could not automatically infer state dict
    type') merge into CLIP-L and bigG with each part's alpha / r."""
    from ember.lora import merge_loras, read_lora

    modules = {  # part -> (module, out, in)
        "unet": [("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", 128, 128),
                 ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 128, 192)],
        "text_encoder": [("encoder.layers.0.mlp.fc1", 37, 64)],
        "text_encoder_2": [("text_model.encoder.layers.1.mlp.fc2", 128, 37)],
    }  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    sd, meta = {}, {}
    for part, entries in modules.items():
        for module, out, inp in entries:
            sd[f"{part}.{module}.lora_A.weight"] = torch.randn(4, inp, generator=gen)
            sd[f"{part}.{module}.lora_B.weight"] = torch.randn(out, 4, generator=gen) * 0.3
        meta |= {f"{part}.r": 4, f"{part}.lora_alpha": 2 if part == "text_encoder_2" else 8,
                 f"{part}.target_modules": [m for m, _, _ in entries]}  # fmt: skip

    def save(name: str, parts: tuple[str, ...]):
        path = tmp_path / name
        tensors = {k: v for k, v in sd.items() if k.split(".")[0] in parts}
        kept = {k: v for k, v in meta.items() if k.split(".")[0] in parts}
        save_file(tensors, str(path), {"lora_adapter_metadata": json.dumps(kept), "format": "pt"})
        return path

    path = save("xl-peft.safetensors", ("unet",))
    ref = diffusers_image(sdxl_folder, lora=(path, 1.0))
    with merge_loras(loaded, [(read_lora(path), 1.0, 1.0)]):
        got = generated(loaded)
    assert_close(got, ref, "PEFT LoRA")
    base = generated(loaded)
    assert np.abs(base.astype(int) - got.astype(int)).max() > 10, "the LoRA changes nothing"
    encoders = loaded.model.conditioner.embedders
    targets = {  # LoRA key -> (layer, alpha / r)
        "text_encoder.encoder.layers.0.mlp.fc1": (encoders[0].transformer.text_model.encoder
                                                  .layers[0].mlp.fc1, 8 / 4),
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2": (encoders[1].transformer.text_model
                                                               .encoder.layers[1].mlp.fc2, 2 / 4),
    }  # fmt: skip
    before = {k: layer.weight.detach().clone() for k, (layer, _) in targets.items()}
    text = save("te.safetensors", ("text_encoder", "text_encoder_2"))
    with merge_loras(loaded, [(read_lora(text), 1.0, 1.0)]):
        for key, (layer, scale) in targets.items():
            expected = scale * sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
            assert torch.allclose(layer.weight.detach() - before[key], expected, atol=1e-5), key
