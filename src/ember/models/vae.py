"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1).

Module names follow CompVis ldm's `ldm/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`)
and `ldm/models/autoencoder.py` (`AutoencoderKL`), so the state dict has the keys found under
`first_stage_model.` in an original SD single-file checkpoint. Pixels are in [-1, 1]; the latent
scaling factor (`VAEConfig.scaling_factor`) is applied by the pipeline, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import VAEConfig
from ember.models.layers import GroupNorm32, sdpa
from ember.models.prepack import Conv2d


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # ldm's `Normalize`: the autoencoder uses eps 1e-6 throughout.
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """ldm's autoencoder `ResnetBlock` (no time embedding); 1x1 `nin_shortcut` if widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return self.conv2.fused(F.silu(self.norm2(h)), add=x)  # x + conv2(...), in one call


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs (ldm)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        # (B, 1, H*W, C): one head of width C
        q, k, v = (m(h_).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        out = sdpa(q, k, v)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out.fused(out, add=x)  # x + proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) pad, as ldm's autoencoder does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = cfg.downsample."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult, g))
                block_in = cfg.ch * mult
            stage.block = nn.ModuleList(blocks)
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> pixels (B, out_ch, h*f, w*f).

    `up[i]` holds resolution level i, as in ldm (built deepest first, stored shallowest first).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g)
        stages: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], g))
                block_in = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList(blocks)
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in, g)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), ldm `DiagonalGaussianDistribution`."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.moments = moments  # (B, 2*embed_dim, h, w): what tiled encoding blends
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I) drawn from `generator`.

        The noise is drawn on the generator's device and moved, so a CPU generator gives the
        same latents on every device (as diffusers' `randn_tensor`).
        """
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=device
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all but the batch dimension -> (B,)."""
        var = torch.exp(self.logvar)
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """ldm `AutoencoderKL` (inference parts): encoder, decoder and the 1x1 (post_)quant_convs."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def map_channels(self) -> float:
        """Channels per image pixel of the decoder's largest activation map, which its peak memory
        scales with (`vae_tiling.peak_bytes`): each level works at its own width and at the width
        of the level below, upsampled into it; SD's is 256, at full resolution."""
        ch, mult = self.cfg.ch, self.cfg.ch_mult
        return max(ch * max(mult[i : i + 2]) / 4**i for i in range(len(mult)))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of cfg.downsample."""
        f = self.cfg.downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"VAE input size {tuple(x.shape[-2:])} must be a multiple of {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, embed_dim, h, w) unscaled latents -> (B, 3, h*f, w*f) pixels in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
