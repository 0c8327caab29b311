"""Checkpoints: weights and training state, committed atomically, never pickled.

Layout of a run folder's `checkpoints/`:

    step_000500/  model.safetensors  ema.safetensors  state.safetensors  state.json
    latest        "step_000500" (written via a temp file + rename)

A checkpoint is written into a hidden temp folder, every file fsynced, then the folder is renamed
into place and `latest` is replaced the same way. A kill at any moment therefore leaves the
previous checkpoint complete and pointed at; stale temp folders are removed on the next save.
A checkpoint is several files that must change together, so its commit is a folder rename, not
`ember.files.write_atomic` (which serves the one-file `latest` pointer).
The optimizer state is flattened into tensors (safetensors) + structure (JSON).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ember.files import fsync_dir, write_atomic

CHECKPOINTS = "checkpoints"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    # safetensors refuses shared/non-contiguous storage; a copy is cheap next to the disk write.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path, meta)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors named `opt.{param}.{key}`, JSON-able structure)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in structure["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """The process-global RNG states (torch CPU/CUDA, python, numpy) as tensors + JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    info = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], py[2]]}
    tensors["rng.python"] = torch.tensor(py[1], dtype=torch.int64)
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, pos, has_gauss, gauss = info["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, gauss_py = info["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng.python"].tolist()), gauss_py))


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: weights, optimizer state, extra tensors and JSON state."""

    step: int
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    tensors: dict[str, torch.Tensor]
    state: dict


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    state: dict,
    metadata: dict[str, str],
    keep: int,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it and prune to the last `keep`.

    `tensors` (RNG and sampler states...) and `state` (JSON scalars) are written with the
    optimizer's flattened state. `before_commit` runs after all files are durable but before
    the rename (tests use it to kill the process at the worst moment).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    for stale in root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_{name}_{os.getpid()}"
    tmp.mkdir()
    _save_tensors(model, tmp / "model.safetensors", metadata)
    if ema is not None:
        _save_tensors(ema, tmp / "ema.safetensors", metadata)
    opt_tensors, opt_structure = flatten_optimizer(optimizer)
    _save_tensors({**opt_tensors, **tensors}, tmp / "state.safetensors", {})
    full_state = {**state, "step": step, "optimizer": opt_structure, "saved_at": time.time()}
    with open(tmp / "state.json", "w") as f:
        json.dump(full_state, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if before_commit is not None:
        before_commit()
    final = root / name
    if final.exists():  # re-saving the same step (e.g. a resumed run stopped at once)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    write_atomic(root / "latest", name.encode())
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder (`step_0000500`) holds."""
    return int(Path(folder).name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or the newest committed folder if `latest` is missing."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    with open(path / "state.json") as f:
        state = json.load(f)
    tensors = load_file(path / "state.safetensors")
    ema_path = path / "ema.safetensors"
    return Checkpoint(
        step=int(state["step"]),
        path=path,
        model=load_file(path / "model.safetensors"),
        ema=load_file(ema_path) if ema_path.is_file() else None,
        optimizer=unflatten_optimizer(tensors, state["optimizer"]),
        tensors={k: v for k, v in tensors.items() if not k.startswith("opt.")},
        state=state,
    )
