"""ember's ldm-named models against diffusers (the reference implementation), tiny and on CPU.

Weights come from a seeded diffusers model, are renamed by `ember.keymaps` and loaded strictly, so
these tests check the modules and the key maps together.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from diffusers.models.embeddings import get_timestep_embedding

from ember.config import PRESETS, SD15_UNET, SD21_UNET, ModelConfig, UNetConfig
from ember.keymaps import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ember.models.layers import timestep_embedding
from ember.models.ldm import LatentDiffusion, build_on_meta, load_state_dict_strict
from ember.models.unet import UNetModel
from ember.models.vae import AutoencoderKL

TINY = PRESETS["tiny"]
TINY_SD2 = dataclasses.replace(  # SD 2.x code paths: linear proj, fixed head width, depth 2
    TINY.unet,
    num_heads=-1,
    num_head_channels=16,
    use_linear_in_transformer=True,
    attention_resolutions=(1, 2),
    transformer_depth=2,
)
UNETS = {"tiny": TINY.unet, "tiny-sd2": TINY_SD2, "tiny-inpaint": PRESETS["tiny-inpaint"].unet}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def reference_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()


def reference_vae() -> DiffusersVAE:
    torch.manual_seed(0)
    return DiffusersVAE.from_config(vae_config_to_diffusers(TINY.vae)).eval()


def test_timestep_embedding_matches_diffusers() -> None:
    t = torch.tensor([0.0, 1.5, 999.0])
    for dim in (32, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert_close(timestep_embedding(t, dim), expected)


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_matches_diffusers(name: str) -> None:
    cfg = UNETS[name]
    ref = reference_unet(cfg)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)  # non-square on purpose
    t = torch.tensor([3.0, 871.0])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        actual = ours(x, t, context)
    assert actual.shape == (2, cfg.out_channels, 16, 24)
    assert_close(actual, expected)


def test_unet_rejects_misaligned_size() -> None:
    unet = UNetModel(TINY.unet)
    with pytest.raises(ValueError, match="multiple of 2"):
        unet(torch.zeros(1, 4, 15, 16), torch.zeros(1), torch.zeros(1, 1, 32))


def test_vae_matches_diffusers() -> None:
    ref = reference_vae()
    ours = AutoencoderKL(TINY.vae).eval()
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict(), TINY.vae), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 12, generator=g)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        actual = ours.encode(x)
        assert_close(actual.mean, expected.mean)
        assert_close(actual.logvar, expected.logvar)
        assert_close(actual.std, expected.std)
        assert torch.equal(actual.mode(), actual.mean)
        sample = actual.sample(torch.Generator().manual_seed(5))
        assert_close(sample, expected.sample(torch.Generator().manual_seed(5)))
        assert_close(ours.decode(z), ref.decode(z).sample)


def test_unet_keys_round_trip() -> None:
    for cfg in UNETS.values():
        sd = UNetModel(cfg).state_dict()
        back = unet_diffusers_to_ldm(unet_ldm_to_diffusers(sd, cfg), cfg)
        assert back.keys() == sd.keys()
        assert all(back[k] is sd[k] for k in sd)


def test_vae_keys_round_trip() -> None:
    sd = AutoencoderKL(TINY.vae).state_dict()
    diffusers_sd = vae_ldm_to_diffusers(sd, TINY.vae)
    assert diffusers_sd["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    back = vae_diffusers_to_ldm(diffusers_sd, TINY.vae)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)


def test_keymap_rejects_foreign_keys() -> None:
    sd = {"input_blocks.0.0.weight": torch.zeros(1), "label_emb.0.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="label_emb"):
        unet_ldm_to_diffusers(sd, TINY.unet)


def test_legacy_diffusers_vae_attention_names() -> None:
    sd = vae_ldm_to_diffusers(AutoencoderKL(TINY.vae).state_dict(), TINY.vae)
    legacy = {
        k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in sd.items()
    }
    assert (
        vae_diffusers_to_ldm(legacy, TINY.vae).keys() == vae_diffusers_to_ldm(sd, TINY.vae).keys()
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_configs_round_trip(name: str) -> None:
    cfg = PRESETS[name]
    unet = unet_config_from_diffusers(unet_config_to_diffusers(cfg.unet))
    # ldm lists attention resolutions deepest first (4, 2, 1); the order carries no meaning.
    res = tuple(sorted(cfg.unet.attention_resolutions, reverse=True))
    assert unet == dataclasses.replace(cfg.unet, attention_resolutions=res)
    assert vae_config_from_diffusers(vae_config_to_diffusers(cfg.vae)) == cfg.vae


def test_configs_from_published_diffusers_files() -> None:
    # The architecture fields of the SD 1.5 and SD 2.1 unet/config.json files.
    sd15 = {"attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
    sd21 = {
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "num_attention_heads": None,
    }
    assert unet_config_from_diffusers(sd15) == SD15_UNET
    assert unet_config_from_diffusers(sd21) == SD21_UNET
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(sd15 | {"class_embed_type": "projection"})


def test_latent_diffusion_names_and_strict_loading() -> None:
    full = LatentDiffusion(TINY).state_dict()
    assert {k.split(".")[0] for k in full} == {"model", "first_stage_model"}
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in full

    model = build_on_meta(TINY)
    assert all(p.is_meta for p in model.parameters())
    broken = dict(full)
    del broken["model.diffusion_model.out.2.bias"]
    broken["model_ema.decay"] = torch.zeros(())
    with pytest.raises(ValueError, match="1 missing keys: model.diffusion_model.out.2.bias"):
        load_state_dict_strict(model, broken)
    load_state_dict_strict(model, full)
    assert not any(p.is_meta for p in model.parameters())
    # assign=True: the parameters share the loaded tensors' memory, nothing is copied
    assert model.unet.out[2].bias.data_ptr() == full["model.diffusion_model.out.2.bias"].data_ptr()


def check_single_file_layout(cfg: ModelConfig) -> None:
    """Our ldm keys/shapes equal diffusers' renamed by our maps, and diffusers' converter agrees."""
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg.unet))
        ref_vae = DiffusersVAE.from_config(vae_config_to_diffusers(cfg.vae))
    ours = build_on_meta(cfg).state_dict()

    def shapes(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
        return {k[len(prefix) :]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}

    ours_unet = shapes(ours, "model.diffusion_model.")
    ours_vae = shapes(ours, "first_stage_model.")
    assert shapes(unet_diffusers_to_ldm(ref_unet.state_dict(), cfg.unet)) == ours_unet
    assert shapes(vae_diffusers_to_ldm(ref_vae.state_dict(), cfg.vae)) == ours_vae

    converted_unet = convert_ldm_unet_checkpoint(ours, unet_config_to_diffusers(cfg.unet))
    assert shapes(converted_unet) == shapes(ref_unet.state_dict())
    converted_vae = convert_ldm_vae_checkpoint(ours, vae_config_to_diffusers(cfg.vae))
    assert shapes(converted_vae) == shapes(ref_vae.state_dict())


@pytest.mark.parametrize("name", ["tiny", "tiny-inpaint"])
def test_single_file_layout_tiny(name: str) -> None:
    check_single_file_layout(PRESETS[name])
    check_single_file_layout(dataclasses.replace(TINY, unet=TINY_SD2))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21"])
def test_single_file_layout_real_sizes(name: str) -> None:
    check_single_file_layout(PRESETS[name])


def test_bfloat16_model_runs_close_to_float32() -> None:
    torch.manual_seed(0)
    model = LatentDiffusion(TINY).eval()
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = model.unet(x, t, context)
        model.to(torch.bfloat16)
        actual = model.unet(x.bfloat16(), t, context.bfloat16())
        decoded = model.vae.decode(torch.randn(1, 4, 8, 8).bfloat16())
    assert actual.dtype == decoded.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_path_matches_fused_sdpa(dtype: torch.dtype) -> None:
    """Small maps with gradients take explicit matmuls (faster backward on CPU); outputs and
    gradients must equal fused SDPA's, and large maps must keep the fused kernel."""
    from ember.models import layers

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 32, dtype=dtype) for n in (64, 77, 77))
    grads = []
    for limit in (layers.SMALL_ATTENTION, 0):  # explicit, then fused
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        old, layers.SMALL_ATTENTION = layers.SMALL_ATTENTION, limit
        try:
            out = layers.sdpa(*leaves)
        finally:
            layers.SMALL_ATTENTION = old
        out.float().square().sum().backward()
        grads.append([out.detach().float()] + [x.grad.float() for x in leaves])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for explicit, fused in zip(*grads, strict=True):
        assert torch.allclose(explicit, fused, atol=tol, rtol=tol)
    assert 64 * 77 <= layers.SMALL_ATTENTION < 4096 * 4096


def test_attention_path_choice() -> None:
    """Fused SDPA (memory-efficient) for inference and for large maps; explicit only for small
    maps that need gradients."""
    from unittest import mock

    from ember.models import layers

    small = [torch.randn(1, 1, 16, 8, requires_grad=True) for _ in range(3)]
    big = [torch.randn(1, 1, 256, 8, requires_grad=True) for _ in range(3)]
    with mock.patch.object(
        layers.F, "scaled_dot_product_attention", wraps=layers.F.scaled_dot_product_attention
    ) as fused:
        layers.sdpa(*small)
        assert fused.call_count == 0
        with torch.no_grad():
            layers.sdpa(*small)
        assert fused.call_count == 1
        old, layers.SMALL_ATTENTION = layers.SMALL_ATTENTION, 255 * 256
        try:
            layers.sdpa(*big)
        finally:
            layers.SMALL_ATTENTION = old
        assert fused.call_count == 2


def test_attention_weights_hook_sees_the_weights_and_changes_nothing() -> None:
    """A registered hook gets each forward's (B, heads, N, L) float32 weights, rows summing to 1,
    and the output stays the fused kernel's; once removed, the layer runs the fused kernel again."""
    from unittest import mock

    from ember.models import layers

    torch.manual_seed(0)
    attn = layers.CrossAttention(16, 8, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    seen: list[torch.Tensor] = []
    sdpa = layers.F.scaled_dot_product_attention
    with (
        torch.no_grad(),
        mock.patch.object(layers.F, "scaled_dot_product_attention", wraps=sdpa) as fused,
    ):
        plain = attn(x, ctx)
        handle = attn.register_weights_hook(seen.append)
        hooked = attn(x, ctx)
        assert fused.call_count == 1  # the hooked call formed its weights explicitly
        handle.remove()
        again = attn(x, ctx)
        assert fused.call_count == 2
    (weights,) = seen
    assert weights.shape == (2, 2, 6, 5) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 6))
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, plain)


def test_configs_written_with_coordinate_channels_off_still_load() -> None:
    """`coord_channels` (a dropped experiment) is in the files written while it existed, the
    bundled model's among them: false loads as before, true is refused by name."""
    from ember.config import model_config_from_dict

    old = json.loads(TINY.to_json())
    assert model_config_from_dict(old) == TINY
    old["unet"]["coord_channels"] = False
    assert model_config_from_dict(old) == TINY
    old["unet"]["coord_channels"] = True
    with pytest.raises(ValueError, match="coord_channels"):
        model_config_from_dict(old)
