"""SDXL's conditioning (Podell et al. 2023, sections 2.1-2.2; sgm `GeneralConditioner`).

- Cross-attention context: each text encoder's penultimate states, A1111 weighting and chunking
  applied per encoder, concatenated along the feature axis (CLIP ViT-L 768 + OpenCLIP bigG 1280).
- The vector `y` into `label_emb`: bigG's pooled, projected embedding, then each micro-condition
  number as a sinusoid (`timestep_embedding`, `adm_time_dim` wide): original size (h, w), crop
  top-left (top, left) and target size (h, w) for the base; original size, crop and an aesthetic
  score for the refiner.
- An empty negative prompt is all zeros, context and pooled alike (sgm's `force_zero_embeddings`
  as A1111 applies it to an empty negative; diffusers' `force_zeros_for_empty_prompt` to none);
  the size numbers stay.
"""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.models.layers import timestep_embedding
from ember.prompts import (
    encode_chunks,
    encode_chunks_pooled,
    strip_extra_networks,
    tokenize_weighted,
)

# diffusers' `aesthetic_score` / `negative_aesthetic_score` defaults (the refiner's).
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@torch.no_grad()
def encode_sdxl_prompt(loaded, text: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> (context (1, 77k, sum of widths), pooled (1, P)) through every text encoder."""
    text = strip_extra_networks(text)
    states, pooled = [], None
    for encoder, tokenizer in zip(loaded.model.text_encoders, loaded.tokenizers, strict=True):
        chunks = tokenize_weighted(text, tokenizer)
        if encoder.cfg.projection_dim:
            z, pooled = encode_chunks_pooled(chunks, encoder, clip_skip)
        else:
            z = encode_chunks(chunks, encoder, clip_skip)
        states.append(z)
    if len({z.shape[1] for z in states}) != 1:
        raise ValueError("the SDXL tokenizers split the prompt into different numbers of chunks")
    assert pooled is not None, "an SDXL model's last text encoder has a projection"
    return torch.cat(states, dim=-1), pooled


@torch.no_grad()
def encode_sdxl_prompts(
    loaded, prompt: str, negative_prompt: str, clip_skip: int = 1, *, guided: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cond, uncond, pooled, uncond_pooled); cond and uncond of equal length (the shorter padded
    with encodings of the empty prompt, as `ember.prompts.encode_prompts`). An empty negative is
    zeros; without guidance the negative is not encoded (uncond is cond)."""
    cond, pooled = encode_sdxl_prompt(loaded, prompt, clip_skip)
    if not guided:
        return cond, cond, pooled, pooled
    if strip_extra_networks(negative_prompt) == "":  # A1111: exactly empty, tags removed
        return cond, torch.zeros_like(cond), pooled, torch.zeros_like(pooled)
    uncond, uncond_pooled = encode_sdxl_prompt(loaded, negative_prompt, clip_skip)
    if cond.shape[1] != uncond.shape[1]:
        empty, _ = encode_sdxl_prompt(loaded, "", clip_skip)
        length = max(cond.shape[1], uncond.shape[1])

        def pad(z: torch.Tensor) -> torch.Tensor:
            return torch.cat([z, empty.repeat(1, (length - z.shape[1]) // empty.shape[1], 1)], 1)

        cond, uncond = pad(cond), pad(uncond)
    return cond, uncond, pooled, uncond_pooled


def micro_conditions(cfg: ModelConfig, params, *, negative: bool = False) -> list[float]:
    """The size (and aesthetic) numbers of a request, in sgm's order, sizes as (height, width)."""
    size = (params.original_height or params.height, params.original_width or params.width)
    crop = (params.crop_top, params.crop_left)
    if cfg.micro_conditions == 5:  # the refiner: an aesthetic score instead of the target size
        score = NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE
        return [*size, *crop, score]
    return [*size, *crop, params.height, params.width]


def sdxl_vector(cfg: ModelConfig, pooled: torch.Tensor, numbers: list[float]) -> torch.Tensor:
    """`label_emb`'s input (B, adm_in_channels): pooled (B, P), then one sinusoid per number."""
    values = torch.tensor(numbers, dtype=torch.float32)  # (n,)
    if len(numbers) != cfg.micro_conditions:
        raise ValueError(f"{len(numbers)} micro-conditions; the model takes {cfg.micro_conditions}")
    emb = timestep_embedding(values, cfg.unet.adm_time_dim).reshape(1, -1)  # (1, n * adm_time_dim)
    return torch.cat([pooled.float(), emb.expand(pooled.shape[0], -1)], dim=1)
