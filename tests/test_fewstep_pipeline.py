"""Few-step generation end to end (issue 36), through `ember generate`, against diffusers.

Tiny SD-shaped pipelines with random weights are built by diffusers itself (conftest), and so are
the add-ons: a tiny `AutoencoderTiny` (TAESD) and an LCM-LoRA-shaped LoRA on the U-Net's attention.
Each image is compared with diffusers' own pipeline on the same folder, seed and settings (fp32,
within 2/255); each reference is checked not to be flat and, where it can be, the feature under test
is checked to change the image, so that the comparison can fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ember.checkpoints import load_model
from ember.cli import main
from ember.images import read_record
from ember.pipeline import generate
from ember.settings import GenerationParams
from pngcheck import same_image

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red circle left of a blue square", "blurry"
SIZE, SEED = 64, 1234
# diffusers' scheduler class for each ember sampler used here
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}
# The tiny SD VAE downsamples 2x (ch_mult (1, 2)); so must its TAESD: two blocks each side.
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
    latent_channels=4,
)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_match(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ref.std() > 1, f"{what}: reference image is flat: the comparison would prove nothing"
    diff = max_diff(got, ref)
    assert diff <= 2, f"{what}: max pixel difference {diff}/255"


def diffusers_image(
    folder, sampler: str, steps: int, cfg: float, *, vae=None, init=None, strength=0.6,
    lora=None, **scheduler_overrides,
) -> np.ndarray:  # fmt: skip
    """diffusers' StableDiffusion(Img2Img)Pipeline on `folder`, one image, seed SEED."""
    cls = diffusers.StableDiffusionPipeline if init is None else (
        diffusers.StableDiffusionImg2ImgPipeline
    )  # fmt: skip
    parts = {"vae": vae} if vae is not None else {}
    pipe = cls.from_pretrained(folder, safety_checker=None, **parts)
    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **scheduler_overrides)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=1.0)
    kwargs = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    )  # fmt: skip
    if init is None:
        kwargs.update(height=SIZE, width=SIZE)
    else:
        kwargs.update(image=init, strength=strength)
    out = pipe(**kwargs).images[0]
    return (out * 255).round().astype(np.uint8)


def ember_png(path, *args: str, seed: bool = True) -> np.ndarray:
    """`ember generate PROMPT --negative NEGATIVE ARGS -o PATH` in fp32 -> the PNG's pixels, the
    model's own (no watermark: they are compared with diffusers')."""
    argv = ["generate", PROMPT, "--negative", NEGATIVE, "--dtype", "fp32", "-q", "-o", str(path),
            "--no-watermark"]  # fmt: skip
    argv += ["--seed", str(SEED)] if seed else []
    assert main([*argv, *args]) == 0
    return np.asarray(Image.open(path).convert("RGB"))


# --- TAESD ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(diffusers AutoencoderTiny with weights large enough that every layer matters, its folder)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(**TINY_TAESD).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # default init nearly zeroes a ReLU stack
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))
    folder = tmp_path_factory.mktemp("taesd") / "tiny-taesd"
    vae.save_pretrained(folder)
    return vae, folder


def test_taesd_txt2img_matches_diffusers_with_autoencoder_tiny(tmp_path, sd1_folder, taesd):
    vae, folder = taesd
    ref = diffusers_image(sd1_folder, "euler", 4, 5.0, vae=vae, timestep_spacing="linspace")
    common = ("--model", str(sd1_folder), "--sampler", "euler", "--steps", "4", "--cfg", "5")
    common += ("--size", f"{SIZE}x{SIZE}")
    got = ember_png(tmp_path / "t.png", *common, "--vae", str(folder))
    assert_match(got, ref, "TAESD txt2img")
    own = ember_png(tmp_path / "own.png", *common)
    assert max_diff(own, got) > 10, "--vae did not change the image"
    record = read_record(tmp_path / "t.png")
    assert record.vae_path == str(folder) and record.vae_name == folder.name


def test_taesd_img2img_encodes_and_decodes_as_diffusers(tmp_path, sd1_folder, taesd):
    vae, folder = taesd
    rng = np.random.default_rng(0)
    init = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    ref = diffusers_image(
        sd1_folder, "euler", 6, 5.0, vae=vae, init=Image.fromarray(init), strength=0.6,
        timestep_spacing="linspace",
    )  # fmt: skip
    common = ("--model", str(sd1_folder), "--sampler", "euler", "--steps", "6", "--cfg", "5")
    common += ("--init-image", str(tmp_path / "init.png"), "--strength", "0.6")
    got = ember_png(tmp_path / "i.png", *common, "--vae", str(folder))
    assert_match(got, ref, "TAESD img2img")
    assert read_record(tmp_path / "i.png").mode == "img2img"
    own = ember_png(tmp_path / "own.png", *common)
    assert max_diff(own, got) > 10, "--vae did not change the img2img image"


# --- trailing spacing, cfg 1 ----------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trailing_euler_cfg1_matches_diffusers(tmp_path, sd1_folder, steps):
    ref = diffusers_image(sd1_folder, "euler", steps, 1.0, timestep_spacing="trailing")
    common = ("--model", str(sd1_folder), "--sampler", "euler", "--steps", str(steps))
    common += ("--cfg", "1", "--size", f"{SIZE}x{SIZE}")
    got = ember_png(tmp_path / "t.png", *common, "--timestep-spacing", "trailing")
    assert_match(got, ref, f"trailing, {steps} steps")
    record = read_record(tmp_path / "t.png").params
    assert (record.timestep_spacing, record.cfg, record.steps) == ("trailing", 1.0, steps)
    # A1111's name for the same schedule
    sgm = ember_png(tmp_path / "s.png", *common, "--schedule", "sgm_uniform")
    assert (sgm == got).all()
    # The random tiny U-Net depends little on its timestep, yet enough that the comparison above
    # tells the spacings apart.
    linspace = ember_png(tmp_path / "l.png", *common, "--timestep-spacing", "linspace")
    assert max_diff(linspace, ref) > 2, "linspace spacing gives the trailing reference too"


@pytest.fixture(scope="module")
def loaded_sd1(sd1_folder):
    return load_model(sd1_folder)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("cfg, batch", [(1.0, 1), (0.5, 1), (7.0, 2)])
def test_cfg_at_most_1_runs_one_unet_pass_per_step(loaded_sd1, monkeypatch, steps, cfg, batch):
    unet = loaded_sd1.model.model.diffusion_model
    calls: list[int] = []
    forward = unet.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    params = GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler", timestep_spacing="trailing",
        steps=steps, cfg=cfg, seed=SEED, width=SIZE, height=SIZE,
    )  # fmt: skip
    image = generate(loaded_sd1, params)
    assert image.shape == (1, 3, SIZE, SIZE)
    assert calls == [batch] * steps, f"cfg {cfg}: U-Net batches {calls}"


# --- LCM with an LCM-LoRA-shaped LoRA -------------------------------------------------------


def lcm_lora(unet_folder) -> dict[str, torch.Tensor]:
    """A random kohya LoRA (diffusers module names, as the LCM-LoRA release) on every attention
    projection of the U-Net, rank 4, alpha 4."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".attn1." not in name and ".attn2." not in name:
            continue
        if not name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    assert len(sd) >= 3 * 16, "expected every attention projection of the tiny U-Net"
    return sd


def test_lcm_with_lcm_lora_matches_diffusers(tmp_path, sd1_folder):
    pytest.importorskip("peft")
    path = tmp_path / "lcm-lora.safetensors"
    save_file(lcm_lora(sd1_folder / "unet"), str(path))
    # LCMScheduler: original_inference_steps=50 by default; its timesteps ignore timestep_spacing
    ref = diffusers_image(sd1_folder, "lcm", 4, 1.0, lora=path)
    common = ("--model", str(sd1_folder), "--sampler", "lcm", "--steps", "4", "--cfg", "1")
    common += ("--size", f"{SIZE}x{SIZE}")
    got = ember_png(tmp_path / "l.png", *common, "--lora", f"{path}:1")
    assert_match(got, ref, "LCM + LoRA")
    plain = ember_png(tmp_path / "p.png", *common)
    assert max_diff(plain, got) > 10, "the LoRA changed nothing"
    no_lora_ref = diffusers_image(sd1_folder, "lcm", 4, 1.0)
    assert_match(plain, no_lora_ref, "LCM without LoRA")
    euler = ember_png(tmp_path / "e.png", *common[:2], "--sampler", "euler", *common[4:])
    assert max_diff(euler, plain) > 10, "the lcm sampler is no different from euler"


# --- an SD-Turbo-shaped single file with its recommended settings ---------------------------


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """(diffusers folder of SD 2.x shape with eps prediction, its single-file conversion)."""
    from conftest import build_diffusers_folder

    root = tmp_path_factory.mktemp("turbo")
    folder = build_diffusers_folder(root / "tiny-turbo", "tiny-v", seed=2)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"prediction_type": "epsilon"}))
    single = root / "turbo.safetensors"
    assert main(["convert", str(folder), str(single), "--format", "single-file"]) == 0
    return folder, single


def test_sd_turbo_single_file_takes_its_sidecar_settings(tmp_path, turbo):
    folder, single = turbo
    sidecar = single.with_suffix(".json")
    settings = {"prediction": "eps", "sampler": "euler", "steps": 1, "cfg": 1.0,
                "timestep_spacing": "trailing"}  # fmt: skip
    sidecar.write_text(json.dumps(settings))
    try:
        got = ember_png(tmp_path / "a.png", "--model", str(single))
        record = read_record(tmp_path / "a.png")
        p = record.params
        assert (p.sampler, p.steps, p.cfg, p.timestep_spacing) == ("euler", 1, 1.0, "trailing")
        assert (p.width, p.height) == (SIZE, SIZE)
        ref = diffusers_image(
            folder, "euler", 1, 1.0, timestep_spacing="trailing", prediction_type="epsilon"
        )
        assert_match(got, ref, "SD-Turbo-shaped file, sidecar settings")

        as_v = ember_png(tmp_path / "v.png", "--model", str(single), "--prediction", "v")
        assert max_diff(as_v, got) > 10, "--prediction v did not change the image"
        ref_v = diffusers_image(
            folder, "euler", 1, 1.0, timestep_spacing="trailing", prediction_type="v_prediction"
        )
        assert_match(as_v, ref_v, "SD-Turbo-shaped file, --prediction v")

        # the sidecar's own prediction is read too (the file itself says eps)
        sidecar.write_text(json.dumps(settings | {"prediction": "v"}))
        side_v = ember_png(tmp_path / "sv.png", "--model", str(single))
        assert (side_v == as_v).all()
        # command-line settings win over the sidecar's
        two = ember_png(tmp_path / "2.png", "--model", str(single), "--steps", "2")
        assert read_record(tmp_path / "2.png").params.steps == 2
        assert max_diff(two, side_v) > 0
    finally:
        sidecar.unlink()


# --- --from -------------------------------------------------------------------------------


def test_from_regenerates_taesd_trailing_cfg1_image_byte_for_byte(tmp_path, sd1_folder, taesd):
    _, folder = taesd
    a = tmp_path / "a.png"
    ember_png(
        a, "--model", str(sd1_folder), "--vae", str(folder), "--sampler", "euler",
        "--steps", "2", "--cfg", "1", "--timestep-spacing", "trailing",
        "--size", f"{SIZE}x{SIZE}",
    )  # fmt: skip
    record = read_record(a)
    assert record.vae_path == str(folder) and len(record.vae_sha256 or "") == 64
    assert record.params.timestep_spacing == "trailing" and record.params.cfg == 1.0
    assert record.dtype == "fp32"
    b = tmp_path / "b.png"
    assert main(["generate", "--from", str(a), "-o", str(b), "-q"]) == 0
    assert same_image(b, a)
    # what the record's VAE and spacing are for: without them the image is another one
    plain = ember_png(
        tmp_path / "c.png", "--model", str(sd1_folder), "--sampler", "euler", "--steps", "2",
        "--cfg", "1", "--timestep-spacing", "trailing", "--size", f"{SIZE}x{SIZE}",
    )  # fmt: skip
    assert max_diff(plain, np.asarray(Image.open(a).convert("RGB"))) > 10
    linspace = tmp_path / "d.png"
    assert main(["generate", "--from", str(a), "-o", str(linspace), "-q",
                 "--timestep-spacing", "linspace"]) == 0  # fmt: skip
    assert not same_image(linspace, a)


def test_a1111_sd_vae_option_decodes_with_taesd(tmp_path, sd1_folder, taesd, monkeypatch):
    """POST /sdapi/v1/options {"sd_vae": NAME} (a VAE of $EMBER_MODELS/VAE) gives the image
    `ember generate --vae` gives; "Automatic" goes back to the model's own VAE."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from ember.provenance import Provenance
    from ember.server.app import create_app
    from ember.server.engine import ModelEngine
    from server_support import make_settings

    _, folder = taesd
    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    (models / "VAE" / "tiny-taesd").symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv("EMBER_MODELS", str(models))
    cli = ember_png(tmp_path / "cli.png", "--model", str(sd1_folder), "--vae", str(folder),
                    "--sampler", "euler", "--steps", "3", "--size", f"{SIZE}x{SIZE}")  # fmt: skip
    own = ember_png(tmp_path / "own.png", "--model", str(sd1_folder), "--sampler", "euler",
                    "--steps", "3", "--size", f"{SIZE}x{SIZE}")  # fmt: skip
    assert max_diff(cli, own) > 10
    engine = ModelEngine([], sd1_folder, dtype="fp32")
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": 3,
            "sampler_name": "Euler", "cfg_scale": 7, "width": SIZE, "height": SIZE}  # fmt: skip
    settings = make_settings(tmp_path / "data", provenance=Provenance(watermark=False))
    with TestClient(create_app(settings, engine)) as c:  # the model's pixels, as ember_png's
        assert [v["model_name"] for v in c.get("/sdapi/v1/sd-vae").json()] == ["tiny-taesd"]
        assert c.post("/sdapi/v1/options", json={"sd_vae": "tiny-taesd"}).status_code == 200

        def image() -> np.ndarray:
            r = c.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            png = base64.b64decode(r.json()["images"][0])
            return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

        assert max_diff(image(), cli) == 0
        assert c.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
        assert max_diff(image(), own) == 0
