"""The same settings give the same pixels as before the settings/service redesign.

`tests/data/same-images/*.png` were written by `ember generate` at commit eff2485 (before the
generation settings, the service and the pipeline's stages were rewritten), with the `tiny_model_file`
fixture's model (seeded, so every machine builds the same weights) and the cases below. Each case
covers one path: txt2img, a batch with an ancestral sampler and a Karras schedule at a non-square
size, img2img, inpainting, layout guidance for a relation and for a count, prompt weighting with
clip skip.

fp32 kernels sum in an order that depends on the CPU's vector width, so pixels are compared exactly
where the references were made (a CPU whose torch capability is AVX512) and within 2/255 elsewhere,
the tolerance of the parity tests against diffusers. The references predate the watermark
(`ember.watermark`), which is added on top of the model's pixels: they are compared with it off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.cli import main

DATA = Path(__file__).parent / "data" / "same-images"
REFERENCE_CAPABILITY = "AVX512"

CASES = {
    "txt2img": ["a red circle left of a blue square", "--negative", "blurry", "--steps", "6",
                "--cfg", "5", "--seed", "3"],
    "batch_euler_a_karras": ["two green triangles", "--sampler", "euler_a", "--schedule", "karras",
                             "--steps", "5", "--seed", "10", "--batch", "2", "--size", "64x48"],
    "img2img_ddim": ["a yellow star", "--init-image", "INIT", "--strength", "0.6", "--sampler",
                     "ddim", "--steps", "8", "--seed", "5"],
    "inpaint": ["a blue square", "--init-image", "INIT", "--mask", "MASK", "--steps", "6",
                "--seed", "7"],
    "layout_relation": ["a red circle left of a blue square", "--layout-guidance", "2", "--steps",
                        "6", "--seed", "1", "--sampler", "euler"],
    "layout_count": ["three red circles", "--layout-guidance", "2", "--steps", "6", "--seed", "2",
                     "--cfg", "3"],
    "clip_skip_heun": ["a (red:1.3) circle, [blue] square", "--clip-skip", "2", "--sampler", "heun",
                       "--steps", "4", "--seed", "4"],
}  # fmt: skip


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.parametrize("name", list(CASES))
def test_same_settings_give_the_same_pixels_as_before(tmp_path, tiny_model_file, name):
    args = [a.replace("INIT", str(DATA / "init.png")).replace("MASK", str(DATA / "mask.png"))
            for a in CASES[name]]  # fmt: skip
    out = tmp_path / f"{name}.png"
    assert main(["generate", *args, "--model", str(tiny_model_file), "--dtype", "fp32", "-q",
                 "--no-watermark", "-o", str(out)]) == 0  # fmt: skip
    batch = [p for p in sorted(DATA.glob(f"{name}*.png"))]
    made = [out] if len(batch) == 1 else [tmp_path / f"{name}-{i}.png" for i in range(len(batch))]
    for ref, got in zip(batch, made, strict=True):
        want, have = _pixels(ref), _pixels(got)
        assert want.shape == have.shape
        assert want.std() > 1, "reference is flat: the comparison would prove nothing"
        diff = np.abs(want - have).max()
        if torch.backends.cpu.get_cpu_capability() == REFERENCE_CAPABILITY:
            assert diff == 0, f"{ref.name}: pixels changed (max difference {diff}/255)"
        else:
            assert diff <= 2, f"{ref.name}: max pixel difference {diff}/255"


def test_layout_cases_do_exercise_layout_guidance(tmp_path, tiny_model_file):
    """Without guidance the relation prompt's image differs: the reference above tests guidance."""
    out = tmp_path / "plain.png"
    args = CASES["layout_relation"][:]
    args[args.index("--layout-guidance") + 1] = "0"
    assert main(["generate", *args, "--model", str(tiny_model_file), "--dtype", "fp32", "-q",
                 "--no-watermark", "-o", str(out)]) == 0  # fmt: skip
    assert np.abs(_pixels(out) - _pixels(DATA / "layout_relation.png")).max() > 8
