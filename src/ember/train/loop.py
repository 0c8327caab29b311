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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ember.config import ModelConfig
from ember.files import write_atomic
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
    from ember.device import cpu_flags, native_bf16

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


class TrainHooks:
    """Callbacks at the moments of a run where a fault hurts most; every default does nothing.

    Tests subclass this to inject faults (a non-finite loss, a kill between writing a checkpoint
    and committing it, a kill just after a save) through `run_training(..., hooks=...)`.
    """

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-step of optimizer step `step` (0-based), before its backward."""
        return loss

    def before_commit(self, step: int) -> None:
        """Checkpoint `step` is durable on disk but not yet renamed into place (rank 0)."""

    def after_save(self, step: int, stop_requested: Callable[[], bool]) -> None:
        """Checkpoint `step` is committed (rank 0); `stop_requested()` turns true on SIGTERM."""


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
    write_atomic(path, "".join(ln + "\n" for ln in keep).encode())


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


def run_training(
    task: TrainTask, cfg: TrainConfig, d: Dist, hooks: TrainHooks | None = None
) -> tuple[Progress, nn.Module]:
    """Train `task.model` up to step `cfg.stop_at or cfg.steps`; return the counters and the EMA
    (or raw) model.

    Raises `TrainingDiverged` after `cfg.max_bad_steps` non-finite losses in a row and
    `SystemExit(0)` after a SIGTERM/SIGINT-triggered checkpoint.
    """
    run = _Run(task, cfg, d, hooks or TrainHooks())
    start = run.restore()
    end = cfg.stop_at or cfg.steps
    if start > end:
        raise EmberError(f"{run.dir} is already at step {start}, past --stop-at {end}")
    run.prepare(start)
    with run.session(start, end):
        for step in range(start, end):
            result = run.step(step)
            done = step + 1
            run.log(done, result, last=done == end)
            if not result.finite and run.prog.bad_in_row >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{run.prog.bad_in_row} non-finite losses in a row (last at step {done}); "
                    f"stopping. The last good checkpoint is "
                    f"{S.latest_checkpoint(run.dir) or 'none'}; lower --lr or check the data."
                )
            run.account_time()
            run.prog.steps = done
            periodic = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
            if periodic or result.stop or done == end:
                run.save(done)
            if result.stop:
                run.bar.close()
                if d.is_main:
                    print(f"stopped by signal: checkpoint saved at step {done}; "
                          f"continue with --resume", file=sys.stderr)  # fmt: skip
                raise SystemExit(0)
            if d.is_main and cfg.sample_every > 0 and done % cfg.sample_every == 0:
                run.write_samples(done)
    return run.prog, run.final_model


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports (the loss and stop flag agreed across ranks)."""

    lr: float
    loss: float
    grad_norm: float
    stop: bool  # a SIGTERM/SIGINT reached some rank: save and exit at this boundary

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class _Run:
    """One training run's state, and the stages `run_training` calls in order:
    restore, prepare, then per step: step, log, account_time, save, write_samples."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, d: Dist, hooks: TrainHooks) -> None:
        self.task, self.cfg, self.d, self.hooks = task, cfg, d, hooks
        self.dir = Path(cfg.run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.meta = {
            "ember_config": task.model_config.to_json(),
            "ember_train_config": cfg.to_json(),
        }
        model = task.model.to(d.device)
        if cfg.train_only:
            kept = freeze_except(model, cfg.train_only)
            if d.is_main:
                n = sum(p.numel() for p in model.parameters() if p.requires_grad)
                print(f"--train-only: training {kept} tensors ({n:,} parameters)", file=sys.stderr)
        self.model = model
        self.net: nn.Module = model  # what the step calls: DDP- and/or compile-wrapped
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
        )
        self.sampler = EpochSampler(task.num_items, cfg.seed)
        self.micro = cfg.batch_size // cfg.grad_accum  # samples per accumulation micro-step
        self.prog = Progress()
        self.bf16 = False
        self.stop = _StopFlag()

    @property
    def final_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    # ------------------------------------------------------------------ before the first step

    def restore(self) -> int:
        """Load the latest checkpoint when resuming; return the step to start from.

        Refuses a run folder that already holds checkpoints unless `--resume` is given.
        """
        cfg, d = self.cfg, self.d
        found = S.latest_checkpoint(self.dir) if cfg.resume else None
        if found is None:
            if not cfg.resume and S.list_checkpoints(self.dir):
                raise EmberError(
                    f"{self.dir} already holds checkpoints; pass --resume or choose a new run folder"
                )
            return 0
        ck = S.load_checkpoint(found)
        self.model.load_state_dict(ck.model, strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(ck.ema if ck.ema is not None else ck.model, strict=True)
        self.opt.load_state_dict(ck.optimizer)
        self.sampler.restore(ck.state["sampler"], ck.tensors)
        S.restore_rng(ck.tensors, ck.state["rng"])
        self.prog = Progress(**ck.state["progress"])
        if d.is_main:
            _truncate_metrics(self.metrics_path, ck.step)
            print(f"resuming from {found} (step {ck.step})", file=sys.stderr)
        return ck.step

    def prepare(self, start: int) -> None:
        """Record the configs, wrap the model (DDP, compile), settle bf16 and count FLOPs."""
        cfg, d, prog = self.cfg, self.d, self.prog
        prog.steps = start
        if d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "train_config.json").write_text(
                json.dumps(json.loads(cfg.to_json()), indent=1)
            )
            (self.dir / "model_config.json").write_text(self.task.model_config.to_json())
        if d.world > 1:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, broadcast_buffers=False
            )
        if cfg.compile:
            self.net = compiled(self.net, d)
        # A resumed "auto" run keeps its first decision: a re-measured one could flip and break
        # bit-exact resume.
        resumed_bf16 = prog.extra.get("bf16") if start > 0 and cfg.bf16 == "auto" else None
        self.bf16 = bool(resumed_bf16) if resumed_bf16 is not None else use_bf16(cfg, d)
        prog.extra["bf16"] = self.bf16
        if self.micro % d.world:
            raise EmberError(
                f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} = {self.micro} "
                f"must divide among {d.world} ranks"
            )
        if prog.flops_per_step == 0.0 and d.is_main:
            probe = torch.arange(self.micro) % self.task.num_items
            prog.flops_per_step = _count_flops(self.task, self.model, probe, cfg, d, self.bf16)

    @contextlib.contextmanager
    def session(self, start: int, end: int):
        """Signal handlers, progress bar, metrics file and clocks for the steps `start..end`."""
        self.stop.install()
        self.bar = tqdm(total=end, initial=start, file=sys.stderr, disable=not self.d.is_main,
                        desc=f"train {self.task.name}", unit="step", dynamic_ncols=True)  # fmt: skip
        self.metrics = open(self.metrics_path, "a") if self.d.is_main else None
        self.t_wall, self.t_cpu = time.perf_counter(), time.process_time()
        self.window_t, self.window_images = time.perf_counter(), 0
        try:
            yield
        finally:
            self.stop.uninstall()
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()

    # ------------------------------------------------------------------ each step

    def step(self, step: int) -> StepResult:
        """One optimizer step (0-based `step`): accumulate, clip, skip if non-finite, EMA."""
        cfg, d, prog = self.cfg, self.d, self.prog
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch, accum, micro = cfg.batch_size, cfg.grad_accum, self.micro
        items = self.sampler.next(batch)
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            chunk = items[m * micro : (m + 1) * micro]
            last = m == accum - 1
            sync = self.net.no_sync() if d.world > 1 and not last else contextlib.nullcontext()
            with sync:
                with _autocast(self.bf16, d.device):
                    loss = self.task.loss(
                        self.net, chunk, d.part(micro), step_generator(cfg.seed, step, m)
                    )
                loss = self.hooks.loss(step, loss)
                (loss.float() / accum).backward()
            loss_sum += loss.detach().double().cpu()
        # One collective carries the loss (for logging and the finite check) and the stop flag.
        shared = torch.stack(
            [loss_sum / accum, torch.tensor(float(self.stop.set), dtype=torch.float64)]
        )
        if d.world > 1:
            dist.all_reduce(shared)
            shared[0] /= d.world
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        result = StepResult(lr, float(shared[0]), grad_norm, bool(shared[1] > 0))
        if result.finite:
            self.opt.step()
            if self.ema is not None:
                decay = ema_decay_at(step, cfg.ema_decay)
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params,
                                         [p.detach() for p in self.model.parameters()],
                                         1.0 - decay)  # fmt: skip
            prog.bad_in_row = 0
        else:
            prog.bad_in_row += 1
            prog.skipped_steps += 1
        prog.images_seen += batch
        self.window_images += batch
        return result

    def log(self, done: int, result: StepResult, *, last: bool) -> None:
        """Advance the bar; append a metrics line every `log_every` steps, at the end and at
        every non-finite loss."""
        self.bar.update(1)
        finite = result.finite
        if self.metrics is None or not (not finite or done % self.cfg.log_every == 0 or last):
            return
        now = time.perf_counter()
        record = {
            "step": done, "loss": result.loss if finite else str(result.loss), "lr": result.lr,
            "grad_norm": result.grad_norm if math.isfinite(result.grad_norm)
            else str(result.grad_norm),
            "images_per_s": self.window_images / max(now - self.window_t, 1e-9),
            "elapsed_s": self.prog.wall_s + now - self.t_wall,
            "images_seen": self.prog.images_seen,
        }  # fmt: skip
        if not finite:
            record["skipped"] = True
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.window_t, self.window_images = now, 0
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")

    def account_time(self) -> None:
        """Add the wall and CPU time since the last call to the counters a resume carries on."""
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        self.prog.wall_s += now_wall - self.t_wall
        self.prog.cpu_s += now_cpu - self.t_cpu
        self.t_wall, self.t_cpu = now_wall, now_cpu

    def save(self, step: int) -> None:
        """Checkpoint `step` on rank 0 (every rank waits for it)."""
        d = self.d
        if d.is_main:
            samp_info, samp_tensors = self.sampler.state()
            rng_tensors, rng_info = S.capture_rng()
            prog_state = {k: getattr(self.prog, k) for k in Progress.__dataclass_fields__}
            S.save_checkpoint(
                self.dir, step, self.model.state_dict(),
                self.ema.state_dict() if self.ema is not None else None,
                self.opt, {**samp_tensors, **rng_tensors},
                {"sampler": samp_info, "rng": rng_info, "progress": prog_state,
                 "train_config": json.loads(self.cfg.to_json())},
                self.meta, self.cfg.keep_checkpoints,
                before_commit=lambda: self.hooks.before_commit(step),
            )  # fmt: skip
        d.barrier()
        if d.is_main:
            self.hooks.after_save(step, lambda: self.stop.set)

    def write_samples(self, done: int) -> None:
        (self.dir / "samples").mkdir(exist_ok=True)
        self.task.write_samples(self.final_model, self.dir / "samples" / f"step_{done:07d}.png")
