"""Training options: one frozen dataclass, and the command line generated from its fields.

Every field carries its help text (and, where it applies to one task only, the task) in its
`metadata`, so the CLI, the run folder's `train_config.json` and the checkpoint metadata all
describe the same thing and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ember.errors import EmberError

Task = Literal["vae", "unet"]


def _opt(default: Any, help: str, *, tasks: tuple[str, ...] = ("vae", "unet"), **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "tasks": tasks, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (besides the data and the code)."""

    data: str = _opt("", "dataset folder (manifest.jsonl + images)", positional=True)
    run_dir: str = _opt("", "run folder: checkpoints, metrics, samples, card", positional=True)
    preset: str = _opt("ember-small", "model preset (ember.config.PRESETS)")
    vae: str = _opt("", "trained VAE .safetensors (from `ember train vae`)", tasks=("unet",))
    init_from: str = _opt(
        "",
        "start from this model file's weights (fine-tuning): the U-Net, or the VAE for `train vae`",
    )
    image_size: int = _opt(0, "training resolution in pixels (0 = the preset's size)")
    steps: int = _opt(20000, "optimizer steps (the length of the learning-rate schedule)")
    stop_at: int = _opt(
        0,
        "end this invocation after step N and export as at the end (0 = run all --steps); "
        "the schedule still spans --steps, and --resume continues from there",
    )
    batch_size: int = _opt(64, "global batch size (all ranks, all accumulation micro-steps)")
    grad_accum: int = _opt(1, "gradient accumulation micro-steps per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = _opt(500, "linear learning-rate warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = _opt(0.999, "EMA decay of the exported weights (0 = no EMA)")
    prediction: Literal["auto", "eps", "v"] = _opt(
        "auto", "U-Net target; auto = the preset's schedule", tasks=("unet",)
    )
    text_layer: str = _opt(
        "",
        "text-encoder layer the U-Net reads: last, penultimate or a layer number (1 = first); "
        "empty = the preset's",
        tasks=("unet",),
    )
    caption_dropout: float = _opt(
        0.1, "probability of training on the empty prompt (for CFG)", tasks=("unet",)
    )
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting gamma (0 = off)", tasks=("unet",))
    min_snr_floor: float = _opt(
        0.0,
        "lowest x0-space min-SNR weight: keeps the high-noise steps, where layout is decided, "
        "in training (0 = plain min-SNR; needs --min-snr-gamma)",
        tasks=("unet",),
    )
    min_snr_floor_files: str = _opt(
        "",
        "apply --min-snr-floor only to the items whose file (its path in the dataset, e.g. "
        "'1-emoji/*' for one part of a merged set) matches this glob; empty = every item",
        tasks=("unet",),
    )
    train_only: str = _opt(
        "",
        "train only the parameters whose name matches one of these comma-separated globs (e.g. "
        "'*.attn2.*' for the U-Net's cross-attention); the rest keep their --init-from values; "
        "empty = train everything",
    )
    recon_loss: Literal["l1", "l2"] = _opt("l1", "VAE reconstruction loss", tasks=("vae",))
    kl_weight: float = _opt(1e-6, "VAE KL weight (ldm convention)", tasks=("vae",))
    edge_weight: float = _opt(0.0, "VAE image-gradient (edge) L1 loss weight", tasks=("vae",))
    freeze_encoder: bool = _opt(
        False,
        "train only the decoder of the --init-from VAE: the latent space and scaling factor stay, "
        "so a U-Net trained on that VAE still fits",
        tasks=("vae",),
    )
    scale_images: int = _opt(
        512, "images encoded to measure the latent scaling factor", tasks=("vae",)
    )
    bf16: Literal["auto", "on", "off"] = _opt(
        "auto", "bf16 autocast; auto = on where the hardware runs bf16 fast (AMX / CUDA)"
    )
    compile: bool = _opt(
        False,
        "compile the model with torch.compile (inductor; needs a C++ compiler on CPU): faster "
        "steps after a one-off compile of a few minutes at the first step",
    )
    threads: int = _opt(0, "torch CPU threads per process (0 = cores / local ranks)")
    seed: int = _opt(0, "seed of initialisation, data order and noise")
    checkpoint_every: int = _opt(500, "save a checkpoint every K steps (0 = only at the end)")
    keep_checkpoints: int = _opt(3, "keep the last K checkpoints")
    sample_every: int = _opt(1000, "write a sample-grid PNG every K steps (0 = off)")
    log_every: int = _opt(10, "append a metrics line every K steps")
    max_bad_steps: int = _opt(5, "stop after this many non-finite losses in a row")
    allow_unlicensed: bool = _opt(False, "train on images without a licence (recorded in the card)")
    resume: bool = _opt(False, "continue from the run folder's latest checkpoint")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TrainConfig:
        return TrainConfig(**json.loads(text))

    def validate(self) -> TrainConfig:
        """Raise `EmberError` naming the first bad value; return self."""
        positive = ("steps", "batch_size", "grad_accum", "log_every", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise EmberError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("caption_dropout", "ema_decay", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EmberError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise EmberError(
                f"--batch-size {self.batch_size} must be divisible by "
                f"--grad-accum {self.grad_accum}"
            )
        if not 0 <= self.stop_at <= self.steps:
            raise EmberError(
                f"--stop-at must be between 0 (off) and --steps {self.steps}, got {self.stop_at}"
            )
        if self.lr <= 0:
            raise EmberError(f"--lr must be > 0, got {self.lr}")
        if self.min_snr_floor and not 0 < self.min_snr_floor <= self.min_snr_gamma:
            raise EmberError(
                f"--min-snr-floor must be between 0 and --min-snr-gamma "
                f"({self.min_snr_gamma}), got {self.min_snr_floor}"
            )
        if self.min_snr_floor_files and not self.min_snr_floor:
            raise EmberError("--min-snr-floor-files needs --min-snr-floor")
        if self.train_only and not train_only_globs(self.train_only):
            raise EmberError(f"--train-only {self.train_only!r} names no glob")
        if self.train_only and not self.init_from:
            raise EmberError(
                "--train-only needs --init-from MODEL (the weights the frozen parameters keep)"
            )
        if self.freeze_encoder and not self.init_from:
            raise EmberError(
                "--freeze-encoder needs --init-from VAE_OR_MODEL (the encoder to keep)"
            )
        if not self.data or not self.run_dir:
            raise EmberError("DATA and RUN_DIR are required")
        return self


def train_only_globs(value: str) -> list[str]:
    """The globs of a `--train-only` value (comma-separated, blanks dropped)."""
    return [g.strip() for g in value.split(",") if g.strip()]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_train_args(parser: argparse.ArgumentParser, task: str) -> argparse.ArgumentParser:
    """Add one argument per `TrainConfig` field that applies to `task` ("vae" or "unet").

    Types, defaults, choices and help all come from the dataclass; booleans get `--x/--no-x`.
    """
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if task not in f.metadata["tasks"]:
            continue
        hint = hints[f.name]
        kw: dict[str, Any] = {"help": f.metadata["help"]}
        if typing.get_origin(hint) is Literal:
            kw["choices"] = typing.get_args(hint)
            kw["type"] = str
        elif hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = hint
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), **kw)
        else:
            kw["help"] += " (default: %(default)s)"
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, default=f.default, **kw)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a validated `TrainConfig` from parsed arguments (absent fields keep defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values).validate()


def parse_train_args(argv: list[str] | None, task: str) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog=f"ember train {task}", description=f"Train the {task.upper()} of an ember model."
    )
    return config_from_args(add_train_args(parser, task).parse_args(argv))
