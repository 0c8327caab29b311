"""The latent-diffusion U-Net (Rombach et al. 2022, section 3.3; ldm `openaimodel.UNetModel`).

The layout of `input_blocks` / `middle_block` / `output_blocks` and every submodule name is ldm's,
so `UNetModel(cfg).state_dict()` has the keys found under `model.diffusion_model.` in an original
SD 1.x/2.x or SDXL single-file checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.config import UNetConfig
from ember.models.layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)
from ember.models.prepack import Conv2d


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm's `UNetModel` for text-conditioned latent diffusion (no scale-shift norm).

    Each resolution level holds `num_res_blocks` ResBlocks (each followed by a SpatialTransformer of
    `cfg.input_depths()` blocks where that is not 0) and, except the last, a Downsample. The decoder
    mirrors it with one extra block per level fed by the skip connections. SDXL adds `label_emb`,
    which embeds the vector `y` into the time embedding (sgm's `num_classes="sequential"`).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_at(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, cfg.context_dim, groups, cfg.use_linear_in_transformer
            )

        if cfg.adm_in_channels:
            # sgm's num_classes="sequential": the pooled text embedding and size sinusoids (B, adm)
            # are added to the time embedding.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )
        depths_in, depths_out = list(cfg.input_depths()), list(cfg.output_depths())

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_chans = [mc]  # channels of every input block's output, consumed by the decoder
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                depth = depths_in.pop(0)
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            transformer(ch, cfg.middle_depth()),
            ResBlock(ch, emb_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                depth = depths_out.pop(0)
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        assert not skip_chans and not depths_in and not depths_out

        self.out = nn.Sequential(
            normalization(ch, groups),
            nn.SiLU(),
            zero_module(Conv2d(mc, cfg.out_channels, 3, padding=1)),
        )

    def embedding(
        self, t: torch.Tensor, y: torch.Tensor | None, batch: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The (B, 4 * model_channels) embedding every ResBlock takes: the timestep's, plus SDXL's
        `label_emb(y)`. t: (B,) or a scalar; y: (B, adm_in_channels), exactly when `label_emb` is."""
        if t.ndim == 0:
            t = t.expand(batch)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if (y is None) != (self.cfg.adm_in_channels == 0):
            raise ValueError(
                f"this U-Net takes a {self.cfg.adm_in_channels}-wide vector y"
                if y is None
                else "this U-Net has no label_emb for a vector y"
            )
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) float timesteps, context (B, L, context_dim),
        y (B, adm_in_channels): SDXL's vector conditioning, required exactly when `label_emb` is.

        H and W must be multiples of 2**(len(channel_mult) - 1) so skips line up with upsamples.
        """
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"U-Net input size {tuple(x.shape[-2:])} must be a multiple of {factor} per side"
            )
        emb = self.embedding(t, y, x.shape[0], x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
