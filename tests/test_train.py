"""Training subsystem: exact resume, atomic checkpoints, signals, DDP parity, NaN guard, licences.

Tiny preset at 16x16 pixels, one thread per process so in-process and subprocess runs are
bit-comparable. Faults are injected through `TrainHooks` (`FaultHooks` below); processes that
must be killed run as real subprocesses of `drive` (this module run by `python -c`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ember.train import state as S
from ember.train.config import TrainConfig, add_train_args, config_from_args, parse_train_args
from ember.train.loop import EpochSampler, TrainHooks, cxx_compiler, lr_at
from ember.train.run import main_train_unet, main_train_vae, run_train_unet, run_train_vae

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--warmup-steps", "2",
          "--log-every", "1", "--sample-every", "0", "--threads", "1", "--lr", "1e-3", "--bf16", "off"]  # fmt: skip


def make_data(root: Path, n: int = 8, *, unlicensed: int = 0, corrupt: int = 0) -> Path:
    """A dataset folder of `n` random 16x16 PNGs (the last `unlicensed` without a licence)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "manifest.jsonl", "w") as f:
        for i in range(n):
            name = f"images/{i:03d}.png"
            if i < corrupt:
                (root / name).write_bytes(b"not a png")
            else:
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name)
            row = {"file": name, "caption": [f"a shape {i % 3}", f"shape number {i % 2}"]}
            if i < n - unlicensed:
                row |= {"license": "CC-BY-4.0", "source": "test set", "attribution": "A. Tester"}
            f.write(json.dumps(row) + "\n")
    return root


def in_process(main, argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@dataclass
class FaultHooks(TrainHooks):
    """Faults at chosen steps: non-finite losses, or a pause (printing `marker`) at the moment
    a kill hurts most, so the test can kill the process exactly there."""

    nan_steps: tuple[int, ...] = ()  # 0-based optimizer steps whose loss becomes NaN
    hang_after_save: int = -1  # park after checkpoint N is committed, until a stop signal
    hang_before_commit: int = -1  # park after checkpoint N is written but before its rename

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_steps else loss

    def before_commit(self, step: int) -> None:
        if step == self.hang_before_commit:
            park(f"HOOK_WRITING {step}")

    def after_save(self, step: int, stop_requested: Callable[[], bool]) -> None:
        if step == self.hang_after_save:
            park(f"HOOK_SAVED {step}", until=stop_requested)


def park(marker: str, until: Callable[[], bool] | None = None) -> None:
    print(marker, file=sys.stderr, flush=True)
    while until is None or not until():
        time.sleep(0.02)


def train(task: str, argv: list[str], hooks: TrainHooks | None = None) -> int:
    """`ember train TASK ARGV` in this process, with `hooks` (the CLI's exit code)."""
    run = run_train_vae if task == "vae" else run_train_unet
    return in_process(lambda a: run(parse_train_args(a, task), hooks), argv)


def drive(argv: list[str]) -> int:
    """Subprocess entry: `TASK FAULTS_JSON ARGS...` trains with `FaultHooks(**FAULTS_JSON)`."""
    task, faults, args = argv[0], json.loads(argv[1]), argv[2:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return train(task, args, FaultHooks(**faults))


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def spawn(task: str, args: list[str], **faults: int) -> subprocess.Popen:
    """A training subprocess with `FaultHooks(**faults)` (see `drive`)."""
    code = "import sys, test_train; sys.exit(test_train.drive(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, task, json.dumps(faults), *args]
    return subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 60) -> None:
    """Read stderr until `marker` appears (the process is then parked in a test hook)."""
    import select

    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if marker in line:
                return
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"{marker!r} never appeared; stderr:\n{seen[-3000:]}")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("vae")
    argv = [str(data), str(run), *COMMON, "--steps", "4", "--checkpoint-every", "2",
            "--sample-every", "2", "--edge-weight", "0.1"]  # fmt: skip
    assert in_process(main_train_vae, argv) == 0
    return run


# --------------------------------------------------------------------------- configuration


def test_cli_flags_come_from_the_dataclass():
    parser = add_train_args(argparse.ArgumentParser(), "unet")
    argv = ["d", "r", "--steps", "7", "--no-resume", "--allow-unlicensed", "--prediction", "v"]
    args = parser.parse_args([*argv, "--lr", "3e-4", "--vae", "x.safetensors"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.prediction, cfg.allow_unlicensed) == (7, 3e-4, "v", True)
    assert cfg.batch_size == TrainConfig.batch_size
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "r", "--prediction", "x0"])
    vae_parser = add_train_args(argparse.ArgumentParser(), "vae")
    with pytest.raises(SystemExit):  # U-Net-only flags are not offered for the VAE
        vae_parser.parse_args(["d", "r", "--caption-dropout", "0.2"])
    with pytest.raises(ValueError, match="grad-accum"):
        TrainConfig(data="d", run_dir="r", batch_size=6, grad_accum=4).validate()


def test_data_order_is_a_function_of_seed_and_epoch():
    a = EpochSampler(10, seed=3)
    first = torch.cat([a.next(4) for _ in range(5)])  # crosses two epoch boundaries
    assert sorted(first[:10].tolist()) == list(range(10))
    b = EpochSampler(10, seed=3)
    b.next(4), b.next(4)
    info, tensors = b.state()
    c = EpochSampler(10, seed=3)
    c.restore(info, tensors)
    assert torch.equal(torch.cat([c.next(4) for _ in range(3)]), first[8:])
    assert not torch.equal(EpochSampler(10, seed=4).next(10), first[:10])


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)


# --------------------------------------------------------------------------- VAE


def test_vae_run_writes_export_metrics_samples_card(vae_run):
    with safe_open(str(vae_run / "vae.safetensors"), "pt") as f:
        mcfg = json.loads(f.metadata()["ember_config"])
        assert "encoder.conv_in.weight" in f.keys()
    card = json.loads((vae_run / "model_card.json").read_text())
    factor = mcfg["vae"]["scaling_factor"]
    assert factor == card["export"]["scaling_factor"] and factor != 1.0 and factor > 0
    assert card["data"]["sources"][0]["attribution"] == "A. Tester"
    assert card["run"]["images_seen"] == 16 and card["run"]["estimated_flops"] > 0
    assert card["evaluation"] is None
    lines = [json.loads(x) for x in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s", "elapsed_s"} <= lines[0].keys()
    assert (vae_run / "samples" / "step_0000004.png").is_file()
    assert json.loads((vae_run / "train_config.json").read_text())["steps"] == 4
    ck = S.load_checkpoint(S.latest_checkpoint(vae_run))
    assert ck.step == 4 and ck.state["train_config"]["preset"] == "tiny"
    assert "A. Tester" in (vae_run / "MODEL_CARD.md").read_text()


# --------------------------------------------------------------------------- U-Net: exact resume


def test_unet_resume_after_kill9_is_bit_identical(data, vae_run, tmp_path):
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "6",
            "--checkpoint-every", "3", "--grad-accum", "2", "--caption-dropout", "0.3",
            "--min-snr-gamma", "5"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert in_process(main_train_unet, [str(data), str(full), *args]) == 0

    proc = spawn("unet", [str(data), str(killed), *args], hang_after_save=3)
    wait_for(proc, "HOOK_SAVED 3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert S.load_checkpoint(S.latest_checkpoint(killed)).step == 3
    assert in_process(main_train_unet, [str(data), str(killed), *args, "--resume"]) == 0

    for name in ("model.safetensors", "ema.safetensors"):
        assert_identical(
            weights(full / "checkpoints/step_0000006" / name),
            weights(killed / "checkpoints/step_0000006" / name),
        )
    assert_identical(weights(full / "model.safetensors"), weights(killed / "model.safetensors"))
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    sd = weights(full / "model.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    assert any(k.startswith("first_stage_model.") for k in sd)
    assert any(k.startswith("cond_stage_model.") for k in sd)

    from ember.checkpoints import load_model  # the generate-side loader reads the export

    loaded = load_model(full / "model.safetensors")
    with safe_open(str(vae_run / "vae.safetensors"), "pt") as f:
        factor = json.loads(f.metadata()["ember_config"])["vae"]["scaling_factor"]
    assert loaded.config.vae.scaling_factor == factor
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(loaded.model.state_dict()[key], sd[key])


def test_kill_between_write_and_rename_keeps_previous_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    args = [str(data), str(run), *COMMON, "--steps", "6", "--checkpoint-every", "2"]
    proc = spawn("vae", args, hang_before_commit=4)
    wait_for(proc, "HOOK_WRITING 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob(".tmp_step_0000004_*"))  # the half-committed one
    latest = S.latest_checkpoint(run)
    assert latest.name == "step_0000002" and S.load_checkpoint(latest).step == 2
    assert in_process(main_train_vae, [*args, "--resume"]) == 0
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert S.latest_checkpoint(run).name == "step_0000006"


def test_sigterm_saves_at_step_boundary_and_exits_zero(data, tmp_path):
    run = tmp_path / "run"
    args = [str(data), str(run), *COMMON, "--steps", "50", "--checkpoint-every", "2"]
    proc = spawn("vae", args, hang_after_save=2)
    wait_for(proc, "HOOK_SAVED 2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err
    assert S.latest_checkpoint(run).name == "step_0000003"


# --------------------------------------------------------------------------- DDP


def test_torchrun_two_processes_match_one(data, vae_run, tmp_path):
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "3",
            "--checkpoint-every", "0", "--ema-decay", "0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert in_process(main_train_unet, [str(data), str(one), *args]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ember.train", "unet",
           str(data), str(two), *args]  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    loss = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    loss2 = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    a, b = weights(one / "model.safetensors"), weights(two / "model.safetensors")
    assert a["model.diffusion_model.out.2.weight"].abs().sum() > 0  # zero-initialised: it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((two / "model_card.json").read_text())["run"]["processes"] == 2


# --------------------------------------------------------------------------- faults, licences


def test_nonfinite_loss_skips_step_then_stops(data, tmp_path):
    run = tmp_path / "run"
    argv = [str(data), str(run), *COMMON, "--steps", "3"]
    assert train("vae", argv, FaultHooks(nan_steps=(1,))) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["skipped"] is True and lines[1]["loss"] == "nan"
    assert json.loads((run / "model_card.json").read_text())["run"]["skipped_nonfinite_steps"] == 1

    run2 = tmp_path / "run2"
    argv = [str(data), str(run2), *COMMON, "--steps", "9", "--checkpoint-every", "2",
            "--max-bad-steps", "3"]  # fmt: skip
    assert train("vae", argv, FaultHooks(nan_steps=(2, 3, 4, 5))) == 3
    latest = S.latest_checkpoint(run2)
    assert latest.name == "step_0000004" and S.load_checkpoint(latest).step == 4
    assert not (run2 / "vae.safetensors").exists()


def test_unlicensed_data_refused_unless_allowed_and_recorded(tmp_path, capsys):
    data = make_data(tmp_path / "d", n=6, unlicensed=2, corrupt=1)
    argv = [str(data), str(tmp_path / "r"), *COMMON, "--steps", "1"]
    assert in_process(main_train_vae, argv) == 2
    assert "no licence" in capsys.readouterr().err
    assert in_process(main_train_vae, [*argv, "--allow-unlicensed"]) == 0
    card = json.loads((tmp_path / "r" / "model_card.json").read_text())["data"]
    assert card["unlicensed_images"] == 2 and card["allow_unlicensed"] is True
    assert card["skipped_corrupt_images"] == 1 and card["images"] == 5
    assert "--allow-unlicensed used" in (tmp_path / "r" / "MODEL_CARD.md").read_text()


def test_bf16_autocast_trains(data, tmp_path):
    run = tmp_path / "run"
    argv = [str(data), str(run), *COMMON, "--steps", "2", "--bf16", "on"]
    assert in_process(main_train_vae, argv) == 0
    card = json.loads((run / "model_card.json").read_text())
    assert card["run"]["bf16_autocast"] is True
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(v, float) for v in losses)


def test_existing_run_needs_resume(data, vae_run):
    argv = [str(data), str(vae_run), *COMMON, "--steps", "4"]
    assert in_process(main_train_vae, argv) == 2


def test_decoder_fine_tune_keeps_the_latent_space(data, vae_run, tmp_path):
    """--freeze-encoder: only the decoder learns, and the scaling factor is the starting VAE's."""
    start = vae_run / "vae.safetensors"
    tuned = tmp_path / "tuned"
    argv = [str(data), str(tuned), *COMMON, "--steps", "3", "--init-from", str(start),
            "--freeze-encoder", "--edge-weight", "0.5"]  # fmt: skip
    assert in_process(main_train_vae, argv) == 0
    a, b = weights(start), weights(tuned / "vae.safetensors")
    assert a.keys() == b.keys()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert not all(torch.equal(a[k], b[k]) for k in trained)

    def factor(path: Path) -> float:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["ember_config"])["vae"]["scaling_factor"]

    assert factor(tuned / "vae.safetensors") == factor(start)


def test_freeze_encoder_needs_a_starting_vae(data, tmp_path):
    argv = [str(data), str(tmp_path / "run"), *COMMON, "--steps", "1", "--freeze-encoder"]
    assert in_process(main_train_vae, argv) == 2


def test_init_from_starts_the_unet_from_an_exported_model(data, vae_run, tmp_path):
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "2"]
    first = tmp_path / "first"
    assert in_process(main_train_unet, [str(data), str(first), *args]) == 0
    tuned = tmp_path / "tuned"
    # A vanishing learning rate: the fine-tuned export must still be the model it started from.
    argv = [
        str(data),
        str(tuned),
        *args,
        "--lr",
        "1e-20",
        "--init-from",
        str(first / "model.safetensors"),
    ]
    assert in_process(main_train_unet, argv) == 0
    a, b = weights(first / "model.safetensors"), weights(tuned / "model.safetensors")
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.allclose(a[k], b[k], atol=1e-6) for k in unet)
    fresh = tmp_path / "fresh"
    assert (
        in_process(main_train_unet, [str(data), str(fresh), *args, "--lr", "1e-20", "--seed", "1"])
        == 0
    )
    c = weights(fresh / "model.safetensors")
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in unet)


def test_train_only_moves_the_matching_parameters_and_resumes_exactly(
    data, vae_run, tmp_path, capsys
):
    """--train-only: a fine-tune of the cross-attention leaves every other weight as it started,
    and a run stopped midway resumes to the same weights (the optimizer holds only the subset)."""
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--checkpoint-every", "0"]
    first = tmp_path / "first"
    assert in_process(main_train_unet, [str(data), str(first), *args, "--steps", "2"]) == 0
    start = first / "model.safetensors"
    tune = [*args, "--steps", "4", "--init-from", str(start), "--train-only", "*.attn2.*"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert in_process(main_train_unet, [str(data), str(full), *tune]) == 0
    a, b = weights(start), weights(full / "model.safetensors")
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    trained = [k for k in unet if ".attn2." in k]
    assert trained and len(trained) < len(unet)
    assert all(torch.equal(a[k], b[k]) for k in unet if k not in trained)
    assert not any(torch.equal(a[k], b[k]) for k in trained if k.endswith("to_q.weight"))
    assert json.loads((full / "train_config.json").read_text())["train_only"] == "*.attn2.*"
    assert in_process(main_train_unet, [str(data), str(split), *tune, "--stop-at", "2"]) == 0
    assert in_process(main_train_unet, [str(data), str(split), *tune, "--resume"]) == 0
    assert_identical(weights(split / "model.safetensors"), b)
    capsys.readouterr()
    # Bad input: a glob that matches nothing, or nothing to keep the frozen part from.
    bad = [*args, "--steps", "1", "--init-from", str(start), "--train-only", "*.attn9.*"]
    assert in_process(main_train_unet, [str(data), str(tmp_path / "bad"), *bad]) == 2
    assert "--train-only '*.attn9.*' matches no trainable parameter" in capsys.readouterr().err
    bad[-1] = " , "
    assert in_process(main_train_unet, [str(data), str(tmp_path / "bad2"), *bad]) == 2
    assert "names no glob" in capsys.readouterr().err
    bare = [*args, "--steps", "1", "--train-only", "*.attn2.*"]
    assert in_process(main_train_unet, [str(data), str(tmp_path / "bare"), *bare]) == 2
    assert "--train-only needs --init-from" in capsys.readouterr().err


def test_export_writes_a_checkpoint_as_a_model(data, vae_run, tmp_path, capsys):
    from ember.cli import main

    run = tmp_path / "run"
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "4",
            "--checkpoint-every", "2", "--keep-checkpoints", "3"]  # fmt: skip
    assert in_process(main_train_unet, [str(data), str(run), *args]) == 0
    # The latest checkpoint is the final state: its export is the run's own model file.
    assert main(["train", "export", str(run), "-o", str(tmp_path / "last.safetensors")]) == 0
    assert "(step 4)" in capsys.readouterr().out
    assert_identical(weights(tmp_path / "last.safetensors"), weights(run / "model.safetensors"))
    # An earlier step exports that step's EMA U-Net, and the generate-side loader reads it.
    early = tmp_path / "step2.safetensors"
    assert main(["train", "export", str(run), "--step", "2", "-o", str(early)]) == 0
    ema = weights(run / "checkpoints/step_0000002/ema.safetensors")
    got = weights(early)
    assert all(torch.equal(got["model.diffusion_model." + k], v) for k, v in ema.items())
    assert not torch.equal(got["model.diffusion_model.out.2.weight"],
                           weights(run / "model.safetensors")["model.diffusion_model.out.2.weight"])  # fmt: skip
    from ember.checkpoints import load_model

    assert load_model(early).config.name == "tiny"
    # Bad input: a missing step names the ones there are; a VAE run has nothing to export.
    assert main(["train", "export", str(run), "--step", "3", "-o", str(early)]) == 2
    assert "checkpoints: 2, 4" in capsys.readouterr().err
    assert main(["train", "export", str(vae_run), "-o", str(early)]) == 2
    assert "VAE run" in capsys.readouterr().err


def test_stop_at_exports_midway_and_resume_finishes_the_same_run(data, vae_run, tmp_path, capsys):
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "6",
            "--checkpoint-every", "0"]  # fmt: skip
    full, split = tmp_path / "full", tmp_path / "split"
    assert in_process(main_train_unet, [str(data), str(full), *args]) == 0
    # Stopping at step 3 of a 6-step schedule writes a model and a card that say so.
    assert in_process(main_train_unet, [str(data), str(split), *args, "--stop-at", "3"]) == 0
    card = json.loads((split / "model_card.json").read_text())
    assert (card["run"]["steps"], card["run"]["schedule_steps"]) == (3, 6)
    assert card["run"]["images_seen"] == 3 * 4
    # the caches were built by this run, and what that cost is recorded
    assert set(card["run"]["cache_wall_seconds"]) == {"latents", "text"}
    assert all(s > 0 for s in card["run"]["cache_wall_seconds"].values())
    assert S.load_checkpoint(S.latest_checkpoint(split)).step == 3
    assert not torch.equal(weights(split / "model.safetensors")["model.diffusion_model.out.2.weight"],
                           weights(full / "model.safetensors")["model.diffusion_model.out.2.weight"])  # fmt: skip
    # The learning rate followed the 6-step schedule, so resuming finishes the very same run.
    assert in_process(main_train_unet, [str(data), str(split), *args, "--resume"]) == 0
    assert_identical(weights(split / "model.safetensors"), weights(full / "model.safetensors"))
    assert json.loads((split / "model_card.json").read_text())["run"]["steps"] == 6
    capsys.readouterr()
    # Bad input: a stop past the schedule, or before where the run already is.
    assert (
        in_process(main_train_unet, [str(data), str(tmp_path / "x"), *args, "--stop-at", "7"]) == 2
    )
    assert "--stop-at must be between 0 (off) and --steps 6" in capsys.readouterr().err
    assert (
        in_process(main_train_unet, [str(data), str(split), *args, "--resume", "--stop-at", "4"])
        == 2
    )
    assert "already at step 6, past --stop-at 4" in capsys.readouterr().err


def test_text_layer_overrides_the_presets_context(data, vae_run, tmp_path, capsys):
    """--text-layer picks the encoder layer the U-Net reads; the export records it and bad values
    are refused before any work."""
    from ember.config import ModelConfig, get_preset

    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "1"]
    run = tmp_path / "layer1"
    assert in_process(main_train_unet, [str(data), str(run), *args, "--text-layer", "1"]) == 0
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        text = ModelConfig.from_json(f.metadata()["ember_config"]).text
    assert text.layer == 1 and text.depth == 1 < get_preset("tiny").text.num_layers
    layers = get_preset("tiny").text.num_layers
    for bad in (str(layers + 1), "0", "middle"):
        out = tmp_path / f"bad-{bad}"
        assert in_process(main_train_unet, [str(data), str(out), *args, "--text-layer", bad]) == 2
        assert "--text-layer" in capsys.readouterr().err


def test_min_snr_floor_is_checked_and_recorded(data, vae_run, tmp_path, capsys):
    """--min-snr-floor needs --min-snr-gamma and may not exceed it; a good one lands in the run's
    resolved config."""
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "1"]
    for bad in (["--min-snr-floor", "0.25"], ["--min-snr-gamma", "5", "--min-snr-floor", "6"]):
        out = tmp_path / "bad"
        assert in_process(main_train_unet, [str(data), str(out), *args, *bad]) == 2
        assert "--min-snr-floor must be between 0 and --min-snr-gamma" in capsys.readouterr().err
        assert not out.exists()
    run = tmp_path / "floor"
    good = ["--min-snr-gamma", "5", "--min-snr-floor", "0.25"]
    assert in_process(main_train_unet, [str(data), str(run), *args, *good]) == 0
    assert json.loads((run / "train_config.json").read_text())["min_snr_floor"] == 0.25


def test_min_snr_floor_files_floors_only_the_matching_items(data, vae_run, tmp_path, capsys):
    """--min-snr-floor-files puts the floor on the items whose path matches: matching every item
    trains exactly like the plain floor, matching some trains differently from both the plain
    floor and no floor; a pattern that matches nothing, or no floor to apply, is a clear error."""
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "2",
            "--min-snr-gamma", "5"]  # fmt: skip
    floor = ["--min-snr-floor", "1"]
    runs = {
        "none": [],
        "all": floor,
        "glob-all": [*floor, "--min-snr-floor-files", "images/*"],
        "some": [*floor, "--min-snr-floor-files", "images/00[0-3].png"],
    }
    for name, extra in runs.items():
        assert in_process(main_train_unet, [str(data), str(tmp_path / name), *args, *extra]) == 0
    err = capsys.readouterr().err
    assert "min-SNR floor on 4 of 8 items (images/00[0-3].png)" in err
    w = {name: weights(tmp_path / name / "model.safetensors") for name in runs}
    assert (
        json.loads((tmp_path / "some" / "train_config.json").read_text())["min_snr_floor_files"]
        == "images/00[0-3].png"
    )
    for key in w["all"]:
        torch.testing.assert_close(w["glob-all"][key], w["all"][key], rtol=0, atol=0)
    differs = lambda a, b: any(not torch.equal(w[a][k], w[b][k]) for k in w[a])  # noqa: E731
    assert differs("some", "all") and differs("some", "none") and differs("all", "none")
    for bad, message in (
        ([*floor, "--min-snr-floor-files", "emoji/*"], "matches no item"),
        (["--min-snr-floor-files", "images/*"], "--min-snr-floor-files needs --min-snr-floor"),
    ):
        out = tmp_path / "bad"
        assert in_process(main_train_unet, [str(data), str(out), *args, *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "cache").exists()  # refused before the caches are built


@pytest.mark.skipif(cxx_compiler() is None, reason="inductor needs a C++ compiler")
def test_compile_trains_like_eager_and_resumes_exactly(data, vae_run, tmp_path):
    args = [*COMMON, "--vae", str(vae_run / "vae.safetensors"), "--steps", "4",
            "--checkpoint-every", "2", "--min-snr-gamma", "5"]  # fmt: skip
    eager, full, split = tmp_path / "eager", tmp_path / "full", tmp_path / "split"
    assert in_process(main_train_unet, [str(data), str(eager), *args]) == 0
    torch._dynamo.reset()
    assert in_process(main_train_unet, [str(data), str(full), *args, "--compile"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    first = [str(data), str(split), *args, "--compile", "--stop-at", "2"]
    assert in_process(main_train_unet, first) == 0
    assert in_process(main_train_unet, [str(data), str(split), *args, "--compile", "--resume"]) == 0

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    # Fused kernels round differently, so compiled training follows eager closely, not exactly ...
    assert losses(full) == pytest.approx(losses(eager), rel=1e-3)
    a, b = weights(eager / "model.safetensors"), weights(full / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # ... while a compiled run resumed is the same compiled run.
    assert losses(split) == losses(full)
    assert_identical(b, weights(split / "model.safetensors"))
    assert json.loads((full / "train_config.json").read_text())["compile"] is True
