"""The whole latent-diffusion model under CompVis ldm's top-level names (Rombach et al. 2022).

`LatentDiffusion(cfg).state_dict()` has the keys of an original SD 1.x/2.x single-file checkpoint:
`model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE) and `cond_stage_model.*` (text
encoder; SDXL's `conditioner.embedders.N.*`, with bigG in transformers' layout: `ember.sdxl_files`
converts it). Original files also carry schedule buffers (`betas`, `alphas_cumprod`, ...) and sometimes
`model_ema.*`; ember recomputes the schedule, so a loader drops those before calling
`load_state_dict_strict`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ember.config import ModelConfig, TextConfig
from ember.models.unet import UNetModel
from ember.models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """ldm's `DiffusionWrapper`: exists only so U-Net keys read `model.diffusion_model.*`."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.diffusion_model(x, t, context, y)


class Conditioner(nn.Module):
    """sgm's `GeneralConditioner` as far as SDXL's files need it: the text encoders under
    `conditioner.embedders.N` (base: CLIP ViT-L, then OpenCLIP bigG; refiner: bigG alone). The
    size and aesthetic embedders have no weights; `ember.conditioning` computes them."""

    def __init__(self, encoders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(encoders)


class LatentDiffusion(nn.Module):
    """U-Net, autoencoder and (optionally) text encoder, named as in ldm's `LatentDiffusion`.

    SDXL-style models (`cfg.sdxl`) hold their text encoders as sgm's `DiffusionEngine` does, under
    `conditioner.embedders.N`; `text_encoders` lists them either way.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.sdxl and text_encoder is not None:
            encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
            self.conditioner = Conditioner(encoders)
        elif text_encoder is not None:
            self.cond_stage_model = text_encoder

    @property
    def text_encoders(self) -> list[nn.Module]:
        if hasattr(self, "conditioner"):
            return list(self.conditioner.embedders)
        return [self.cond_stage_model] if hasattr(self, "cond_stage_model") else []

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model


def build_on_meta(
    cfg: ModelConfig, make_text_encoder: Callable[[TextConfig], nn.Module] | None = None
) -> LatentDiffusion:
    """Build the model without allocating weights; fill it with `load_state_dict_strict`.

    `make_text_encoder` (e.g. `ember.models.text.build_text_encoder`) is called inside the meta
    context too, so no part of the model touches real memory before loading.
    """
    with torch.device("meta"):
        encoders = [make_text_encoder(t) for t in cfg.text_encoders()] if make_text_encoder else []
        return LatentDiffusion(cfg, *encoders)


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {title}: {shown}"


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `state_dict` into `module` (typically built on meta) after checking it fits exactly.

    Raises ValueError naming missing and unexpected keys (first 10 of each, with counts) and any
    shape mismatches, then loads with `assign=True` so meta parameters take the given tensors.
    """
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        problems = [
            _listing(title, keys)
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise ValueError(f"state dict does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True, assign=True)
