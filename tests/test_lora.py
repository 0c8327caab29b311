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
import torch.nn.functional as F
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


def test_older_diffusers_names(tmp_path, loaded):
    """`lora.down/up` (LoRACompatible layers) and `processor.to_q_lora` (attention processors)."""
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    down, up = _random((RANK, 64), 0), _random((64, RANK), 1)
    kohya = {f"{KOHYA_TO_Q}.lora_down.weight": down, f"{KOHYA_TO_Q}.lora_up.weight": up}
    ref = _merged_weights(loaded, _save(tmp_path, kohya, "kohya"))
    for name, sd in {
        "compatible": {f"unet.{attn}.to_q.lora.down.weight": down,
                       f"unet.{attn}.to_q.lora.up.weight": up},
        "processor": {f"{attn}.processor.to_q_lora.down.weight": down,
                      f"{attn}.processor.to_q_lora.up.weight": up},
    }.items():  # fmt: skip
        got = _merged_weights(loaded, _save(tmp_path, sd, name))
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_sd2_shaped_model_linear_proj_and_text(tmp_path, sd2v_folder):
    """SD 2.x: proj_in is Linear in ldm, so a 1x1-conv LoRA is reshaped; the OpenCLIP text model
    is held in transformers' layout, so `lora_te_text_model_*` names find it."""
    loaded = load_model(sd2v_folder)
    base = _snapshot(loaded)
    down, up = _random((RANK, 64, 1, 1), 0), _random((64, RANK, 1, 1), 1)
    tdown, tup = _random((RANK, 32), 2), _random((32, RANK), 3)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {"lora_unet_input_blocks_3_1_proj_in.lora_down.weight": down,
          "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": up,
          f"{te}.lora_down.weight": tdown, f"{te}.lora_up.weight": tup}  # fmt: skip
    got = _merged_weights(loaded, _save(tmp_path, sd, "sd2"))
    proj_in = UNET + "input_blocks.3.1.proj_in.weight"
    assert base[proj_in].ndim == 2
    assert torch.allclose(got[proj_in] - base[proj_in], up.flatten(1) @ down.flatten(1), atol=1e-6)
    q = TEXT + "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[q] - base[q], tup @ tdown, atol=1e-6)


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


# ---------------------------------------------------------------------------------------------
# LyCORIS and DoRA: ember's update against the published formulas, written out here

TO_Q = UNET + "input_blocks.3.1.transformer_blocks.0.attn1.to_q"  # Linear (64, 64)
CONV = UNET + "input_blocks.1.0.in_layers.2"  # Conv2d (32, 32, 3, 3)
KOHYA_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _delta(loaded, tmp_path, sd, module, te=1.0, unet=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, merged weight - base weight) of `module`."""
    base = loaded.model.state_dict()[module + ".weight"].clone()
    got = _merged_weights(loaded, _save(tmp_path, sd, "ly"), te, unet)[module + ".weight"]
    return base, got - base


def test_loha_linear_and_tucker_conv(tmp_path, loaded):
    r, alpha = 4, 2.0
    w1a, w1b, w2a, w2b = (_random(s, i) for i, s in enumerate([(64, r), (r, 64)] * 2))
    sd = {
        f"{KOHYA_TO_Q}.hada_{n}": t
        for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), (w1a, w1b, w2a, w2b), strict=True)
    }
    sd[f"{KOHYA_TO_Q}.alpha"] = torch.tensor(alpha)
    _, got = _delta(loaded, tmp_path, sd, TO_Q)
    # Hadamard product of two low-rank matrices (FedPara / LyCORIS LoHa), scaled alpha / rank.
    want = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    assert torch.allclose(got, want, atol=1e-5)

    # Tucker form for convs: W[o, i, k, l] = sum_ab t[a, b, k, l] wa[a, o] wb[b, i].
    t1, t2 = _random((r, r, 3, 3), 10), _random((r, r, 3, 3), 11)
    a1, b1, a2, b2 = (_random(s, 12 + i) for i, s in enumerate([(r, 32), (r, 32)] * 2))
    sd = {f"{KOHYA_CONV}.hada_t1": t1, f"{KOHYA_CONV}.hada_t2": t2, f"{KOHYA_CONV}.hada_w1_a": a1,
          f"{KOHYA_CONV}.hada_w1_b": b1, f"{KOHYA_CONV}.hada_w2_a": a2,
          f"{KOHYA_CONV}.hada_w2_b": b2,
          f"{KOHYA_CONV}.alpha": torch.tensor(alpha)}  # fmt: skip
    _, got = _delta(loaded, tmp_path, sd, CONV, unet=0.5)
    w = torch.zeros(2, 32, 32, 3, 3)
    for n, (t, a, b) in enumerate([(t1, a1, b1), (t2, a2, b2)]):
        for i in range(r):
            for j in range(r):
                w[n] += a[i][:, None, None, None] * b[j][None, :, None, None] * t[i, j]
    assert torch.allclose(got, 0.5 * w[0] * w[1] * alpha / r, atol=1e-5)


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by its definition: block (i, j) is a[i, j] * b."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def test_lokr_linear_and_conv(tmp_path, loaded):
    r, alpha = 2, 3.0
    w1 = _random((4, 8), 0)
    w2a, w2b = _random((16, r), 1), _random((r, 8), 2)
    sd = {f"{KOHYA_TO_Q}.lokr_w1": w1, f"{KOHYA_TO_Q}.lokr_w2_a": w2a,
          f"{KOHYA_TO_Q}.lokr_w2_b": w2b, f"{KOHYA_TO_Q}.alpha": torch.tensor(alpha)}  # fmt: skip
    _, got = _delta(loaded, tmp_path, sd, TO_Q)
    assert torch.allclose(got, _kron(w1, w2a @ w2b) * alpha / r, atol=1e-5)

    # Conv: w1 = a @ b (4, 4), w2 whole (8, 8, 3, 3); no decomposed w2 -> rank from w1_b.
    w1a, w1b, w2 = _random((4, r), 3), _random((r, 4), 4), _random((8, 8, 3, 3), 5)
    sd = {f"{KOHYA_CONV}.lokr_w1_a": w1a, f"{KOHYA_CONV}.lokr_w1_b": w1b,
          f"{KOHYA_CONV}.lokr_w2": w2, f"{KOHYA_CONV}.alpha": torch.tensor(alpha)}  # fmt: skip
    _, got = _delta(loaded, tmp_path, sd, CONV)
    w1 = w1a @ w1b
    want = torch.stack([_kron(w1, w2[:, :, k, j]) for k in range(3) for j in range(3)], -1)
    assert torch.allclose(got, want.reshape(32, 32, 3, 3) * alpha / r, atol=1e-5)

    # Both sides whole: the scale is 1 whatever alpha says.
    w1, w2 = _random((4, 4), 6), _random((16, 16), 7)
    sd = {f"{KOHYA_TO_Q}.lokr_w1": w1, f"{KOHYA_TO_Q}.lokr_w2": w2,
          f"{KOHYA_TO_Q}.alpha": torch.tensor(alpha)}  # fmt: skip
    _, got = _delta(loaded, tmp_path, sd, TO_Q)
    assert torch.allclose(got, _kron(w1, w2), atol=1e-5)


def test_full_diff_with_bias(tmp_path, loaded):
    diff, diff_b = _random((64, 64), 0), _random((64,), 1)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    module = UNET + "input_blocks.3.1.transformer_blocks.0.attn1.to_out.0"
    base = _snapshot(loaded)
    got = _merged_weights(
        loaded, _save(tmp_path, {f"{name}.diff": diff, f"{name}.diff_b": diff_b}), unet=0.5
    )
    assert torch.allclose(got[module + ".weight"], base[module + ".weight"] + 0.5 * diff)
    assert torch.allclose(got[module + ".bias"], base[module + ".bias"] + 0.5 * diff_b)


def test_dora_peft_and_lycoris(tmp_path, loaded):
    """DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s B A) / ||W + s B A||, the norm per output
    row for PEFT's magnitude vector, per input column for LyCORIS' (1, in) dora_scale."""
    a, b, m = _random((RANK, 64), 0), _random((64, RANK), 1), _random((64,), 2).abs() + 1
    sd = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": m,
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 2})}
    base = loaded.model.state_dict()[TO_Q + ".weight"].clone()
    v = base + (b @ a) * 2 / RANK
    want = m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True) - base
    got = _merged_weights(loaded, _save(tmp_path, sd, "dora", meta))[TO_Q + ".weight"] - base
    assert torch.allclose(got, want, atol=1e-5)
    got = _merged_weights(loaded, _save(tmp_path, sd, "dora", meta), unet=0.5)[TO_Q + ".weight"]
    assert torch.allclose(got - base, 0.5 * want, atol=1e-5)  # strength interpolates linearly

    scale = _random((1, 64), 3).abs() + 1
    sd = {f"{KOHYA_TO_Q}.lora_down.weight": a, f"{KOHYA_TO_Q}.lora_up.weight": b,
          f"{KOHYA_TO_Q}.alpha": torch.tensor(2.0), f"{KOHYA_TO_Q}.dora_scale": scale}  # fmt: skip
    v = base + (b @ a) * 2 / RANK
    want = scale * v / torch.linalg.vector_norm(v, dim=0, keepdim=True) - base
    _, got = _delta(loaded, tmp_path, sd, TO_Q)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(apply_dora(base, v - base, scale, per_output=False), want, atol=1e-5)


def test_lora_mid_conv_cp(tmp_path, loaded):
    down, mid, up = (
        _random((RANK, 32, 1, 1), 0),
        _random((RANK, RANK, 3, 3), 1),
        _random((32, RANK, 1, 1), 2),
    )
    sd = {f"{KOHYA_CONV}.lora_down.weight": down, f"{KOHYA_CONV}.lora_mid.weight": mid,
          f"{KOHYA_CONV}.lora_up.weight": up}  # fmt: skip
    _, got = _delta(loaded, tmp_path, sd, CONV)
    # LoCon's CP form is the composition of three convs: 1x1 down, k x k mid, 1x1 up.
    x = torch.randn(1, 32, 8, 8)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    assert torch.allclose(F.conv2d(x, got, padding=1), composed, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input: one EmberError line, and no weight changed


def _error(fn) -> str:
    with pytest.raises(EmberError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_files_are_one_line_errors(tmp_path):
    good = _save(tmp_path, kohya_lora(), "good")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-100])
    assert "truncated" in _error(lambda: read_lora(corrupt))
    pickled = tmp_path / "old.ckpt"
    torch.save(kohya_lora(), pickled)
    assert "ember convert" in _error(lambda: read_lora(pickled))
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    assert "pickled" in _error(lambda: read_lora(renamed))
    assert "not found" in _error(lambda: read_lora(tmp_path / "missing.safetensors"))
    model_like = _save(tmp_path, {"model.diffusion_model.out.2.weight": torch.zeros(2)}, "m")
    assert "no LoRA" in _error(lambda: read_lora(model_like))
    half = {k: v for k, v in kohya_lora().items() if "lora_up" not in k}
    assert "incomplete" in _error(lambda: read_lora(_save(tmp_path, half, "half")))
    loha = {f"{KOHYA_TO_Q}.hada_{n}": torch.zeros(2, 2) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
    loha[f"{KOHYA_TO_Q}.hada_t1"] = torch.zeros(2, 2, 3, 3)  # t2 missing
    assert "hada_t2" in _error(lambda: read_lora(_save(tmp_path, loha, "loha")))


def test_lora_for_another_architecture(tmp_path, loaded):
    base = _snapshot(loaded)
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(
            4, 768
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    lora = read_lora(_save(tmp_path, sdxl, "xl"))  # reads (a folder can list it), never merges
    assert "SDXL" in _error(lambda: merge_loras(loaded, [(lora, 1.0, 1.0)]))
    # An SDXL U-Net-only LoRA, told by its cross-attention width (2048).
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    unet_only = {f"{name}.lora_down.weight": torch.zeros(4, 2048),
                 f"{name}.lora_up.weight": torch.zeros(64, 4)}  # fmt: skip
    lora = read_lora(_save(tmp_path, unet_only, "xl-unet"))
    message = _error(lambda: merge_loras(loaded, [(lora, 1.0, 1.0)]))
    assert "SDXL" in message and "2048" in message
    # SD 2.x by its text-encoder width.
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd2 = {f"{te}.lora_down.weight": torch.zeros(4, 1024),
           f"{te}.lora_up.weight": torch.zeros(1024, 4)}  # fmt: skip
    lora = read_lora(_save(tmp_path, sd2, "sd2"))
    assert "SD 2.x" in _error(lambda: merge_loras(loaded, [(lora, 1.0, 1.0)]))
    _assert_same(loaded, base)


def test_keys_matching_nothing_are_listed_and_nothing_changes(tmp_path, loaded):
    base = _snapshot(loaded)
    good = read_lora(_save(tmp_path, kohya_lora(), "good"))
    stray = kohya_lora()
    stray["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 64)
    stray["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(64, 4)
    bad = read_lora(_save(tmp_path, stray, "stray"))
    message = _error(lambda: merge_loras(loaded, [(good, 1.0, 1.0), (bad, 1.0, 1.0)]))
    assert "2 keys match no module" in message and "down_blocks_7" in message
    wrong_shape = kohya_lora()
    wrong_shape[f"{KOHYA_TO_Q}.lora_up.weight"] = torch.zeros(48, RANK)
    lora = read_lora(_save(tmp_path, wrong_shape, "shape"))
    assert "(48, 64)" in _error(lambda: merge_loras(loaded, [(lora, 1.0, 1.0)]))
    _assert_same(loaded, base)


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors file starts with its header's length: 1 file in 256 starts with byte 0x80,
    as a bare pickle does. Found on a 151 MB rank-128 LoRA."""
    lora = kohya_lora()
    for pad in range(300):  # metadata of growing length moves the header length's low byte
        path = tmp_path / "padded.safetensors"
        save_file(lora, str(path), {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 was made")
    assert read_lora(path).adapters  # read as the LoRA it is
