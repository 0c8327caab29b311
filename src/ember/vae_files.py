"""Replacement VAEs read from disk: a full SD autoencoder or TAESD, as a module the pipeline can use
in place of `loaded.model.first_stage_model` (`encode(x).sample(generator)`, `decode(z)`, pixels
in [-1, 1]) together with the latent scaling factor that goes with it.

What is read, told apart by the tensor names (never by the file name alone):
- a full VAE `.safetensors` (e.g. SD's ft-MSE VAE) in ldm names (`encoder.down.0.block.0...`,
  bare or under `first_stage_model.`, so a whole SD checkpoint lends its VAE) or in diffusers'
  `AutoencoderKL` names; its architecture is read off the tensor shapes;
- a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline folder's
  `vae/`) of an `AutoencoderKL` or an `AutoencoderTiny`;
- TAESD / TAESDXL in the original layout: `taesd_encoder.safetensors` and
  `taesd_decoder.safetensors` (`nn.Sequential` indices), the folder holding them or either file
  (the other is looked for beside it; a decoder alone decodes but cannot encode for img2img).

The scaling factor: TAESD's latents are the U-Net's latents (1.0, diffusers' `AutoencoderTiny`
default, or its config.json's); a full VAE's is its config.json's, else the model's (`base`),
else SD's 0.18215.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ember import keymaps
from ember.config import VAEConfig
from ember.errors import EmberError
from ember.files import sha256_file
from ember.models.ldm import load_state_dict_strict
from ember.models.taesd import (
    TAESDConfig,
    TinyAutoencoder,
    taesd_config_from_diffusers,
    taesd_config_from_state_dict,
    taesd_from_diffusers,
)
from ember.models.vae import AutoencoderKL
from ember.safetensors_io import read_safetensors

SUPPORTED_VAES = (
    "ember reads a full SD VAE (.safetensors in ldm or diffusers names, or a diffusers "
    "AutoencoderKL folder) or TAESD/TAESDXL (taesd_encoder/taesd_decoder.safetensors or a "
    "diffusers AutoencoderTiny folder)"
)
SD_SCALING = 0.18215
# Keys a VAE file may carry that no inference module holds: the training loss (LPIPS and the
# discriminator) and EMA bookkeeping, as in the ft-MSE release.
_SKIPPED = ("loss.", "model_ema.")
_TAESD_KEY = re.compile(r"\d+\.(weight|bias|conv\.\d\.(weight|bias)|skip\.weight)")


class LoadedVAE(NamedTuple):
    """A replacement VAE: the module (eval, no grad, in the requested dtype), the factor its
    latents are multiplied by for the U-Net, a display name and the sha256 of the files read."""

    module: nn.Module
    scaling_factor: float
    name: str
    sha256: str


def load_vae(
    path: str | Path, dtype: torch.dtype = torch.float32, *, base: VAEConfig | None = None
) -> LoadedVAE:
    """Read a replacement VAE from a file or folder (see the module docstring).

    `base` is the loaded model's `VAEConfig`: a VAE whose latent channels or downsampling differ
    from it is refused (its latents would not be the model's), its group-norm count is used (not
    recorded in a file) and its scaling factor is a full VAE file's default.
    """
    path = Path(path)
    if not path.exists():
        raise EmberError(f"VAE not found: {path}")
    if path.is_dir():
        module, scaling, files = _read_folder(path, base)
    else:
        module, scaling, files = _read_file(path, base)
    if base is not None:
        _check_fits(path, module, base)
    module = module.to(dtype).eval().requires_grad_(False)
    return LoadedVAE(module, scaling, path.name, sha256_file(*files))


def apply_vae(loaded, vae: LoadedVAE) -> Callable[[], None]:
    """Put `vae` into a `LoadedModel` in place of its own VAE: `model.first_stage_model` and
    `config.vae.scaling_factor`, the two things the pipeline reads. Returns the function that puts
    the model's own back (the replacement is never part of what `save_single_file` writes once
    removed). The caller checks the fit first by loading with `base=loaded.config.vae`."""
    model, config = loaded.model, loaded.config
    own_module, own_config = model.first_stage_model, config
    model.first_stage_model = vae.module
    loaded.config = dataclasses.replace(
        config, vae=dataclasses.replace(config.vae, scaling_factor=vae.scaling_factor)
    )

    def remove() -> None:
        model.first_stage_model = own_module
        loaded.config = own_config

    return remove


# --- files and folders ------------------------------------------------------------------------


def _read_file(path: Path, base: VAEConfig | None) -> tuple[nn.Module, float, list[Path]]:
    sd, _ = read_safetensors(path)
    if any(k.startswith(keymaps.VAE) for k in sd):
        sd = {k[len(keymaps.VAE) :]: v for k, v in sd.items() if k.startswith(keymaps.VAE)}
    sd = {k: v for k, v in sd.items() if not k.startswith(_SKIPPED)}
    if sd and all(_TAESD_KEY.fullmatch(k) for k in sd):
        return _read_taesd_pair(path, sd)
    if sd and all(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        sd = taesd_from_diffusers(sd)
        return _build_taesd(path, taesd_config_from_state_dict(sd), sd), 1.0, [path]
    if "encoder.conv_in.weight" in sd or "decoder.conv_in.weight" in sd:
        diffusers_names = any(".down_blocks." in k or ".mid_block." in k for k in sd)
        cfg = _kl_config(path, sd, diffusers_names, base)
        if diffusers_names:
            sd = keymaps.vae_diffusers_to_ldm(sd, cfg)
        module = _build_kl(path, cfg, sd)
        return module, base.scaling_factor if base is not None else SD_SCALING, [path]
    raise EmberError(f"{path.name} is not a VAE ember knows; {SUPPORTED_VAES}")


def _read_folder(folder: Path, base: VAEConfig | None) -> tuple[nn.Module, float, list[Path]]:
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"  # a diffusers pipeline folder: take its VAE
    config = folder / "config.json"
    if config.exists():
        try:
            conf = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EmberError(f"{config}: unreadable config.json ({exc})") from None
        kind = conf.get("_class_name") if isinstance(conf, dict) else None
        if kind not in ("AutoencoderTiny", "AutoencoderKL"):
            raise EmberError(f"{config} describes a {kind!r}, not a VAE; {SUPPORTED_VAES}")
        # The config is checked before the weights are read.
        tiny = kind == "AutoencoderTiny"
        cfg = taesd_config_from_diffusers(conf) if tiny else keymaps.vae_config_from_diffusers(conf)
        weights = _weights_file(folder)
        sd, _ = read_safetensors(weights)
        if tiny:
            module = _build_taesd(weights, cfg, taesd_from_diffusers(sd))
        else:
            module = _build_kl(weights, cfg, keymaps.vae_diffusers_to_ldm(sd, cfg))
        return module, cfg.scaling_factor, [weights]
    encoders = sorted(folder.glob("*encoder.safetensors"))
    decoders = sorted(folder.glob("*decoder.safetensors"))
    if len(decoders) == 1 and len(encoders) <= 1:
        sd, _ = read_safetensors(decoders[0])
        return _read_taesd_pair(decoders[0], sd)
    found = ", ".join(p.name for p in [*encoders, *decoders]) or "no VAE files"
    raise EmberError(f"{folder}: found {found}; {SUPPORTED_VAES}")


def _weights_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).exists():
            return folder / name
    raise EmberError(f"{folder}: no diffusion_pytorch_model.safetensors beside config.json")


def _read_taesd_pair(path: Path, sd: dict) -> tuple[nn.Module, float, list[Path]]:
    """One file of the original TAESD pair, and its partner beside it if there is one.

    The decoder starts with the clamp, so its first weight is `1.weight`; the encoder's `0.weight`.
    """
    part = "encoder" if "0.weight" in sd else "decoder"
    other_part = "decoder" if part == "encoder" else "encoder"
    other = path.with_name(path.name.replace(part, other_part))
    parts = {part: (path, sd)}
    if other != path and other.exists():
        parts[other_part] = (other, read_safetensors(other)[0])
    if "decoder" not in parts:
        raise EmberError(
            f"{path.name} is a TAESD encoder; its decoder ({other.name}) must lie beside it"
        )
    named = {f"{p}.{k}": v for p, (_, tensors) in parts.items() for k, v in tensors.items()}
    cfg = taesd_config_from_state_dict(named)
    files = [parts[p][0] for p in ("encoder", "decoder") if p in parts]
    return _build_taesd(path, cfg, named, encoder="encoder" in parts), cfg.scaling_factor, files


# --- building ---------------------------------------------------------------------------------


def _build_taesd(path: Path, cfg: TAESDConfig, sd: dict, *, encoder: bool = True) -> nn.Module:
    with torch.device("meta"):
        module = TinyAutoencoder(cfg, with_encoder=encoder)
    _load(path, module, sd)
    return module


def _build_kl(path: Path, cfg: VAEConfig, sd: dict) -> nn.Module:
    with torch.device("meta"):
        module = AutoencoderKL(cfg)
    _load(path, module, sd)
    return module


def _kl_config(path: Path, sd: dict, diffusers_names: bool, base: VAEConfig | None) -> VAEConfig:
    """A full VAE's `VAEConfig` read off its tensor shapes (group norms and scaling from `base`)."""
    down, block, conv1 = (
        ("down_blocks", "resnets", "conv1") if diffusers_names else ("down", "block", "conv1")
    )
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = len({k.split(".")[2] for k in sd if k.startswith(f"encoder.{down}.")})
        prefix = f"encoder.{down}.0.{block}."
        num_res = len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})
        mult = tuple(
            sd[f"encoder.{down}.{i}.{block}.0.{conv1}.weight"].shape[0] // ch for i in range(levels)
        )
        defaults = base or VAEConfig()
        if ch % defaults.norm_groups:
            raise EmberError(
                f"{path.name}: a VAE {ch} channels wide is not SD's; name the model it belongs to"
            )
        return VAEConfig(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_ch=sd["decoder.conv_out.weight"].shape[0],
            ch=ch,
            ch_mult=mult,
            num_res_blocks=num_res,
            z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["post_quant_conv.weight"].shape[1],
            norm_groups=defaults.norm_groups,
            scaling_factor=defaults.scaling_factor,
        )
    except KeyError as exc:
        raise EmberError(f"{path.name}: an incomplete VAE (no {exc.args[0]})") from None


def _load(path: Path, module: nn.Module, sd: dict) -> None:
    try:
        load_state_dict_strict(module, sd)
    except ValueError as exc:
        raise EmberError(f"{path.name}: {exc}") from None


def _check_fits(path: Path, module: nn.Module, base: VAEConfig) -> None:
    if isinstance(module, TinyAutoencoder):
        channels, downsample = module.cfg.latent_channels, module.cfg.downsample
    else:
        channels, downsample = module.cfg.embed_dim, module.cfg.downsample
    if (channels, downsample) != (base.embed_dim, base.downsample):
        raise EmberError(
            f"VAE {path.name} has {channels} latent channels at 1/{downsample} size; the model's "
            f"has {base.embed_dim} at 1/{base.downsample}"
        )
