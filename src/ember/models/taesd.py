"""TAESD, the tiny autoencoder: a distilled stand-in for latent diffusion's VAE (Ollin Boer Bohan,
"Tiny AutoEncoder for Stable Diffusion", 2023; diffusers' `AutoencoderTiny`).

Plain 3x3 convolutions and ReLU residual blocks, no normalisation or attention: decoding a 512 px
image costs a few percent of the full VAE. Its latents are the *scaled* latents the U-Net works in
(the full VAE's latents times its scaling factor), so its own scaling factor is 1.0, as diffusers'
`AutoencoderTiny` says; TAESDXL is the same network trained for SDXL's latent space.

Module names follow the original `taesd.py` (`nn.Sequential` indices, the decoder's tanh clamp at
index 0), so `TinyEncoder.state_dict()` equals the keys of `taesd_encoder.safetensors` and
`TinyDecoder.state_dict()` those of `taesd_decoder.safetensors`. diffusers' `AutoencoderTiny` holds
the same layers as `encoder.layers.N` and `decoder.layers.N - 1` (it applies the clamp in
`forward`): `taesd_from_diffusers` renames. `TinyAutoencoder` has the interface of ember's
`AutoencoderKL` (`encode(x).sample(generator)`, `decode(z)`, pixels in [-1, 1]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ember.errors import EmberError
from ember.models.prepack import Conv2d


@dataclass(frozen=True)
class TAESDConfig:
    """diffusers `AutoencoderTiny` hyper-parameters ember supports (ReLU, nearest 2x upsampling).

    Stage i of the encoder is a conv (stride 2 from the second stage on) and `encoder_blocks[i]`
    residual blocks of `encoder_channels[i]` channels; stage i of the decoder is
    `decoder_blocks[i]` blocks, then (but for the last stage) an upsampling and a conv.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


def _conv(n_in: int, n_out: int, **kwargs) -> Conv2d:
    return Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3) before decoding: 3 tanh(z / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: three 3x3 convs with ReLUs between, a 1x1 skip if widths differ, then ReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.conv and self.fuse, with each ReLU and the sum run inside the convolutions
        c0, _, c2, _, c4 = self.conv
        h = c2.fused(c0.fused(x, relu=True), relu=True)
        return c4.fused(h, add=self.skip(x), relu=True)


class TinyEncoder(nn.Sequential):
    """Pixels (B, 3, H, W) in [0, 1] -> latents (B, latent_channels, H/f, W/f)."""

    def __init__(self, cfg: TAESDConfig) -> None:
        layers: list[nn.Module] = []
        n_in = cfg.in_channels
        for i, (width, blocks) in enumerate(
            zip(cfg.encoder_channels, cfg.encoder_blocks, strict=True)
        ):
            # The first stage keeps the resolution; later ones halve it (strided, bias-free conv).
            layers.append(
                _conv(n_in, width) if i == 0 else _conv(n_in, width, stride=2, bias=False)
            )
            layers += [Block(width, width) for _ in range(blocks)]
            n_in = width
        layers.append(_conv(n_in, cfg.latent_channels))
        super().__init__(*layers)


class TinyDecoder(nn.Sequential):
    """Latents (B, latent_channels, h, w) -> pixels (B, 3, h*f, w*f) in about [0, 1]."""

    def __init__(self, cfg: TAESDConfig) -> None:
        width = cfg.decoder_channels[0]
        layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, width), nn.ReLU()]
        last = len(cfg.decoder_blocks) - 1
        for i, (width, blocks) in enumerate(
            zip(cfg.decoder_channels, cfg.decoder_blocks, strict=True)
        ):
            layers += [Block(width, width) for _ in range(blocks)]
            if i != last:
                layers += [nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
        layers.append(_conv(width, cfg.out_channels))
        super().__init__(*layers)


class LatentSample:
    """TAESD's encoding, deterministic: what `DiagonalGaussian` offers the pipeline, without noise.

    `sample(generator)` returns the latents and draws nothing from the generator, as diffusers'
    img2img reads an `AutoencoderTiny` encoding (`retrieve_latents` takes `.latents`).
    """

    def __init__(self, latents: torch.Tensor) -> None:
        self.mean = self.moments = latents  # `moments`: what tiled encoding blends

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class TinyAutoencoder(nn.Module):
    """TAESD encoder and decoder with the interface of ember's `AutoencoderKL`.

    `with_encoder=False` holds the decoder alone (A1111 ships TAESD decoders for previews);
    `encode` then raises an `EmberError`.
    """

    def __init__(self, cfg: TAESDConfig, *, with_encoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TinyEncoder(cfg) if with_encoder else None
        self.decoder = TinyDecoder(cfg)

    @property
    def map_channels(self) -> float:
        """Channels per image pixel of the decoder's largest activation map, as `AutoencoderKL`'s:
        each stage works at its own width and at the previous stage's, upsampled into it."""
        ch = self.cfg.decoder_channels
        last = len(ch) - 1
        return max(max(ch[max(i - 1, 0) : i + 1]) / 4 ** (last - i) for i in range(len(ch)))

    def encode(self, x: torch.Tensor) -> LatentSample:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of cfg.downsample -> scaled latents."""
        if self.encoder is None:
            raise EmberError("this TAESD has no encoder (only its decoder file was given)")
        f = self.cfg.downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"VAE input size {tuple(x.shape[-2:])} must be a multiple of {f}")
        return LatentSample(self.encoder(x / 2 + 0.5))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) -> (B, 3, h*f, w*f) pixels in about [-1, 1]."""
        return self.decoder(z) * 2 - 1


# --- names and configs ----------------------------------------------------------------------

# diffusers' AutoencoderTiny settings ember's network hard-codes; other values are another network.
_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
_INDEXED = re.compile(r"(encoder|decoder)\.(\d+)\.(.+)")
_DIFFUSERS = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")


def taesd_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderTiny` keys (`decoder.layers.0.weight`) -> ember's (`decoder.1.weight`).

    The encoder's indices are the same; the decoder's move up by one, past the original's clamp.
    """
    out, unknown = {}, []
    for key, tensor in sd.items():
        m = _DIFFUSERS.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        part, index, rest = m.groups()
        out[f"{part}.{int(index) + (part == 'decoder')}.{rest}"] = tensor
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise EmberError(f"{len(unknown)} keys are not diffusers AutoencoderTiny names: {shown}")
    return out


def taesd_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `taesd_from_diffusers`."""
    out = {}
    for key, tensor in sd.items():
        m = _INDEXED.fullmatch(key)
        assert m is not None, key
        part, index, rest = m.groups()
        out[f"{part}.layers.{int(index) - (part == 'decoder')}.{rest}"] = tensor
    return out


def _stages(layers: list[tuple[int, str, torch.Tensor]], part: str) -> tuple[list[int], list[int]]:
    """(channels, blocks) per stage from one part's `(index, sub-key, tensor)` entries: a stage
    starts at each plain conv (a `weight` directly under the index) but the part's last one."""
    convs = sorted({i for i, rest, _ in layers if rest == "weight"})
    blocks = sorted({i for i, rest, _ in layers if rest.startswith("conv.")})
    widths = {i: t.shape[0] for i, rest, t in layers if rest in ("weight", "conv.4.weight")}
    if len(convs) < 2 or not blocks:
        raise EmberError(f"TAESD {part} weights have no recognisable layers")
    channels, counts = [], []
    # Both parts are conv, blocks, conv, blocks, ..., blocks, conv (upsamplings and ReLUs hold no
    # weights): stage i is the blocks between the i-th and the (i+1)-th conv.
    for lo, hi in zip(convs, convs[1:], strict=False):
        inside = [b for b in blocks if lo < b < hi]
        counts.append(len(inside))
        channels.append(widths[inside[0]] if inside else widths[lo])
    return channels, counts


def taesd_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> TAESDConfig:
    """The `TAESDConfig` of ember-named TAESD weights (`encoder.N.*` and/or `decoder.N.*`), read
    off the layer indices and shapes; a part that is absent keeps the TAESD default."""
    parts: dict[str, list[tuple[int, str, torch.Tensor]]] = {"encoder": [], "decoder": []}
    for key, tensor in sd.items():
        m = _INDEXED.fullmatch(key)
        if m is None:
            raise EmberError(f"{key!r} is not a TAESD weight name")
        parts[m.group(1)].append((int(m.group(2)), m.group(3), tensor))
    kwargs: dict[str, object] = {}
    if parts["encoder"]:
        channels, blocks = _stages(parts["encoder"], "encoder")
        first = min(i for i, rest, _ in parts["encoder"] if rest == "weight")
        last = max(i for i, rest, _ in parts["encoder"] if rest == "weight")
        weights = {(i, rest): t for i, rest, t in parts["encoder"]}
        kwargs |= {
            "encoder_channels": tuple(channels),
            "encoder_blocks": tuple(blocks),
            "in_channels": weights[first, "weight"].shape[1],
            "latent_channels": weights[last, "weight"].shape[0],
        }
    if parts["decoder"]:
        channels, blocks = _stages(parts["decoder"], "decoder")
        weights = {(i, rest): t for i, rest, t in parts["decoder"]}
        last = max(i for i, rest, _ in parts["decoder"] if rest == "weight")
        first = min(i for i, rest, _ in parts["decoder"] if rest == "weight")
        latent = weights[first, "weight"].shape[1]
        if "latent_channels" in kwargs and kwargs["latent_channels"] != latent:
            raise EmberError(
                f"TAESD encoder makes {kwargs['latent_channels']} latent channels but the decoder "
                f"takes {latent}"
            )
        kwargs |= {
            "decoder_channels": tuple(channels),
            "decoder_blocks": tuple(blocks),
            "latent_channels": latent,
            "out_channels": weights[last, "weight"].shape[0],
        }
    return TAESDConfig(**kwargs)


def taesd_config_from_diffusers(d: Mapping[str, object]) -> TAESDConfig:
    """`TAESDConfig` from a diffusers `AutoencoderTiny` config.json dict."""
    for key, value in _FIXED.items():
        if d.get(key, value) != value:
            raise EmberError(f"diffusers AutoencoderTiny {key}={d.get(key)!r} is not supported")
    if float(d.get("shift_factor", 0.0) or 0.0) != 0.0:
        raise EmberError(
            f"diffusers AutoencoderTiny shift_factor={d.get('shift_factor')} (an SD3/FLUX latent "
            "space) is not supported"
        )
    default = TAESDConfig()
    return TAESDConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        latent_channels=int(d.get("latent_channels", 4)),
        encoder_channels=tuple(d.get("encoder_block_out_channels", default.encoder_channels)),
        encoder_blocks=tuple(d.get("num_encoder_blocks", default.encoder_blocks)),
        decoder_channels=tuple(d.get("decoder_block_out_channels", default.decoder_channels)),
        decoder_blocks=tuple(d.get("num_decoder_blocks", default.decoder_blocks)),
        scaling_factor=float(d.get("scaling_factor", 1.0)),
    )
