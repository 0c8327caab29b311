"""Few-step generation on a CPU (issue 36): TAESD and replacement VAEs, timestep spacing, LCM.

Every reference is diffusers itself: tiny `AutoencoderTiny` / `AutoencoderKL` models with random
weights built and saved by diffusers, and its schedulers' own tables and step functions.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL as DiffusersKL,
)
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import save_file

from ember import keymaps
from ember.config import TINY_VAE, ScheduleConfig
from ember.diffusion.denoisers import Conditioning, EpsDenoiser, VDenoiser
from ember.diffusion.samplers import draw_noise, sample_lcm
from ember.diffusion.schedules import (
    get_sigmas,
    initial_noise_scale,
    sigma_to_t,
    train_sigmas,
)
from ember.errors import EmberError
from ember.models.taesd import TAESDConfig, TinyAutoencoder, taesd_to_diffusers
from ember.vae_files import apply_vae, load_vae

SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 2, 1),
    num_decoder_blocks=(2, 1, 1),
    latent_channels=4,
)


# --- TAESD ----------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every layer matters (default init nearly zeroes a ReLU stack)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))


@pytest.fixture(scope="module")
def taesd_ref(tmp_path_factory):
    """(diffusers AutoencoderTiny, its saved folder, a folder with the original two files)."""
    torch.manual_seed(0)
    ref = AutoencoderTiny(**TINY_TAESD).eval()
    _randomise(ref, 1)
    folder = tmp_path_factory.mktemp("taesd-diffusers")
    ref.save_pretrained(folder)
    # The original release's layout: each part an nn.Sequential of its own, the decoder's first
    # entry the (weightless) tanh clamp, so its conv_in is "1.weight".
    sd = ref.state_dict()
    enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            index, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v
    pair = tmp_path_factory.mktemp("taesd-original")
    save_file({k: v.contiguous() for k, v in enc.items()}, str(pair / "taesd_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in dec.items()}, str(pair / "taesd_decoder.safetensors"))
    return ref, folder, pair


def test_taesd_encode_and_decode_equal_diffusers_autoencoder_tiny(taesd_ref):
    ref, folder, _ = taesd_ref
    vae, scaling, name, sha = load_vae(folder)
    assert isinstance(vae, TinyAutoencoder) and scaling == 1.0 == ref.config.scaling_factor
    assert name == folder.name and len(sha) == 64
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        latents = ref.encode(x).latents
        pixels = ref.decode(z).sample
        # The pipeline's calls: encode(x).sample(generator), decode(z); encoding draws no noise.
        gen = torch.Generator().manual_seed(4)
        ours = vae.encode(x).sample(gen)
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(4).get_state())
        torch.testing.assert_close(ours, latents, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(vae.decode(z), pixels, atol=1e-6, rtol=1e-5)
    assert latents.abs().max() > 0.1 and pixels.std() > 0.05  # non-trivial networks
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(x[..., :30, :])


def test_taesd_original_two_files_load_the_same_module(taesd_ref):
    ref, folder, pair = taesd_ref
    from_diffusers = load_vae(folder).module.state_dict()
    for path in (pair, pair / "taesd_decoder.safetensors", pair / "taesd_encoder.safetensors"):
        loaded = load_vae(path)
        assert loaded.scaling_factor == 1.0
        sd = loaded.module.state_dict()
        assert sd.keys() == from_diffusers.keys()
        assert all(torch.equal(sd[k], from_diffusers[k]) for k in sd)
        assert taesd_to_diffusers(sd).keys() == ref.state_dict().keys()
    # Hashes cover both files, whichever of them was named.
    assert load_vae(pair).sha256 == load_vae(pair / "taesd_encoder.safetensors").sha256


def test_taesd_decoder_alone_decodes_but_cannot_encode(taesd_ref, tmp_path):
    _, _, pair = taesd_ref
    (tmp_path / "taesd_decoder.safetensors").write_bytes(
        (pair / "taesd_decoder.safetensors").read_bytes()
    )
    vae = load_vae(tmp_path / "taesd_decoder.safetensors").module
    assert vae.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 8, 8)
    with pytest.raises(EmberError, match="no encoder"):
        vae.encode(torch.zeros(1, 3, 8, 8))
    (tmp_path / "taesd_encoder.safetensors").write_bytes(
        (pair / "taesd_encoder.safetensors").read_bytes()
    )
    (tmp_path / "taesd_decoder.safetensors").unlink()
    with pytest.raises(EmberError, match="decoder"):
        load_vae(tmp_path / "taesd_encoder.safetensors")


def test_taesd_default_config_has_the_original_release_layout():
    """The real taesd_encoder/decoder.safetensors: plain convs at these Sequential indices."""
    sd = TinyAutoencoder(TAESDConfig()).state_dict()
    plain = sorted(k for k in sd if ".conv." not in k)
    assert plain == sorted(
        ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.6.weight"]
        + ["encoder.10.weight", "encoder.14.weight", "encoder.14.bias", "decoder.1.weight"]
        + ["decoder.1.bias", "decoder.7.weight", "decoder.12.weight", "decoder.17.weight"]
        + ["decoder.19.weight", "decoder.19.bias"]
    )
    assert sd["decoder.1.weight"].shape == (64, 4, 3, 3)
    assert sd["encoder.14.weight"].shape == (4, 64, 3, 3)


def test_apply_vae_swaps_module_and_scaling_and_removes(taesd_ref):
    _, folder, _ = taesd_ref
    from types import SimpleNamespace

    from ember.config import get_preset

    # a model whose VAE downsamples 4x, as the tiny TAESD does
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, ch_mult=(1, 2, 2)))
    own = torch.nn.Identity()
    loaded = SimpleNamespace(model=SimpleNamespace(first_stage_model=own), config=cfg)
    vae = load_vae(folder, base=cfg.vae)
    remove = apply_vae(loaded, vae)
    assert loaded.model.first_stage_model is vae.module
    assert loaded.config.vae.scaling_factor == 1.0 and loaded.config.unet == cfg.unet
    remove()
    assert loaded.model.first_stage_model is own and loaded.config is cfg


# --- full VAEs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kl_ref(tmp_path_factory):
    torch.manual_seed(0)
    conf = keymaps.vae_config_to_diffusers(TINY_VAE)
    conf.pop("_class_name")
    ref = DiffusersKL(**conf).eval()
    folder = tmp_path_factory.mktemp("kl-diffusers")
    ref.save_pretrained(folder)
    return ref, folder


def test_full_vae_from_every_layout_decodes_as_diffusers(kl_ref, tmp_path):
    ref, folder = kl_ref
    ldm = keymaps.vae_diffusers_to_ldm(ref.state_dict(), TINY_VAE)
    files = {
        "diffusers.safetensors": ref.state_dict(),
        "ldm.safetensors": ldm,
        # a whole SD checkpoint lends its VAE; ft-MSE-style training leftovers are skipped
        "checkpoint.safetensors": {f"first_stage_model.{k}": v for k, v in ldm.items()}
        | {"model.diffusion_model.out.0.weight": torch.ones(2), "loss.logvar": torch.zeros(1)},
    }
    paths = [folder]
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name))
        paths.append(tmp_path / name)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        want = ref.decode(z).sample
        mean = ref.encode(x).latent_dist.mean
    for path in paths:
        vae, scaling, _, _ = load_vae(path, base=TINY_VAE)
        assert scaling == TINY_VAE.scaling_factor
        with torch.no_grad():
            torch.testing.assert_close(vae.decode(z), want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(vae.encode(x).mean, mean, atol=1e-5, rtol=1e-4)
    # a bare file's scaling factor is the model's
    other = dataclasses.replace(TINY_VAE, scaling_factor=0.5)
    assert load_vae(tmp_path / "ldm.safetensors", base=other).scaling_factor == 0.5


def test_vae_files_refuse_what_they_cannot_read(kl_ref, taesd_ref, tmp_path):
    ref_kl, kl_folder = kl_ref
    _, taesd_folder, _ = taesd_ref
    with pytest.raises(EmberError, match="not found"):
        load_vae(tmp_path / "missing.safetensors")
    (tmp_path / "vae.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(EmberError, match="pickled"):
        load_vae(tmp_path / "vae.ckpt")
    save_file({"text_model.weight": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EmberError, match="not a VAE ember knows"):
        load_vae(tmp_path / "other.safetensors")
    with pytest.raises(EmberError, match="latent channels"):
        load_vae(taesd_folder, base=dataclasses.replace(TINY_VAE, z_channels=16, embed_dim=16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmberError, match="no VAE files"):
        load_vae(tmp_path / "empty")
    bad = tmp_path / "unet"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(EmberError, match="not a VAE"):
        load_vae(bad)
    tiny_conf = json.loads((taesd_folder / "config.json").read_text())
    shifted = tmp_path / "taesd3"
    shifted.mkdir()
    (shifted / "config.json").write_text(json.dumps(tiny_conf | {"shift_factor": 0.06}))
    with pytest.raises(EmberError, match="shift_factor"):
        load_vae(shifted)
    # A folder's config.json has the group norms; a bare file's are the model's (`base`).
    assert load_vae(kl_folder).module.cfg == TINY_VAE
    save_file(
        {k: v.contiguous() for k, v in ref_kl.state_dict().items()}, str(tmp_path / "v.safetensors")
    )
    with pytest.raises(EmberError, match="16 channels wide"):
        load_vae(tmp_path / "v.safetensors")


def test_vae_dtype(taesd_ref):
    _, folder, _ = taesd_ref
    vae = load_vae(folder, torch.bfloat16).module
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


# --- timestep spacing -----------------------------------------------------------------------


STEP_COUNTS = (1, 2, 3, 4, 7, 8, 10, 25)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_spacing_matches_euler_discrete_scheduler(spacing):
    cfg = ScheduleConfig()
    for steps in STEP_COUNTS:
        ref = EulerDiscreteScheduler(**SD15, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        ours = get_sigmas("default", steps, cfg, sampler="euler", spacing=spacing)
        torch.testing.assert_close(ours, ref.sigmas, atol=0, rtol=1e-6)
        scale = initial_noise_scale(ours, "euler", spacing=spacing)
        assert math.isclose(scale, float(ref.init_noise_sigma), rel_tol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "ddim"])
def test_spacing_matches_the_vp_schedulers(spacing, sampler):
    cfg = ScheduleConfig()
    table = train_sigmas(cfg)
    for steps in STEP_COUNTS:
        ours = get_sigmas("default", steps, cfg, sampler=sampler, spacing=spacing)
        if sampler == "ddim":
            ref = DDIMScheduler(**SD15, timestep_spacing=spacing)
        elif sampler == "unipc":
            ref = UniPCMultistepScheduler(**SD15, timestep_spacing=spacing)
        else:
            ref = DPMSolverMultistepScheduler(**SD15, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        t = sigma_to_t(ours[:-1], table).round().long()
        assert t.tolist() == ref.timesteps.tolist(), (steps, spacing)
        assert initial_noise_scale(ours, sampler, spacing=spacing) == math.sqrt(
            float(ours[0]) ** 2 + 1
        )


def test_trailing_starts_at_the_last_training_step_and_defaults_are_unchanged():
    cfg = ScheduleConfig()
    table = train_sigmas(cfg)
    for sampler in ("euler", "euler_a", "dpmpp_2m", "ddim", "lcm"):
        assert float(get_sigmas("default", 1, cfg, sampler=sampler, spacing="trailing")[0]) == (
            float(table[-1])
        )
    # the per-sampler default is the spacing diffusers' matching scheduler defaults to
    for sampler, spacing in (("euler", "linspace"), ("dpmpp_2m", "linspace"), ("ddim", "leading")):
        for steps in STEP_COUNTS:
            assert torch.equal(
                get_sigmas("default", steps, cfg, sampler=sampler),
                get_sigmas("default", steps, cfg, sampler=sampler, spacing=spacing),
            )
    with pytest.raises(ValueError, match="spacing 'sgm_uniform'"):
        get_sigmas("default", 4, cfg, spacing="sgm_uniform")
    with pytest.raises(ValueError, match="default schedule"):
        get_sigmas("karras", 4, cfg, spacing="trailing")


def test_trailing_takes_exactly_the_steps_asked_for():
    # numpy's arange(1000, 0, -1000 / 61) has 62 entries; diffusers would then run 62 steps.
    cfg = ScheduleConfig()
    for steps in (61, 103):
        assert len(np.arange(1000, 0, -1000 / steps)) == steps + 1
        s = get_sigmas("default", steps, cfg, sampler="euler", spacing="trailing")
        assert s.shape == (steps + 1,) and bool((s[1:] < s[:-1]).all())
        ref = EulerDiscreteScheduler(**SD15, timestep_spacing="trailing")
        ref.set_timesteps(steps)
        torch.testing.assert_close(s[:-1], ref.sigmas[:steps], atol=0, rtol=1e-6)


# --- LCM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("original", [50, 25, 100])
def test_lcm_timesteps_match_lcm_scheduler(original):
    cfg = ScheduleConfig()
    table = train_sigmas(cfg)
    steps_list = [*range(1, 9), 22, 44] if original >= 44 else range(1, 9)
    for steps in steps_list:
        ref = LCMScheduler(**SD15)
        ref.set_timesteps(steps, original_inference_steps=original)
        sigmas = get_sigmas("default", steps, cfg, sampler="lcm", original_inference_steps=original)
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0
        assert sigma_to_t(sigmas[:-1], table).round().long().tolist() == ref.timesteps.tolist()
        assert torch.equal(sigmas[:-1], table[ref.timesteps])
    with pytest.raises(ValueError, match="at most original_inference_steps=25"):
        get_sigmas("default", 26, cfg, sampler="lcm", original_inference_steps=25)


def fake_unet(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A fixed smooth "network" of the input, the timestep and the context."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x_in.shape[0], 1, 1, 1)
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.6 * x_in * torch.cos(t / 700) + 0.2 * torch.sin(2 * x_in + t / 150 + c)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_sampling_loop_matches_lcm_scheduler_step_by_step(prediction, steps):
    cfg = ScheduleConfig(prediction=prediction)
    pred = "epsilon" if prediction == "eps" else "v_prediction"
    shape, ctx = (2, 4, 8, 8), torch.linspace(-1, 1, 30).view(2, 3, 5)

    ref = LCMScheduler(**SD15, prediction_type=pred)
    ref.set_timesteps(steps)
    latents = draw_noise(shape, torch.Generator().manual_seed(7)) * ref.init_noise_sigma
    gen = torch.Generator().manual_seed(8)
    want = []
    for t in ref.timesteps:
        out = fake_unet(latents, t.float(), ctx)
        latents = ref.step(out, t, latents, generator=gen).prev_sample
        want.append(latents)

    sigmas = get_sigmas("default", steps, cfg, sampler="lcm")
    den = (EpsDenoiser if prediction == "eps" else VDenoiser)(fake_unet, cfg)
    x = draw_noise(shape, torch.Generator().manual_seed(7)) * initial_noise_scale(sigmas, "lcm")
    seen = []

    def callback(i, n, x_i, denoised):
        seen.append(x_i / (float(sigmas[i]) ** 2 + 1) ** 0.5)  # back to diffusers' VP sample

    gen = torch.Generator().manual_seed(8)
    out = sample_lcm(
        den, x, sigmas, Conditioning(ctx), generator=gen, callback=callback, schedule_cfg=cfg
    )
    for i in range(1, steps):
        torch.testing.assert_close(seen[i], want[i - 1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, want[-1], atol=2e-5, rtol=1e-5)
    assert want[-1].abs().max() > 0.1
    # Without the schedule the boundary scalings are skipped: their large-t limit, ~1e-5 away.
    plain = sample_lcm(
        den, x, sigmas, Conditioning(ctx), generator=torch.Generator().manual_seed(8)
    )
    torch.testing.assert_close(plain, want[-1], atol=1e-4, rtol=1e-4)
