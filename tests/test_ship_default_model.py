"""scripts/ship_default_model.py: decoder swaps only over the same encoder; the cost of caching;
what the card says about each stage; scores only of the file shipped."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ember.config import get_preset
from ember.train.state import checkpoint_name

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


def _unet_run(tmp_path: Path, ema_decay: float) -> Path:
    """A finished 10-step U-Net run folder: its export (`_model`) and card."""
    run = tmp_path / "unet"
    run.mkdir()
    _model(run / "model.safetensors", torch.zeros(2), torch.zeros(2))
    cost = {"steps": 10, "images_seen": 80, "wall_seconds": 5.0, "cpu_seconds": 9.0,
            "estimated_flops": 1.0, "bf16_autocast": False, "processes": 1,
            "cache_wall_seconds": {"latents": 1.0, "text": 1.0}}  # fmt: skip
    arch = json.loads(get_preset("tiny").to_json())
    data = {"path": "d", "images": 8, "unlicensed_images": 0, "skipped_corrupt_images": 0,
            "sources": []}  # fmt: skip
    card = {"task": "unet", "model": arch, "run": cost, "data": data,
            "training": {"steps": 10, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                         "ema_decay": ema_decay, "data": "d"}}  # fmt: skip
    (run / "model_card.json").write_text(json.dumps(card))
    return run


def test_card_only_takes_scores_of_the_file_it_ships(tmp_path, monkeypatch):
    ship = _ship()
    run = _unet_run(tmp_path, 0.0)
    out = tmp_path / "out"

    def main(*evals):
        argv = ["ship", str(run), "--out", str(out), "--evals", *map(str, evals)]
        monkeypatch.setattr(sys, "argv", argv)
        ship.main()

    main()
    sha = json.loads((out / "model_card.json").read_text())["sha256"]
    shipped = (out / "ember-small.safetensors").read_bytes()

    def report(name, model_sha):
        folder = tmp_path / name
        folder.mkdir()
        scores = {"split": "held-out", "overall": 0.7, "per_category": {"position": 0.7},
                  "images_per_prompt": 4, "sampler": "euler", "steps": 20, "cfg": 5.0,
                  "model_sha256": model_sha}  # fmt: skip
        (folder / "report.json").write_text(json.dumps(scores))
        Image.new("RGB", (8, 8)).save(folder / "sheet.png")
        return folder

    # scores of other bytes (an earlier write of the same weights) are refused; nothing changes
    with pytest.raises(SystemExit, match="not the shipped file"):
        main(report("other", "0" * 64))
    assert (out / "ember-small.safetensors").read_bytes() == shipped
    assert json.loads((out / "model_card.json").read_text())["evaluation"] == {}
    assert not list(out.glob("*.tmp"))
    # scores of the shipped file are taken, and its bytes are kept
    main(report("same", sha))
    card = json.loads((out / "model_card.json").read_text())
    assert card["sha256"] == sha and card["evaluation"]["geneval held-out"]["overall"] == 0.7
    assert (out / "ember-small.safetensors").read_bytes() == shipped

    # --rescore: new scores of the same file replace those of their kind; nothing else changes
    def rescore(*evals):
        monkeypatch.setattr(sys, "argv", ["ship", "--rescore", "--out", str(out), "--evals",
                                          *map(str, evals)])  # fmt: skip
        ship.main()

    emoji = report("emoji", sha)
    (emoji / "report.json").write_text(json.dumps({"top1": 0.3, "top5": 0.5, "n": 100,
                                                   "candidates": 9, "chance_top1": 0.1,
                                                   "model_sha256": sha}))  # fmt: skip
    main(report("first", sha), emoji)
    before = json.loads((out / "model_card.json").read_text())
    better = report("better", sha)
    scores = json.loads((better / "report.json").read_text())
    (better / "report.json").write_text(json.dumps({**scores, "overall": 0.75}))
    with pytest.raises(SystemExit, match="not the shipped file"):
        rescore(better, report("stale", "0" * 64))
    assert json.loads((out / "model_card.json").read_text()) == before
    rescore(better)
    after = json.loads((out / "model_card.json").read_text())
    assert after["evaluation"]["geneval held-out"]["overall"] == 0.75
    assert after == before | {"evaluation": before["evaluation"] | after["evaluation"]}
    assert after["evaluation"]["emoji"] == before["evaluation"]["emoji"]
    assert "overall **0.750**" in (out / "MODEL_CARD.md").read_text()
    assert (out / "ember-small.safetensors").read_bytes() == shipped


def test_raw_unet_weights_come_from_the_last_checkpoint_and_the_card_says_so(tmp_path, monkeypatch):
    ship = _ship()
    run = _unet_run(tmp_path, 0.999)
    out = tmp_path / "out"

    def main(weights):
        argv = ["ship", str(run), "--out", str(out), "--unet-weights", weights]
        monkeypatch.setattr(sys, "argv", argv)
        ship.main()

    with pytest.raises(SystemExit, match="no checkpoint of the run's last step"):
        main("raw")
    for step, value in ((5, 5.0), (10, 7.0)):  # an older checkpoint, and the last step's
        folder = run / "checkpoints" / checkpoint_name(step)
        folder.mkdir(parents=True)
        save_file({"out.weight": torch.full((3,), value)}, str(folder / "model.safetensors"))
    main("raw")
    shipped = load_file(str(out / "ember-small.safetensors"))
    assert torch.equal(shipped["model.diffusion_model.out.weight"], torch.full((3,), 7.0))
    assert torch.equal(shipped["first_stage_model.encoder.conv_in.weight"], torch.zeros(2))
    stage = json.loads((out / "model_card.json").read_text())["stages"][-1]
    assert stage["weights"] == "raw"
    assert "raw weights of the last step" in (out / "MODEL_CARD.md").read_text()
    main("ema")  # the run's export, as before
    shipped = load_file(str(out / "ember-small.safetensors"))
    assert torch.equal(shipped["model.diffusion_model.out.weight"], torch.ones(3))
    assert "raw weights" not in (out / "MODEL_CARD.md").read_text()


def test_rewriting_the_card_keeps_its_hand_written_part(tmp_path):
    ship = _ship()
    card = json.loads(
        (SCRIPT.parents[1] / "src/ember/assets/default-model/model_card.json").read_text()
    )
    ship.write_card(tmp_path, card)
    generated = (tmp_path / "MODEL_CARD.md").read_text()
    assert ship.HAND_WRITTEN not in generated
    notes = f"{ship.HAND_WRITTEN}\n\n## History\n\nwritten by a person\n"
    (tmp_path / "MODEL_CARD.md").write_text(generated + "\n" + notes)
    ship.write_card(tmp_path, card | {"evaluation": {}})
    text = (tmp_path / "MODEL_CARD.md").read_text()
    assert text.endswith(notes) and text.count(ship.HAND_WRITTEN) == 1
