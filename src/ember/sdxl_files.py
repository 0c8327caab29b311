"""SDXL single files: what one holds, told from its tensors, and its text encoders' names.

SDXL files use Stability's generative-models ("sgm") layout: the U-Net and VAE under ldm's names
(`model.diffusion_model.*` with `label_emb`, `first_stage_model.*`) and the text encoders under
`conditioner.embedders.N`: for the base, 0 is CLIP ViT-L in the transformers layout
(`conditioner.embedders.0.transformer.text_model.*`) and 1 OpenCLIP ViT-bigG in the OpenCLIP layout
(`conditioner.embedders.1.model.*`); the refiner has bigG alone, as embedder 0. In memory every
encoder is a `ClipTextEncoder`, so OpenCLIP names are converted at the edge (`sgm_to_internal`,
`internal_to_sgm`), as SD 2.x's are in `ember.checkpoints`.
"""

from __future__ import annotations

import dataclasses

import torch

from ember import config as C
from ember.errors import EmberError
from ember.keymaps import UNET, VAE

EMBEDDERS = "conditioner.embedders."
# sgm's SDXL attention: 64 channels per head everywhere (base, refiner, SSD-1B, Vega). The tensors
# cannot tell heads from head width, so files without ember's metadata are read with it.
SDXL_HEAD_CHANNELS = 64
TEXT_HEAD_CHANNELS = 64  # CLIP ViT-L: 12 x 64, OpenCLIP bigG: 20 x 64
# sgm's `DiffusionEngine` may save its denoiser's sigma table; ember computes the schedule.
SGM_IGNORED_PREFIXES = ("denoiser.",)


def is_sgm(keys) -> bool:
    return any(k.startswith(EMBEDDERS) for k in keys)


def _openclip(i: int) -> str:
    return f"{EMBEDDERS}{i}.model."


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix` has (`prefix0.`, `prefix1.`, ...)."""
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _depth(sd: dict, block: str) -> int:
    """Transformer blocks of the SpatialTransformer at `block` (e.g. `input_blocks.4.1`), 0 if none."""
    return _count(sd, f"{UNET}{block}.transformer_blocks.")


def unet_config_from_tensors(sd: dict[str, torch.Tensor]) -> C.UNetConfig:
    """An SDXL-family U-Net's config read from its ldm-named tensors: levels, widths, ResBlocks per
    level and the transformer depth of every block (SSD-1B and Vega have fewer than SDXL)."""
    first = sd[UNET + "input_blocks.0.0.weight"]
    mc, in_channels = first.shape[0], first.shape[1]
    n_in = _count(sd, UNET + "input_blocks.")
    downs = [i for i in range(n_in) if UNET + f"input_blocks.{i}.0.op.weight" in sd]
    levels = len(downs) + 1
    blocks = (n_in - 1 - len(downs)) // levels
    if blocks < 1 or (n_in - 1 - len(downs)) % levels:
        raise EmberError(f"an ldm U-Net whose {n_in} input blocks do not form levels")
    mult, depths_in, idx = [], [], 1
    for _level in range(levels):
        for _ in range(blocks):
            out = sd[UNET + f"input_blocks.{idx}.0.out_layers.3.weight"].shape[0]
            depths_in.append(_depth(sd, f"input_blocks.{idx}.1"))
            idx += 1
        mult.append(out // mc)
        idx += 1  # the level's Downsample
    depths_out = [_depth(sd, f"output_blocks.{i}.1") for i in range(levels * (blocks + 1))]
    attn = [k for k in sd if k.startswith(UNET) and k.endswith("attn2.to_k.weight")]
    proj = [k for k in sd if k.startswith(UNET) and k.endswith(".proj_in.weight")]
    if not attn or not proj:
        raise EmberError("an SDXL-style U-Net without cross-attention")
    return C.UNetConfig(
        in_channels=in_channels,
        out_channels=sd[UNET + "out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=blocks,
        attention_resolutions=tuple(
            2**lv
            for lv in reversed(range(levels))
            if any(depths_in[lv * blocks : (lv + 1) * blocks])
        ),
        num_heads=-1,
        num_head_channels=SDXL_HEAD_CHANNELS,
        context_dim=sd[attn[0]].shape[1],
        use_linear_in_transformer=sd[proj[0]].ndim == 2,
        transformer_depth_input=tuple(depths_in),
        transformer_depth_middle=_depth(sd, "middle_block.1"),
        transformer_depth_output=tuple(depths_out),
        adm_in_channels=sd[UNET + "label_emb.0.0.weight"].shape[1],
    ).canonical()


def vae_config_from_tensors(sd: dict[str, torch.Tensor]) -> C.VAEConfig:
    """An ldm VAE's config read from its tensors (`first_stage_model.*`), SDXL's scaling factor.
    Norm groups cannot be read; every SD VAE has 32."""
    v = VAE
    ch = sd[v + "encoder.conv_in.weight"].shape[0]
    levels = _count(sd, v + "encoder.down.")
    mult = [sd[v + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    z = sd[v + "decoder.conv_in.weight"].shape[1]
    return dataclasses.replace(
        C.SDXL_VAE,
        in_channels=sd[v + "encoder.conv_in.weight"].shape[1],
        out_ch=sd[v + "decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=_count(sd, v + "encoder.down.0.block."),
        z_channels=z,
        embed_dim=sd[v + "quant_conv.weight"].shape[0] // 2,
    )


def _encoder_config(sd: dict, i: int) -> C.TextConfig:
    """Embedder i, read from its tensors: OpenAI CLIP (ViT-L) in the transformers layout, or
    OpenCLIP (bigG) with its projection. Heads are 64 channels wide, as in both."""
    hf, oc = f"{EMBEDDERS}{i}.transformer.text_model.", _openclip(i)
    if any(k.startswith(hf) for k in sd):
        width = sd[hf + "final_layer_norm.weight"].shape[0]
        return dataclasses.replace(
            C.SDXL_CLIP_L,
            vocab_size=sd[hf + "embeddings.token_embedding.weight"].shape[0],
            hidden_size=width,
            intermediate_size=sd[hf + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_layers=_count(sd, hf + "encoder.layers."),
            num_heads=max(width // TEXT_HEAD_CHANNELS, 1),
            max_length=sd[hf + "embeddings.position_embedding.weight"].shape[0],
        )
    if any(k.startswith(oc) for k in sd):
        width = sd[oc + "ln_final.weight"].shape[0]
        if oc + "text_projection" not in sd:
            raise EmberError(f"SDXL text encoder {i} (OpenCLIP) has no text_projection")
        return dataclasses.replace(
            C.OPENCLIP_BIGG,
            vocab_size=sd[oc + "token_embedding.weight"].shape[0],
            hidden_size=width,
            intermediate_size=sd[oc + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_layers=_count(sd, oc + "transformer.resblocks."),
            num_heads=max(width // TEXT_HEAD_CHANNELS, 1),
            max_length=sd[oc + "positional_embedding"].shape[0],
            projection_dim=sd[oc + "text_projection"].shape[1],
        )
    raise EmberError(f"an SDXL file without text encoder {i} ({EMBEDDERS}{i}.*)")


def detect_sdxl_config(sd: dict[str, torch.Tensor]) -> C.ModelConfig:
    """The ModelConfig of an SDXL-family single file (base, refiner, SSD-1B, Vega, fine-tunes)."""
    if UNET + "label_emb.0.0.weight" not in sd or UNET + "input_blocks.0.0.weight" not in sd:
        raise EmberError("an SDXL-layout file without an SDXL U-Net (label_emb)")
    unet = unet_config_from_tensors(sd)
    n = _count(sd, EMBEDDERS)
    encoders = [_encoder_config(sd, i) for i in range(n)]
    if n not in (1, 2) or encoders[-1].projection_dim == 0:
        raise EmberError(f"an SDXL file with {n} text encoders; SDXL has CLIP-L + bigG or bigG")
    width = sum(e.hidden_size for e in encoders)
    if width != unet.context_dim:
        raise EmberError(
            f"SDXL text encoders {width} wide for a U-Net attending to {unet.context_dim}"
        )
    # Base: original size, crop, target size (6 numbers); refiner: aesthetic score for target (5).
    numbers, rest = 6 if n == 2 else 5, unet.adm_in_channels - encoders[-1].projection_dim
    if rest <= 0 or rest % numbers:
        raise EmberError(
            f"an SDXL label_emb of {unet.adm_in_channels} inputs for a {encoders[-1].projection_dim}"
            f"-wide pooled embedding and {numbers} size numbers"
        )
    unet = dataclasses.replace(unet, adm_time_dim=rest // numbers)
    if unet.in_channels != 4:
        raise EmberError(
            f"an SDXL U-Net with {unet.in_channels} input channels (SDXL inpainting U-Nets with 9 "
            "are not supported yet)"
        )
    if unet == C.SDXL_UNET and n == 2:
        name = "sdxl"
    elif n == 1:
        name = "sdxl-refiner"
    else:
        name = "sdxl-small"  # SSD-1B, Vega: fewer transformer blocks
    text_2 = encoders[1] if n == 2 else None
    vae = vae_config_from_tensors(sd)
    return C.ModelConfig(name, unet, vae, encoders[0], text_2=text_2, size=1024)


def sgm_to_internal(
    raw: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Convert the OpenCLIP embedders of an sgm state dict (already without ignored keys) to
    `ClipTextEncoder` names in place of theirs; `logit_scale` goes to `extra` for saving."""
    from ember.models.text import openclip_to_encoder

    out = {}
    openclip: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if key.startswith(SGM_IGNORED_PREFIXES):
            continue
        if key.startswith(EMBEDDERS) and ".model." in key:
            i = int(key[len(EMBEDDERS) :].split(".")[0])
            rel = key[len(_openclip(i)) :]
            if rel == "logit_scale":
                extra[key] = value
            else:
                openclip.setdefault(i, {})[rel] = value
        else:
            out[key] = value
    for i, tensors in openclip.items():
        out.update({f"{EMBEDDERS}{i}.{k}": v for k, v in openclip_to_encoder(tensors).items()})
    return out


def internal_to_sgm(
    sd: dict[str, torch.Tensor], cfg: C.ModelConfig, extra: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of `sgm_to_internal`: bigG back to OpenCLIP names, with its `logit_scale`."""
    from ember.models.text import encoder_to_openclip

    out = {}
    encoders: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(EMBEDDERS):
            i = int(key[len(EMBEDDERS) :].split(".")[0])
            if cfg.text_encoders()[i].projection_dim:  # OpenCLIP-trained: the OpenCLIP layout
                encoders.setdefault(i, {})[key[len(f"{EMBEDDERS}{i}.") :]] = value
                continue
        out[key] = value
    for i, tensors in encoders.items():
        out.update({_openclip(i) + k: v for k, v in encoder_to_openclip(tensors).items()})
        if _openclip(i) + "logit_scale" in extra:
            out[_openclip(i) + "logit_scale"] = extra[_openclip(i) + "logit_scale"]
    return out
