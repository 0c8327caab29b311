"""VAE training task: reconstruction + a small KL, then the latent scaling factor.

Loss (per image, averaged over the batch), following ldm's `LPIPSWithDiscriminator` minus the
perceptual and adversarial terms (neither fits a frugal CPU run):

    L = rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)
        + edge_weight * rec(grad x, grad D(z))

with rec the mean L1 (or L2) error and z = mean + std * eps. The KL is divided by the pixel
count because ldm's weight (1e-6) multiplies a reconstruction error summed, not averaged,
over pixels. At the end the scaling factor 1 / std(z) over a data sample is measured and
stored in the exported config so the U-Net sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.files import write_atomic
from ember.models.vae import AutoencoderKL
from ember.train.config import TrainConfig
from ember.train.data import TrainData, to_pixels
from ember.train.samples import save_grid

VAE_FILE = "vae.safetensors"


class VAEWithLoss(nn.Module):
    """The trainable module: its forward is what DDP synchronises, so it returns everything."""

    def __init__(self, vae: AutoencoderKL, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            post = self.vae.encode(x)
        z = post.mean + post.std * eps
        return self.vae.decode(z), post.mean, post.logvar


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


class VAETask:
    name = "vae"

    def __init__(self, cfg: TrainConfig, mcfg: ModelConfig, data: TrainData, device: torch.device):
        self.cfg, self.model_config, self.data, self.device = cfg, mcfg, data, device
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            vae, start_cfg = load_vae(cfg.init_from, mcfg, flag="--init-from")
            vae.train().requires_grad_(True)  # load_vae hands out a frozen, eval-mode VAE
            self.init_scaling_factor = start_cfg.vae.scaling_factor
        else:
            vae = AutoencoderKL(mcfg.vae)
        self.model = VAEWithLoss(vae, cfg.freeze_encoder)
        self.images = data.images.to(device)  # (N, 3, S, S) uint8
        self.num_items = len(data)
        s = data.images.shape[-1] // mcfg.vae.downsample
        self.latent_shape = (mcfg.vae.embed_dim, s, s)

    def _rec(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(a, b) if self.cfg.recon_loss == "l1" else F.mse_loss(a, b)

    def loss(
        self, model: nn.Module, items: torch.Tensor, part: slice, gen: torch.Generator
    ) -> torch.Tensor:
        eps = torch.randn((len(items), *self.latent_shape), generator=gen)[part]
        x = to_pixels(self.images[items[part].to(self.device)])
        recon, mean, logvar = model(x, eps.to(self.device))
        recon = recon.float()
        loss = self._rec(recon, x)
        # With a frozen encoder the posterior, and so the KL, is a constant: left out.
        if self.cfg.kl_weight > 0 and not self.cfg.freeze_encoder:
            kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
            loss = loss + self.cfg.kl_weight * kl.sum(dim=(1, 2, 3)).mean() / x[0].numel()
        if self.cfg.edge_weight > 0:
            pairs = zip(_grad(recon), _grad(x), strict=True)
            loss = loss + self.cfg.edge_weight * sum(self._rec(a, b) for a, b in pairs)
        return loss

    @torch.no_grad()
    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Top row: data images; bottom row: their reconstructions from the posterior mean."""
        x = to_pixels(self.images[: min(8, self.num_items)])
        recon = model.vae.decode(model.vae.encode(x).mean)
        save_grid(torch.cat([x, recon.float()]), 2, path)

    @torch.no_grad()
    def measure_scaling_factor(self, vae: AutoencoderKL) -> float:
        """1 / std of sampled latents over up to `scale_images` images (fixed subset and noise)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        n = min(self.cfg.scale_images, self.num_items)
        pick = torch.randperm(self.num_items, generator=gen)[:n]
        latents = []
        for chunk in pick.split(64):
            post = vae.encode(to_pixels(self.images[chunk.to(self.device)]))
            eps = torch.randn(post.mean.shape, generator=gen).to(post.mean.device)
            latents.append(post.mean + post.std * eps)
        return float(1.0 / torch.cat(latents).float().std())

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        """Write `vae.safetensors` (ldm VAE names, scaling factor in `ember_config`).

        With a frozen encoder the latents are those of the starting VAE, so its factor is kept:
        a U-Net trained on them must see the same scale.
        """
        vae = model.vae.eval()
        if self.cfg.freeze_encoder:  # validate() guarantees --init-from
            factor = self.init_scaling_factor
        else:
            factor = self.measure_scaling_factor(vae)
        mcfg = dataclasses.replace(
            self.model_config, vae=dataclasses.replace(self.model_config.vae, scaling_factor=factor)
        )
        path = save_vae(vae, mcfg, self.cfg, Path(run_dir) / VAE_FILE)
        self.model_config = mcfg
        return {"export": str(path), "scaling_factor": factor}


def save_vae(vae: AutoencoderKL, mcfg: ModelConfig, cfg: TrainConfig, path: Path) -> Path:
    from safetensors.torch import save

    meta = {
        "ember_config": mcfg.to_json(),
        "ember_train_config": cfg.to_json(),
        "ember_part": "vae",
    }
    tensors = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    write_atomic(path, save(tensors, meta))
    return path


def load_vae(
    path: str | Path, mcfg: ModelConfig, flag: str = "--vae"
) -> tuple[AutoencoderKL, ModelConfig]:
    """A VAE written by `ember train vae` (or any file of bare ldm VAE keys + `ember_config`).

    Returns the frozen VAE and `mcfg` with the file's VAE config (and scaling factor).
    """
    from ember.config import ModelConfig as MC
    from ember.train.config import EmberError

    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{flag} {path}: file not found (train one with `ember train vae`)")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "ember_config" in meta:
        file_vae = MC.from_json(meta["ember_config"]).vae
        if dataclasses.replace(file_vae, scaling_factor=1.0) != dataclasses.replace(
            mcfg.vae, scaling_factor=1.0
        ):
            raise EmberError(
                f"{flag} {path} has VAE config {file_vae}, but preset {mcfg.name!r} needs {mcfg.vae}"
            )
        mcfg = dataclasses.replace(mcfg, vae=file_vae)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    vae = AutoencoderKL(mcfg.vae)
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise EmberError(
            f"{flag} {path} does not fit {mcfg.name!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return vae.eval().requires_grad_(False), mcfg
