"""The command line: reproducible PNGs with their record, and one-line errors for bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ember import checkpoints
from ember.cli import main
from ember.safetensors_io import read_safetensors, save_safetensors


def gen(model, out, *extra):
    return main(["generate", "a red circle", "--model", str(model), "--steps", "3",
                 "--seed", "5", "-q", "-o", str(out), *extra])  # fmt: skip


def test_same_command_gives_identical_png_bytes(tmp_path, tiny_model_file):
    # without Content Credentials: their signature and manifest id differ on every signing
    assert gen(tiny_model_file, tmp_path / "a.png", "--no-credentials") == 0
    assert gen(tiny_model_file, tmp_path / "b.png", "--no-credentials") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_png_record_info_and_from(tmp_path, tiny_model_file, capsys):
    a = tmp_path / "a.png"
    assert (
        gen(tiny_model_file, a, "--negative", "blue", "--cfg", "4.5", "--sampler", "Euler a") == 0
    )
    capsys.readouterr()
    text = Image.open(a).text
    assert text["parameters"].startswith(
        "a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler a"
    )
    record = json.loads(text["ember"])
    assert record["params"]["seed"] == 5 and record["params"]["cfg"] == 4.5
    assert record["model_sha256"] == checkpoints.file_hashes(tiny_model_file)[0]
    for key in ("ember_version", "torch_version", "dtype", "device", "model_hash"):
        assert record[key]
    assert main(["info", str(a)]) == 0
    shown = capsys.readouterr().out
    assert "Seed: 5" in shown and "CFG scale: 4.5" in shown and "model_sha256" in shown
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(a), "-q", "-o", str(again)]) == 0
    assert (np.asarray(Image.open(again)) == np.asarray(Image.open(a))).all()
    assert Image.open(again).text["ember"] == text["ember"]


def test_default_cfg_is_the_models_own(tmp_path, tiny_model_file):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_model_file), "pt") as f:
        meta = dict(f.metadata())
    weights = load_file(tiny_model_file)

    def cfg_used(config: dict, *extra) -> float:
        model = tmp_path / "m.safetensors"
        save_file(weights, model, meta | {"ember_config": json.dumps(config)})
        out = tmp_path / "m.png"
        assert gen(model, out, *extra) == 0
        return json.loads(Image.open(out).text["ember"])["params"]["cfg"]

    config = json.loads(meta["ember_config"])
    assert cfg_used(config) == 7.0  # a model that names none: Stable Diffusion's 7
    assert cfg_used(config | {"guidance": 4.0}) == 4.0
    assert cfg_used(config | {"guidance": 4.0}, "--cfg", "6") == 6.0
    # a file written before models carried it gets its preset's (ember's own: 5)
    old = {k: v for k, v in config.items() if k != "guidance"} | {"name": "ember-small-z8p"}
    assert cfg_used(old) == 5.0


def test_batch_writes_numbered_files_with_own_seeds(tmp_path, tiny_model_file):
    # the model's pixels (--no-watermark): a batch may round a pixel the other way, and the
    # watermark's lattice could turn that into a few grey levels
    assert gen(tiny_model_file, tmp_path / "out.png", "--batch", "2", "--no-watermark") == 0
    seeds = [json.loads(Image.open(tmp_path / f"out-{i}.png").text["ember"])["params"]["seed"]
             for i in range(2)]  # fmt: skip
    assert seeds == [5, 6]
    single = tmp_path / "six.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_file), "--steps", "3",
                 "--seed", "6", "-q", "--no-watermark", "-o", str(single)]) == 0  # fmt: skip
    a = np.asarray(Image.open(single))
    b = np.asarray(Image.open(tmp_path / "out-1.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _expect_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in err.lower(), err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--size", "65x64"], "multiple of 8"),
        (["--size", "4096x4096"], "2048"),
        (["--steps", "0"], "steps"),
        (["--steps", "1001"], "steps"),
        (["--sampler", "nope"], "nope"),
        (["--size", "banana"], "size"),
        (["--cfg", "nan"], "cfg"),
        (["--vae-tiling", "maybe"], "vae tiling 'maybe' is not allowed: use auto, on or off"),
    ],
)
def test_bad_generation_settings(tmp_path, tiny_model_file, capsys, extra, needle):
    out = tmp_path / "x.png"
    _expect_error(
        capsys,
        ["generate", "p", "--model", str(tiny_model_file), "-q", "-o", str(out), *extra],
        needle,
    )
    assert not out.exists()


def test_strength_and_mask_errors(tmp_path, tiny_model_file, capsys):
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(img)
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 64), 255).save(mask)
    base = ["generate", "p", "--model", str(tiny_model_file), "-q", "-o", str(tmp_path / "o.png")]
    _expect_error(capsys, [*base, "--init-image", str(img), "--strength", "1.5"], "strength")
    _expect_error(capsys, [*base, "--init-image", str(img), "--strength", "-0.1"], "strength")
    _expect_error(capsys, [*base, "--init-image", str(img), "--mask", str(mask)], "mask")


def _write_bad(path, kind, good):
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-safetensors":
        path.write_bytes(b"hello, I am not a model" * 100)
    elif kind == "lying-offsets":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 10**12]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    elif kind == "huge-header":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "kind", ["truncated", "not-safetensors", "lying-offsets", "huge-header", "empty"]
)
def test_bad_model_files(tmp_path, tiny_model_file, capsys, kind):
    bad = tmp_path / "bad.safetensors"
    _write_bad(bad, kind, tiny_model_file)
    out = tmp_path / "o.png"
    _expect_error(
        capsys, ["generate", "p", "--model", str(bad), "-q", "-o", str(out)], "bad.safetensors"
    )
    assert not out.exists()


def test_missing_model_and_pickle_refused(tmp_path, capsys):
    _expect_error(
        capsys, ["generate", "p", "--model", str(tmp_path / "nope.safetensors"), "-q"], "not found"
    )
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    _expect_error(capsys, ["generate", "p", "--model", str(ckpt), "-q"], "ember convert")


def test_pickled_checkpoint_converts_with_weights_only(tmp_path, capsys):
    good = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3)}}, good)
    out = tmp_path / "ok.safetensors"
    assert main(["convert", str(good), str(out)]) == 0
    assert torch.equal(read_safetensors(out)[0]["a.weight"], torch.ones(2, 3))

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": Evil()}}, evil)
    _expect_error(capsys, ["convert", str(evil), str(tmp_path / "e.safetensors")], "refused")
    assert not (tmp_path / "PWNED").exists()


def test_nan_model_writes_no_image(tmp_path, tiny_model_file, capsys):
    tensors, meta = read_safetensors(tiny_model_file)
    key = next(k for k in tensors if k.startswith("model.diffusion_model.out."))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_safetensors(tensors, bad, meta)
    out = tmp_path / "o.png"
    _expect_error(
        capsys, ["generate", "p", "--model", str(bad), "--steps", "2", "-q", "-o", str(out)], "NaN"
    )
    assert not out.exists()


def test_non_native_sizes_and_clip_skip(tmp_path, tiny_model_file):
    out = tmp_path / "wide.png"
    assert gen(tiny_model_file, out, "--size", "96x48", "--clip-skip", "2") == 0
    assert Image.open(out).size == (96, 48)
    assert "Clip skip: 2" in Image.open(out).text["parameters"]


def test_models_lists_hashes(tmp_path, tiny_model_file, capsys):
    assert main(["models", str(tiny_model_file)]) == 0
    sha, short = checkpoints.file_hashes(tiny_model_file)
    assert capsys.readouterr().out.split()[:2] == [short, sha]


def _inpaint_inputs(tmp_path):
    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(init)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    return init, mask_path


def test_inpaint_with_ordinary_model_keeps_the_unmasked_half(tmp_path, tiny_model_file):
    init, mask = _inpaint_inputs(tmp_path)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert (
        gen(tiny_model_file, a, "--init-image", str(init), "--mask", str(mask), "--strength", "1")
        == 0
    )
    assert main(["generate", "a blue square", "--model", str(tiny_model_file), "--steps", "3", "--seed", "9",
                 "-q", "-o", str(b), "--init-image", str(init), "--mask", str(mask), "--strength", "1"]) == 0  # fmt: skip
    x, y = (np.asarray(Image.open(p)).astype(int) for p in (a, b))
    keep = np.abs(x[:, :24] - y[:, :24]).mean()
    repaint = np.abs(x[:, 40:] - y[:, 40:]).mean()
    assert repaint > 4 * keep, (keep, repaint)
    assert json.loads(Image.open(a).text["ember"])["mode"] == "inpaint"


def test_inpaint_with_nine_channel_unet(tmp_path):
    from ember.config import get_preset
    from ember.models.ldm import LatentDiffusion
    from ember.models.text import build_text_encoder

    cfg = get_preset("tiny-inpaint")
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, build_text_encoder(cfg.text))
    path = tmp_path / "inpaint.safetensors"
    sd = checkpoints.internal_to_ldm(model.state_dict(), cfg, {})
    save_safetensors(sd, path, {checkpoints.CONFIG_KEY: cfg.to_json()})
    init, mask = _inpaint_inputs(tmp_path)
    out = tmp_path / "o.png"
    assert gen(path, out, "--init-image", str(init), "--mask", str(mask)) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    "weights, needle",
    [("position", "CATEGORY=NUMBER"), ("postion=2", "unknown categories"), ("position=-1", ">= 0")],
)
def test_bad_shapes_weights(tmp_path, capsys, weights, needle):
    out = tmp_path / "shapes"
    _expect_error(capsys, ["data", "shapes", str(out), "--n", "5", "--weights", weights], needle)
    assert not out.exists()


def test_unwritable_output_is_one_line(tmp_path, tiny_model_file, capsys):
    """A write the OS refuses (here: -o under a path that is a file) is one line, exit 2."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    _expect_error(
        capsys,
        ["generate", "p", "--model", str(tiny_model_file), "-q", "-o", str(blocker / "x.png")],
        "not a directory",
    )
