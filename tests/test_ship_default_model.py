"""scripts/ship_default_model.py: a decoder fine-tune is swapped in only over the same encoder."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_default_model.py"


def _ship():
    spec = importlib.util.spec_from_file_location("ship_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(path: Path, enc: torch.Tensor, dec: torch.Tensor) -> Path:
    tensors = {
        "first_stage_model.encoder.conv_in.weight": enc,
        "first_stage_model.decoder.conv_in.weight": dec,
        "model.diffusion_model.out.weight": torch.ones(3),
    }
    save_file(tensors, str(path), {"ember_config": "{}"})
    return path


def test_swap_vae_takes_the_new_decoder_and_keeps_the_rest(tmp_path):
    enc, old, new = torch.randn(4), torch.zeros(4), torch.ones(4)
    model = _model(tmp_path / "m.safetensors", enc, old)
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": enc, "decoder.conv_in.weight": new}, str(vae))
    _ship().swap_vae(model, vae)
    out = load_file(str(model))
    assert torch.equal(out["first_stage_model.decoder.conv_in.weight"], new)
    assert torch.equal(out["first_stage_model.encoder.conv_in.weight"], enc)
    assert torch.equal(out["model.diffusion_model.out.weight"], torch.ones(3))
    with safe_open(str(model), "pt") as f:
        assert f.metadata() == {"ember_config": "{}"}


def test_swap_vae_refuses_a_different_encoder(tmp_path):
    model = _model(tmp_path / "m.safetensors", torch.zeros(4), torch.zeros(4))
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.ones(4), "decoder.conv_in.weight": torch.ones(4)},
              str(vae))  # fmt: skip
    before = model.read_bytes()
    with pytest.raises(SystemExit, match="encoder differs"):
        _ship().swap_vae(model, vae)
    assert model.read_bytes() == before
