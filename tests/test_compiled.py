"""`ember compile`: the U-Net compiled ahead of time, cached, used by generate, never silently wrong.

One compile of a tiny SD 1.x-shaped model (diffusers' random init, so no layer is zero) serves the
module; each test points EMBER_CACHE at the module's cache folder or at its own.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from ember import compiled
from ember.cli import main
from ember.images import read_record
from ember.service import GenerationService, Request
from ember.settings import GenerationParams, LoraChoice
from test_lora import kohya_lora

PROMPT = "a red circle"
ARGS = ["--steps", "3", "--seed", "3", "--size", "64x64", "-q", "--no-watermark"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, sd1_folder):
    """A cache folder holding the package of `sd1_folder` at 32x32 (made by `ember compile`)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_CACHE", str(folder))
        compiled.forget()
        rc = main(["compile", "--model", str(sd1_folder), "--size", "64x64", "--keep-slower", "-q"])
        assert rc == 0
    compiled.forget()
    return folder


def generate(tmp_path, model, name: str, *extra: str) -> tuple[np.ndarray, object]:
    out = tmp_path / f"{name}.png"
    assert main(["generate", PROMPT, "--model", str(model), *ARGS, "-o", str(out), *extra]) == 0
    from PIL import Image

    return np.asarray(Image.open(out)).astype(np.float64), read_record(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)))


def test_generate_uses_the_package_and_matches_eager(tmp_path, monkeypatch, cache, sd1_folder):
    monkeypatch.setenv("EMBER_CACHE", str(cache))
    packages = list((cache / "compiled").glob("*.pt2"))
    assert len(packages) == 1
    fast, record = generate(tmp_path, sd1_folder, "compiled")
    assert record.compiled_unet == packages[0].stem
    monkeypatch.setenv("EMBER_COMPILED", "0")
    eager, eager_record = generate(tmp_path, sd1_folder, "eager")
    assert eager_record.compiled_unet is None
    assert fast.std() > 10  # a real picture, not a constant
    assert psnr(fast, eager) >= 30


def test_other_sizes_run_eagerly(tmp_path, monkeypatch, cache, sd1_folder):
    monkeypatch.setenv("EMBER_CACHE", str(cache))
    _, record = generate(tmp_path, sd1_folder, "other", "--size", "48x64")
    assert record.compiled_unet is None


def test_a_second_compile_finds_the_package(capsys, monkeypatch, cache, sd1_folder):
    monkeypatch.setenv("EMBER_CACHE", str(cache))
    package = next((cache / "compiled").glob("*.pt2"))
    stamp = package.stat().st_mtime_ns
    assert main(["compile", "--model", str(sd1_folder), "--size", "64x64", "-q"]) == 0
    assert "already compiled" in capsys.readouterr().out
    assert package.stat().st_mtime_ns == stamp


def test_no_compiler_is_one_line_and_generate_still_works(
    tmp_path, capsys, monkeypatch, sd1_folder
):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    assert main(["compile", "--model", str(sd1_folder), "--size", "64x64", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no C++ compiler" in err and "eagerly" in err
    assert not (tmp_path / "cache" / "compiled").exists()
    _, record = generate(tmp_path, sd1_folder, "eager")
    assert record.compiled_unet is None


def test_a_package_that_does_not_load_falls_back_with_a_notice(
    tmp_path, capsys, monkeypatch, sd1_folder
):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    compiled.forget()
    service = GenerationService("auto")
    loaded = service.load(sd1_folder)
    ds = loaded.config.vae.downsample
    key = compiled.package_key(loaded, (64 // ds, 64 // ds))
    broken = compiled.packages_dir() / f"{key.name}.pt2"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a package")
    params = GenerationParams(prompt=PROMPT, steps=2, width=64, height=64)
    images = service.generate([Request(params)])[0]
    assert images[0].record.compiled_unet is None
    err = capsys.readouterr().err
    assert "does not load" in err and "running eagerly" in err and "Traceback" not in err
    compiled.forget()


def test_merged_loras_and_hooks_keep_the_eager_unet(tmp_path, monkeypatch, cache, sd1_folder):
    """A package holds the weights it was built from: a LoRA merged into the U-Net, or a hook on
    one of its modules, must not be bypassed by it."""
    monkeypatch.setenv("EMBER_CACHE", str(cache))
    compiled.forget()
    lora = tmp_path / "l.safetensors"
    save_file(kohya_lora(), lora)
    service = GenerationService("auto")
    loaded = service.load(sd1_folder)
    params = GenerationParams(prompt=PROMPT, steps=2, width=64, height=64)
    assert service.generate([Request(params)])[0][0].record.compiled_unet is not None

    with_lora = GenerationParams(prompt=PROMPT, steps=2, width=64, height=64,
                                 loras=(LoraChoice(str(lora)),))  # fmt: skip
    assert service.generate([Request(with_lora)])[0][0].record.compiled_unet is None
    service.use_loras(())  # unmerged: the package fits the weights again
    assert loaded.unet_adapters == ()

    calls = []
    unet = loaded.model.model.diffusion_model
    handle = unet.middle_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        record = service.generate([Request(params)])[0][0].record
    finally:
        handle.remove()
    assert record.compiled_unet is None and len(calls) == 2
    assert service.generate([Request(params)])[0][0].record.compiled_unet is not None
