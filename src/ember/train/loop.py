"""The generic training loop: one process or many (torchrun/DDP), exact resume, no surprises.

A `TrainTask` (VAE or U-Net) owns the model and the loss; this loop owns everything else:
data order, learning rate, EMA, mixed precision, gradient accumulation, checkpoints, signals,
non-finite losses, metrics, the progress bar and the cost accounting for the model card.

Determinism: the data order is a function of (seed, epoch) only, and every random draw of a
step (noise, timesteps, caption dropout) comes from a generator seeded by (seed, step, micro),
drawn for the whole global micro-batch and then sliced per rank. So a run resumed from a
checkpoint is bit-identical to an uninterrupted one, and K ranks see exactly the samples and
noise one process would (equal up to the order of the gradient all-reduce).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ember.config import ModelConfig
from ember.train import state as S
from ember.train.config import EmberError, TrainConfig, train_only_globs

EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's slice of a global micro-batch of `n` samples."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_dist() -> Dist:
    """Join the torchrun job if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, local_world, device)


def set_threads(cfg: TrainConfig, d: Dist) -> None:
    if d.device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))


def _bf16_matmul_speedup(n: int = 512, reps: int = 5) -> float:
    """fp32 time / bf16 time of an n x n matmul (best of `reps`; noise only makes it cautious)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def bf16_fast(device: torch.device) -> bool:
    """True where bf16 runs fast: `native_bf16` hardware (the pipeline's own test), and on CPUs
    without AMX tiles only where a quick matmul benchmark confirms the AVX512-BF16 gain."""
    from ember.pipeline import cpu_flags, native_bf16

    if device.type == "cuda":
        return native_bf16("cuda")
    if not native_bf16("cpu"):
        return False
    return "amx_bf16" in cpu_flags() or _bf16_matmul_speedup() > 1.3


def use_bf16(cfg: TrainConfig, d: Dist) -> bool:
    """The autocast decision, made on rank 0 and shared so that every rank computes alike."""
    on = cfg.bf16 == "on" or (cfg.bf16 == "auto" and d.is_main and bf16_fast(d.device))
    if cfg.bf16 == "auto" and d.world > 1:
        flag = torch.tensor([float(on)], device=d.device)
        dist.broadcast(flag, src=0)
        on = bool(flag.item())
    return on


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as (1 + n) / (10 + n) so early weights do not dominate the average."""
    return min(decay, (1.0 + step) / (10.0 + step))


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of every random draw of one micro-step (global batch, all ranks alike)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + micro)


class EpochSampler:
    """Sample indices epoch by epoch; epoch e's order is randperm(n) seeded by (seed, e)."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise EmberError("the dataset is empty")
        self.n, self.seed = n, seed
        self.generator = torch.Generator()
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        self.generator.manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=self.generator)

    def next(self, batch: int) -> torch.Tensor:
        """The next `batch` indices (B,), crossing into the next epoch when one ends."""
        out = []
        while batch > 0:
            take = min(batch, self.n - self.pos)
            out.append(self._order[self.pos : self.pos + take])
            self.pos += take
            batch -= take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return torch.cat(out)

    def state(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        return {"epoch": self.epoch, "pos": self.pos}, {"sampler.rng": self.generator.get_state()}

    def restore(self, info: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        self.epoch, self.pos = int(info["epoch"]), int(info["pos"])
        self._order = self._permutation(self.epoch)
        self.generator.set_state(tensors["sampler.rng"])


class TrainTask(Protocol):
    """What the loop needs from a VAE or U-Net task."""

    name: str
    model: nn.Module  # the trainable module (unwrapped)
    model_config: ModelConfig
    num_items: int

    def loss(
        self, model: nn.Module, items: torch.Tensor, part: slice, gen: torch.Generator
    ) -> torch.Tensor:
        """Mean loss of samples `items[part]`; random draws are made for all of `items`."""
        ...

    def write_samples(self, model: nn.Module, path: Path) -> None: ...

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        """Export the final (EMA) model; return facts for the model card."""
        ...


@dataclass
class Progress:
    """Counters that survive resume (saved in every checkpoint)."""

    images_seen: int = 0
    steps: int = 0  # optimizer steps taken (the schedule may be longer: --stop-at)
    skipped_steps: int = 0
    bad_in_row: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    flops_per_step: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Hooks:
    """Test-only fault injection, driven by EMBER_TEST_* environment variables."""

    def __init__(self) -> None:
        env = os.environ
        self.nan_steps = {int(s) for s in env.get("EMBER_TEST_NAN_STEPS", "").split(",") if s}
        self.hang_after_save = int(env.get("EMBER_TEST_HANG_AFTER_SAVE", "-1"))
        self.hang_before_commit = int(env.get("EMBER_TEST_HANG_BEFORE_COMMIT", "-1"))

    @staticmethod
    def hang(marker: str, until: Any = None) -> None:
        print(marker, file=sys.stderr, flush=True)
        while until is None or not until():
            time.sleep(0.02)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True

    def uninstall(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _count_flops(
    task: TrainTask, model: nn.Module, items: torch.Tensor, cfg: TrainConfig, d: Dist, bf16: bool
) -> float:
    """FLOPs of one forward+backward on one rank's micro-batch (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, _autocast(bf16, d.device):
        loss = task.loss(model, items, d.part(len(items)), step_generator(cfg.seed, -1, 0))
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * cfg.grad_accum * d.world


def _autocast(bf16: bool, device: torch.device):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with ($CXX, else the first on PATH)."""
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None
    )


def compiled(net: nn.Module, d: Dist) -> nn.Module:
    """`net` under torch.compile (inductor, static shapes): the same weights, fused kernels.

    Compilation happens at the first call; on CPU inductor builds C++ kernels, so a compiler must
    be on PATH (checked before the first step rather than failing inside it). Kernels are cached on
    disk by torch, so a resumed run on the same machine compiles faster.
    """
    if d.device.type == "cpu" and not cxx_compiler():
        raise EmberError("--compile needs a C++ compiler (g++ or clang++) on PATH")
    if d.is_main:
        print("compiling the model (torch.compile): the first step takes a few minutes",
              file=sys.stderr)  # fmt: skip
    return torch.compile(net, dynamic=False)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines newer than the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    S.write_atomic(path, "".join(ln + "\n" for ln in keep).encode())


def freeze_except(model: nn.Module, globs: str) -> int:
    """Keep trainable only the parameters (already trainable) whose name matches one of the
    comma-separated `globs`; return how many tensors stay trainable.

    Raises `EmberError` when a glob matches no parameter, so a typo cannot silently train nothing
    or freeze what was meant to train.
    """
    patterns = train_only_globs(globs)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            example = named[0][0] if named else "none"
            raise EmberError(
                f"--train-only {pattern!r} matches no trainable parameter (names look like "
                f"{example!r})"
            )
    kept = 0
    for name, p in named:
        keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        p.requires_grad_(keep)
        kept += keep
    return kept


def run_training(task: TrainTask, cfg: TrainConfig, d: Dist) -> tuple[Progress, nn.Module]:
    """Train `task.model` up to step `cfg.stop_at or cfg.steps`; return the counters and the EMA
    (or raw) model.

    Raises `TrainingDiverged` after `cfg.max_bad_steps` non-finite losses in a row and
    `SystemExit(0)` after a SIGTERM/SIGINT-triggered checkpoint.
    """
    run_dir = Path(cfg.run_dir)
    hooks = _Hooks()
    model = task.model.to(d.device)
    if cfg.train_only:
        kept = freeze_except(model, cfg.train_only)
        if d.is_main:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"--train-only: training {kept} tensors ({n:,} parameters)", file=sys.stderr)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    ema_params = [p for p in ema.parameters()] if ema is not None else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    sampler = EpochSampler(task.num_items, cfg.seed)
    prog = Progress()
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    meta = {"ember_config": task.model_config.to_json(), "ember_train_config": cfg.to_json()}

    if cfg.resume and (found := S.latest_checkpoint(run_dir)) is not None:
        ck = S.load_checkpoint(found)
        model.load_state_dict(ck.model, strict=True)
        if ema is not None:
            ema.load_state_dict(ck.ema if ck.ema is not None else ck.model, strict=True)
        opt.load_state_dict(ck.optimizer)
        sampler.restore(ck.state["sampler"], ck.tensors)
        S.restore_rng(ck.tensors, ck.state["rng"])
        prog = Progress(**ck.state["progress"])
        start = ck.step
        if d.is_main:
            _truncate_metrics(metrics_path, start)
            print(f"resuming from {found} (step {start})", file=sys.stderr)
    elif not cfg.resume and S.list_checkpoints(run_dir):
        raise EmberError(
            f"{run_dir} already holds checkpoints; pass --resume or choose a new run folder"
        )
    end = cfg.stop_at or cfg.steps
    if start > end:
        raise EmberError(f"{run_dir} is already at step {start}, past --stop-at {end}")
    prog.steps = start
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=1))
        (run_dir / "model_config.json").write_text(task.model_config.to_json())

    net: nn.Module = model
    if d.world > 1:
        ids = [d.local_rank] if d.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if cfg.compile:
        net = compiled(net, d)

    # A resumed "auto" run keeps its first decision: a re-measured one could flip and break
    # bit-exact resume.
    resumed_bf16 = prog.extra.get("bf16") if start > 0 and cfg.bf16 == "auto" else None
    bf16 = bool(resumed_bf16) if resumed_bf16 is not None else use_bf16(cfg, d)
    prog.extra["bf16"] = bf16
    batch, accum = cfg.batch_size, cfg.grad_accum
    micro = batch // accum
    if micro % d.world:
        raise EmberError(
            f"--batch-size {batch} / --grad-accum {accum} = {micro} "
            f"must divide among {d.world} ranks"
        )
    if prog.flops_per_step == 0.0 and d.is_main:
        probe = torch.arange(micro) % task.num_items
        prog.flops_per_step = _count_flops(task, model, probe, cfg, d, bf16)

    def save(step: int) -> None:
        if not d.is_main:
            return
        samp_info, samp_tensors = sampler.state()
        rng_tensors, rng_info = S.capture_rng()
        prog_state = {k: getattr(prog, k) for k in Progress.__dataclass_fields__}
        commit_hook = None
        if hooks.hang_before_commit == step:
            commit_hook = lambda: _Hooks.hang(f"EMBER_TEST_WRITING {step}")  # noqa: E731
        S.save_checkpoint(
            run_dir, step, model.state_dict(), ema.state_dict() if ema is not None else None,
            opt, {**samp_tensors, **rng_tensors},
            {"sampler": samp_info, "rng": rng_info, "progress": prog_state,
             "train_config": json.loads(cfg.to_json())},
            meta, cfg.keep_checkpoints, before_commit=commit_hook,
        )  # fmt: skip

    stop = _StopFlag()
    stop.install()
    bar = tqdm(total=end, initial=start, file=sys.stderr, disable=not d.is_main,
               desc=f"train {task.name}", unit="step", dynamic_ncols=True)  # fmt: skip
    metrics = open(metrics_path, "a") if d.is_main else None
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    window_t, window_images = time.perf_counter(), 0
    autocast = _autocast(bf16, d.device)
    try:
        for step in range(start, end):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            items = sampler.next(batch)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for m in range(accum):
                chunk = items[m * micro : (m + 1) * micro]
                sync = net.no_sync() if d.world > 1 and m < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss = task.loss(
                            net, chunk, d.part(micro), step_generator(cfg.seed, step, m)
                        )
                    if step in hooks.nan_steps:
                        loss = loss * float("nan")
                    (loss.float() / accum).backward()
                loss_sum += loss.detach().double().cpu()
            # One collective carries the loss (for logging and the finite check) and the stop flag.
            shared = torch.stack(
                [loss_sum / accum, torch.tensor(float(stop.set), dtype=torch.float64)]
            )
            if d.world > 1:
                dist.all_reduce(shared)
                shared[0] /= d.world
            loss_value, stop_now = float(shared[0]), bool(shared[1] > 0)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                opt.step()
                if ema is not None:
                    decay = ema_decay_at(step, cfg.ema_decay)
                    with torch.no_grad():
                        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()],
                                             1.0 - decay)  # fmt: skip
                prog.bad_in_row = 0
            else:
                prog.bad_in_row += 1
                prog.skipped_steps += 1
            prog.images_seen += batch
            window_images += batch
            done = step + 1
            bar.update(1)
            if metrics is not None and (not finite or done % cfg.log_every == 0 or done == end):
                now = time.perf_counter()
                record = {
                    "step": done, "loss": loss_value if finite else str(loss_value), "lr": lr,
                    "grad_norm": grad_norm if math.isfinite(grad_norm) else str(grad_norm),
                    "images_per_s": window_images / max(now - window_t, 1e-9),
                    "elapsed_s": prog.wall_s + now - t_wall, "images_seen": prog.images_seen,
                }  # fmt: skip
                if not finite:
                    record["skipped"] = True
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                window_t, window_images = now, 0
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if not finite and prog.bad_in_row >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{prog.bad_in_row} non-finite losses in a row (last at step {done}); "
                    f"stopping. The last good checkpoint is "
                    f"{S.latest_checkpoint(run_dir) or 'none'}; lower --lr or check the data."
                )
            now_wall, now_cpu = time.perf_counter(), time.process_time()
            prog.wall_s += now_wall - t_wall
            prog.cpu_s += now_cpu - t_cpu
            t_wall, t_cpu = now_wall, now_cpu
            periodic = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
            prog.steps = done
            if periodic or stop_now or done == end:
                save(done)
                d.barrier()
                if d.is_main and hooks.hang_after_save == done:
                    _Hooks.hang(f"EMBER_TEST_SAVED {done}", until=lambda: stop.set)
            if stop_now:
                bar.close()
                if d.is_main:
                    print(f"stopped by signal: checkpoint saved at step {done}; "
                          f"continue with --resume", file=sys.stderr)  # fmt: skip
                raise SystemExit(0)
            if d.is_main and cfg.sample_every > 0 and done % cfg.sample_every == 0:
                (run_dir / "samples").mkdir(exist_ok=True)
                grid = run_dir / "samples" / f"step_{done:07d}.png"
                task.write_samples(ema if ema is not None else model, grid)
    finally:
        stop.uninstall()
        bar.close()
        if metrics is not None:
            metrics.close()
    return prog, (ema if ema is not None else model)
