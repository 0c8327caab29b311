"""LoRA / LyCORIS / DoRA add-ons (ember.lora) against diffusers+peft and the published formulas.

A tiny SD-1.x-shaped pipeline with random weights is built by diffusers (conftest); random LoRAs
for its U-Net and text encoder are written in kohya and in PEFT format, fused by diffusers and
merged by ember, and the images compared as tests/test_engine.py compares plain generation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember.checkpoints import load_model
from ember.errors import EmberError
from ember.images import tensor_to_uint8
from ember.lora import apply_dora, merge_loras, read_lora
from ember.pipeline import generate
from ember.settings import GenerationParams

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT, NEGATIVE = "a red circle left of a blue square", "blurry"
SIZE, STEPS, CFG, SEED = 64, 4, 5.0, 1234
RANK = 4
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."
# (diffusers module, ldm module, out, in, conv kernel) of the tiny U-Net: attention projections,
# a 1x1-conv proj_in (Linear in diffusers' LoRA, 1x1 conv in ldm), a 3x3 resnet conv, a GEGLU.
UNET_MODULES = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks.3.1.transformer_blocks.0.attn1.to_q", 64, 64, None),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
     "input_blocks.3.1.transformer_blocks.0.attn2.to_k", 64, 32, None),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
     "middle_block.1.transformer_blocks.0.attn2.to_out.0", 64, 64, None),
    ("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
     "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj", 512, 64, None),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.3.1.proj_in", 64, 64, (1, 1)),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", 32, 32, (3, 3)),
]  # fmt: skip
TEXT_MODULES = [
    ("encoder.layers.0.self_attn.q_proj", 32, 32),
    ("encoder.layers.1.mlp.fc1", 37, 32),
    ("encoder.layers.1.mlp.fc2", 32, 37),
]
# diffusers 0.42 renames kohya text-encoder attention LoRAs to `self_attn.to_q_lora`, which
# transformers 5's CLIPTextModel does not have (dropped with a warning): compared on the MLP only.
KOHYA_DIFFUSERS_TEXT = ("encoder.layers.1.mlp.fc1", "encoder.layers.1.mlp.fc2")


def _random(shape, seed: int, scale: float = 0.3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def kohya_lora(layout="diffusers", alpha=8.0, text=None, linear_proj_in=False) -> dict:
    """A kohya/A1111 LoRA over UNET_MODULES and TEXT_MODULES (random, rank 4)."""
    sd = {}
    for n, (diff, ldm, out, inp, kernel) in enumerate(UNET_MODULES):
        name = "lora_unet_" + (diff if layout == "diffusers" else ldm).replace(".", "_")
        if linear_proj_in and kernel == (1, 1):
            kernel = None  # a Linear-shaped LoRA for ldm's 1x1 conv
        sd[f"{name}.lora_down.weight"] = _random((RANK, inp, *(kernel or ())), 2 * n)
        up = (out, RANK, 1, 1) if kernel else (out, RANK)
        sd[f"{name}.lora_up.weight"] = _random(up, 2 * n + 1)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    for n, (module, out, inp) in enumerate(TEXT_MODULES):
        if text is not None and module not in text:
            continue
        name = "lora_te_text_model_" + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = _random((RANK, inp), 100 + 2 * n)
        sd[f"{name}.lora_up.weight"] = _random((out, RANK), 101 + 2 * n)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def peft_lora(convs: bool = False) -> tuple[dict, dict]:
    """The same tensors in diffusers' PEFT format, alpha 8 / rank 4 given in its metadata."""
    sd, targets = {}, {"unet": [], "text_encoder": []}
    for n, (diff, _, out, inp, kernel) in enumerate(UNET_MODULES):
        if kernel and kernel != (1, 1) and not convs:
            continue  # peft builds a conv LoRA's B with the layer's kernel; ember takes either
        sd[f"unet.{diff}.lora_A.weight"] = _random((RANK, inp, *(kernel or ())), 2 * n)
        up = (out, RANK, 1, 1) if kernel else (out, RANK)
        sd[f"unet.{diff}.lora_B.weight"] = _random(up, 2 * n + 1)
        targets["unet"].append(diff)
    for n, (module, out, inp) in enumerate(TEXT_MODULES):
        sd[f"text_encoder.{module}.lora_A.weight"] = _random((RANK, inp), 100 + 2 * n)
        sd[f"text_encoder.{module}.lora_B.weight"] = _random((out, RANK), 101 + 2 * n)
        targets["text_encoder"].append(module)
    meta = {}
    for part, modules in targets.items():
        meta |= {f"{part}.r": RANK, f"{part}.lora_alpha": 8, f"{part}.target_modules": modules}
    return sd, {"lora_adapter_metadata": json.dumps(meta), "format": "pt"}


def diffusers_image(folder, lora_path, scale: float) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path))
        pipe.fuse_lora(lora_scale=scale)
    out = pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), height=SIZE, width=SIZE,
        output_type="np",
    ).images[0]  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def ember_image(loaded) -> np.ndarray:
    params = GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler", schedule="default",
        steps=STEPS, cfg=CFG, seed=SEED, width=SIZE, height=SIZE,
    )  # fmt: skip
    return tensor_to_uint8(generate(loaded, params))[0]


@pytest.fixture(scope="module")
def loaded(sd1_folder):
    return load_model(sd1_folder)


def _snapshot(loaded) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _assert_same(loaded, snapshot) -> None:
    now = loaded.model.state_dict()
    changed = [k for k, v in snapshot.items() if not torch.equal(v, now[k])]
    assert not changed, f"{len(changed)} tensors differ from the fresh load: {changed[:3]}"


def _save(tmp_path, sd, name="x", metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path, metadata=metadata)
    return path


def _merged_weights(loaded, path, te=1.0, unet=1.0) -> dict[str, torch.Tensor]:
    """The model's weights with the LoRA merged; the model itself is left unchanged."""
    with merge_loras(loaded, [(read_lora(path), te, unet)]):
        return _snapshot(loaded)


# ---------------------------------------------------------------------------------------------
# parity with diffusers + peft, formats, strengths, unmerging


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_image_matches_diffusers(tmp_path, sd1_folder, loaded, fmt):
    if fmt == "kohya":
        path = _save(tmp_path, kohya_lora(alpha=2.0, text=KOHYA_DIFFUSERS_TEXT), fmt)
    else:
        sd, meta = peft_lora()
        path = _save(tmp_path, sd, fmt, meta)
    scale = 0.8
    ref = diffusers_image(sd1_folder, path, scale)
    snapshot = _snapshot(loaded)
    base = ember_image(loaded)
    assert np.abs(ref.astype(int) - base.astype(int)).max() > 10, "the LoRA changes nothing"
    merged = merge_loras(loaded, [(read_lora(path), scale, scale)])
    got = ember_image(loaded)
    merged.remove()
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 2, f"{fmt}: max pixel difference {diff}/255"
    _assert_same(loaded, snapshot)
    assert (ember_image(loaded) == base).all()


def test_formats_and_layouts_merge_the_same_weights(tmp_path, loaded):
    """kohya in the diffusers and the ldm layout, a Linear-shaped LoRA on ldm's 1x1 conv
    proj_in, PEFT and ComfyUI-style dotted ldm names: the same tensors give the same weights."""
    ref = _merged_weights(loaded, _save(tmp_path, kohya_lora(), "kohya"))
    variants = {
        "ldm": kohya_lora(layout="ldm"),
        "linear": kohya_lora(linear_proj_in=True),
    }
    peft, meta = peft_lora(convs=True)
    for name, sd in variants.items():
        got = _merged_weights(loaded, _save(tmp_path, sd, name))
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    got = _merged_weights(loaded, _save(tmp_path, peft, "peft", meta))
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in ref)
    ldm = kohya_lora(layout="ldm")
    comfy = {k: v for k, v in ldm.items() if k.startswith("lora_te_")}
    for _, module, *_ in UNET_MODULES:
        src = "lora_unet_" + module.replace(".", "_")
        for role in ("lora_down.weight", "lora_up.weight", "alpha"):
            comfy[f"diffusion_model.{module}.{role}"] = ldm[f"{src}.{role}"]
    got = _merged_weights(loaded, _save(tmp_path, comfy, "comfy"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_text_encoder_and_unet_strengths(tmp_path, loaded):
    path = _save(tmp_path, kohya_lora())
    base = _snapshot(loaded)
    full = _merged_weights(loaded, path, 1.0, 1.0)
    changed = {k for k in base if not torch.equal(base[k], full[k])}
    assert len(changed) == len(UNET_MODULES) + len(TEXT_MODULES)
    for te, unet in [(0.0, 1.0), (0.7, 0.0), (-0.5, 1.5)]:
        got = _merged_weights(loaded, path, te, unet)
        for k in base:
            w = te if k.startswith("cond_stage_model.") else unet
            want = base[k] + w * (full[k] - base[k])
            assert torch.allclose(got[k], want, atol=1e-5), (k, te, unet)
            if w == 0:
                assert torch.equal(got[k], base[k]), k


def test_merge_then_remove_is_bit_identical_in_bf16(tmp_path, sd1_folder):
    loaded = load_model(sd1_folder, dtype=torch.bfloat16)
    fresh = _snapshot(load_model(sd1_folder, dtype=torch.bfloat16))
    a = read_lora(_save(tmp_path, kohya_lora(), "a"))
    sd, meta = peft_lora(convs=True)
    b = read_lora(_save(tmp_path, sd, "b", meta))
    merged = merge_loras(loaded, [(a, 1.0, 0.6), (b, 0.5, -1.0)])
    assert merged.touched
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    merged.remove()
    _assert_same(loaded, fresh)
    merged.remove()  # a second remove changes nothing
    _assert_same(loaded, fresh)


def test_read_lora_is_cached_until_the_file_changes(tmp_path):
    path = _save(tmp_path, kohya_lora())
    first = read_lora(path)
    assert read_lora(path) is first
    assert first.name == "x" and len(first.sha256) == 64
    save_file(kohya_lora(alpha=1.0), path)
    assert read_lora(path) is not first
