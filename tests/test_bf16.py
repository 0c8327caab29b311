"""The bf16 fast path: close to fp32, never chosen silently where the CPU lacks bf16, and the
prepacked oneDNN convolutions and fused linears equal to the plain ops."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ember import device, pipeline
from ember.checkpoints import load_model
from ember.cli import main
from ember.errors import EmberError
from ember.models import prepack
from ember.models.layers import GEGLU, BasicTransformerBlock
from ember.models.prepack import Conv2d, Linear, onednn_usable
from ember.settings import GenerationParams

NO_BF16 = {"fpu", "sse2", "avx2", "avx512f", "avx512bw"}  # an AVX-512 CPU without AVX512-BF16


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def test_bf16_image_within_30db_of_fp32(tiny_model_file):
    params = GenerationParams(prompt="a red circle", sampler="dpmpp_2m", steps=8, cfg=7.0,
                              width=64, height=64, seed=3, batch=2)  # fmt: skip
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(tiny_model_file, dtype=dtype)
        assert loaded.dtype == dtype
        images[dtype] = pipeline.generate(loaded, params)
    assert images[torch.bfloat16].dtype == torch.float32  # the pipeline hands back fp32 pixels
    assert images[torch.float32].std() > 0.01  # not a blank image, where any dtype would agree
    assert psnr(images[torch.float32], images[torch.bfloat16]) >= 30.0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (NO_BF16, torch.float32),
        (set(), torch.float32),  # no /proc/cpuinfo: never guess bf16
        (NO_BF16 | {"avx512_bf16"}, torch.bfloat16),
        (NO_BF16 | {"amx_bf16", "amx_tile"}, torch.bfloat16),
    ],
)
def test_auto_dtype_follows_cpu_support(monkeypatch, flags, expected):
    monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
    assert device.resolve_dtype("auto") == expected
    assert device.resolve_dtype("fp32") == torch.float32  # explicit choices are kept
    assert device.resolve_dtype("bf16") == torch.bfloat16


def test_cli_default_is_fp32_without_cpu_bf16(monkeypatch, tmp_path, tiny_model_file):
    monkeypatch.setattr(device, "cpu_flags", lambda: set(NO_BF16))
    out = tmp_path / "a.png"
    argv = ["generate", "a red circle", "--model", str(tiny_model_file), "--steps", "2", "-q"]
    assert main([*argv, "-o", str(out)]) == 0
    assert json.loads(Image.open(out).text["ember"])["dtype"] == "fp32"
    monkeypatch.setattr(device, "cpu_flags", lambda: NO_BF16 | {"avx512_bf16"})
    assert main([*argv, "-o", str(tmp_path / "b.png")]) == 0
    assert json.loads(Image.open(tmp_path / "b.png").text["ember"])["dtype"] == "bf16"


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(EmberError, match="fp16"):
        device.resolve_dtype("fp16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("stride", "padding", "k"), [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_prepacked_conv_equals_nn_conv(dtype, stride, padding, k):
    torch.manual_seed(0)
    conv = Conv2d(48, 64, k, stride=stride, padding=padding).to(dtype).requires_grad_(False)
    x = torch.randn(2, 48, 12, 12, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for shape in ((2, 48, 12, 12), (3, 48, 20, 16)):  # packed for one shape, reused for another
            x = torch.randn(shape, dtype=dtype)
            ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
            torch.testing.assert_close(conv(x).float(), ref.float(), atol=tol, rtol=tol)
            assert (conv._packed is not None) == onednn_usable(dtype)
        conv.weight.mul_(-2.0)  # an in-place update must not leave a stale packed copy
        ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
        torch.testing.assert_close(conv(x).float(), ref.float(), atol=2 * tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_conv_is_relu_of_conv_plus_residual(monkeypatch, dtype, packed):
    """TAESD's blocks run ReLU and the residual sum inside the convolution: the same values as
    the separate ops, on the prepacked path and on the plain one."""
    monkeypatch.setattr(prepack, "PREPACK", packed)
    torch.manual_seed(0)
    conv = Conv2d(16, 16, 3, padding=1).to(dtype).requires_grad_(False)
    x, res = torch.randn(2, 16, 10, 10, dtype=dtype), torch.randn(2, 16, 10, 10, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), 1, 1)
        for got, want in [
            (conv.fused(x, relu=True), ref.relu()),
            (conv.fused(x, add=res), ref + res.float()),
            (conv.fused(x, add=res, relu=True), (ref + res.float()).relu()),
        ]:
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert (conv._packed is not None) == (packed and onednn_usable(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_linear_is_gelu_sum_or_product(monkeypatch, dtype, packed):
    """The U-Net's GEGLU and residual sums run inside the GEMM: the same values as the separate
    ops, for a block of output rows too, on 3-d activations, and after an in-place weight update
    (a LoRA merged after the first image); with EMBER_PREPACK off, in separate steps."""
    monkeypatch.setattr(prepack, "PREPACK", packed)
    torch.manual_seed(0)
    lin = Linear(24, 40).to(dtype).requires_grad_(False)
    x, other = torch.randn(2, 7, 24, dtype=dtype), torch.randn(2, 7, 16, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        for _ in range(2):
            w, b = lin.weight.float(), lin.bias.float()
            ref = F.linear(x.float(), w[8:24], b[8:24])
            for got, want in [
                (lin.fused(x, rows=(8, 24)), ref),
                (lin.fused(x, rows=(8, 24), gelu=True), F.gelu(ref)),
                (lin.fused(x, rows=(8, 24), add=other), ref + other.float()),
                (lin.fused(x, rows=(8, 24), mul=other), ref * other.float()),
                (lin.fused(x), F.linear(x.float(), w, b)),
            ]:
                assert got.shape == want.shape
                torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
            lin.weight.mul_(-2.0)  # later calls see the updated weight
    assert lin.fusable(x) == (packed and onednn_usable(dtype))


def test_fused_transformer_block_equals_separate_ops(monkeypatch):
    """A transformer block (fused residuals and GEGLU) computes what it does op by op; with a hook
    on its self-attention (token merging's) the sum stays outside, where the hook sees it."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, 24).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        fused = block(x, ctx)
        monkeypatch.setattr(prepack, "PREPACK", False)
        plain = block(x, ctx)
        monkeypatch.setattr(prepack, "PREPACK", True)
        seen = []
        handle = block.attn1.register_forward_hook(lambda m, a, out: seen.append(out))
        hooked = block(x, ctx)
        handle.remove()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert isinstance(block.ff.net[0], GEGLU)
    attn1_alone = block.attn1(block.norm1(x))
    torch.testing.assert_close(seen[0], attn1_alone, atol=1e-5, rtol=1e-5)  # not x + attn1


def test_conv_with_gradients_is_plain_conv():
    conv = Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    assert conv._packed is None


def test_prepack_can_be_switched_off():
    """EMBER_PREPACK=0 (read at import) keeps one copy of each conv weight: same output, no
    packed copy."""
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        "from ember.models import prepack\n"
        "assert prepack.PREPACK is False\n"
        "conv = prepack.Conv2d(8, 16, 3, padding=1).requires_grad_(False)\n"
        "x = torch.randn(1, 8, 10, 10)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))\n"
        "assert conv._packed is None\n"
    )
    env = {**os.environ, "EMBER_PREPACK": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_from_reuses_the_recorded_dtype(monkeypatch, tmp_path, tiny_model_file):
    monkeypatch.setattr(device, "cpu_flags", lambda: NO_BF16 | {"avx512_bf16"})
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["generate", "a red circle", "--model", str(tiny_model_file), "--steps", "2", "-q"]
    assert main([*argv, "-o", str(a)]) == 0
    monkeypatch.setattr(device, "cpu_flags", lambda: set(NO_BF16))  # "another machine"
    assert main(["generate", "--from", str(a), "-q", "-o", str(b)]) == 0
    assert json.loads(Image.open(b).text["ember"])["dtype"] == "bf16"
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
