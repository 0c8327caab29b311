"""scripts/ship_default_model.py: decoder swaps only over the same encoder; the cost of caching;
what the card says about each stage."""

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


def test_cache_cost_counts_both_caches_from_card_or_cache_files(tmp_path):
    ship = _ship()
    (tmp_path / "cache").mkdir()
    unet = {"task": "unet", "run": {}}
    # a card that records it
    card = {"task": "unet", "run": {"cache_wall_seconds": {"latents": 200.0, "text": 60.5}}}
    assert ship.cache_cost(tmp_path, card) == 260.5
    # an older card: the cache files' own metadata; a file without it leaves the cost unknown
    for name, meta in (("latents", {"build_wall_seconds": "215.0"}), ("text", {"key": "k"})):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "cache" / f"{name}.safetensors"), meta)
    assert ship.cache_cost(tmp_path, unet) is None
    save_file({"x": torch.zeros(1)}, str(tmp_path / "cache/text.safetensors"),
              {"build_wall_seconds": "65.0"})  # fmt: skip
    assert ship.cache_cost(tmp_path, unet) == 280.0
    assert ship.cache_cost(tmp_path, {"task": "vae", "run": {}}) == 0.0
    stage = {"cost": {"wall_seconds": 1000.0, "cache_wall_seconds": 280.0}}
    assert ship.stage_seconds(stage) == 1280.0


def test_card_states_the_loss_weighting_a_unet_stage_trained_with():
    training = {"steps": 100, "batch_size": 8, "lr": 1e-3, "warmup_steps": 5, "ema_decay": 0.999,
                "min_snr_gamma": 5.0, "min_snr_floor": 0.25, "min_snr_floor_files": "1-emoji-*/*",
                "data": "d"}  # fmt: skip
    stage = {"name": "u", "part": "unet", "init_from": "", "freeze_encoder": False,
             "data": {"path": "d"}, "training": training, "cost": {"steps": 100}}  # fmt: skip
    line = _ship().describe(stage)
    assert "min-SNR gamma 5 with a floor of 0.25 on `1-emoji-*/*`" in line
    plain = dict(stage, training=dict(training, min_snr_floor=0.0, min_snr_floor_files=""))
    line = _ship().describe(plain)
    assert "min-SNR gamma 5;" in line and "floor" not in line
