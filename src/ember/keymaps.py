"""Name maps between CompVis ldm state dicts (ember's own names) and diffusers' layouts.

ldm numbers its U-Net blocks flat (`input_blocks.N.M`, `output_blocks.N.M`); diffusers groups them
per resolution level (`down_blocks.i.resnets.j`, `up_blocks.i.attentions.j`, ...). Both tables are
derived from the same walk over the architecture (ldm `openaimodel.UNetModel`, diffusers
`UNet2DConditionModel`; ldm `AutoencoderKL`, diffusers `AutoencoderKL`), so converting one way and
back is the identity. The maps work on state dicts without a prefix (`model.diffusion_model.` or
`first_stage_model.` stripped by the caller).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ember.config import UNetConfig, VAEConfig
from ember.errors import EmberError

# ldm's prefixes of the three parts; the maps below work on state dicts with them stripped.
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
# Keys that SD files carry but ember's modules do not hold: schedule buffers (ember computes the
# schedule from the config), EMA copies, CLIP's position-id buffer, OpenCLIP's unused heads.
IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_", "log_one_minus", "posterior_", "logvar")  # fmt: skip
IGNORED_SUFFIXES = ("position_ids",)

# Suffix maps of one module kind: ldm sub-path -> diffusers sub-path. "same" means unchanged names.
_SUFFIXES: dict[str, dict[str, str]] = {
    "same": {},
    "resnet": {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "down": {"op": "conv"},
    "vae_resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
    | {"nin_shortcut": "conv_shortcut"},
    "vae_attn": {
        "norm": "group_norm",
        "q": "to_q",
        "k": "to_k",
        "v": "to_v",
        "proj_out": "to_out.0",
    },
}
# Older diffusers VAE files name the mid attention like the deprecated `AttentionBlock`.
_LEGACY_VAE_ATTN = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}

Pairs = Iterator[tuple[str, str, str]]  # (ldm prefix, diffusers prefix, kind)


def _unet_pairs(cfg: UNetConfig) -> Pairs:
    yield "time_embed.0", "time_embedding.linear_1", "same"
    yield "time_embed.2", "time_embedding.linear_2", "same"
    if cfg.adm_in_channels:
        yield "label_emb.0.0", "add_embedding.linear_1", "same"
        yield "label_emb.0.2", "add_embedding.linear_2", "same"
    yield "input_blocks.0.0", "conv_in", "same"
    levels = len(cfg.channel_mult)
    depths_in, depths_out = list(cfg.input_depths()), list(cfg.output_depths())
    idx = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            yield f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", "resnet"
            if depths_in.pop(0):
                yield f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", "same"
            idx += 1
        if level != levels - 1:
            yield f"input_blocks.{idx}.0", f"down_blocks.{level}.downsamplers.0", "down"
            idx += 1
    yield "middle_block.0", "mid_block.resnets.0", "resnet"
    yield "middle_block.1", "mid_block.attentions.0", "same"
    yield "middle_block.2", "mid_block.resnets.1", "resnet"
    idx = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            yield f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{j}", "resnet"
            attn = bool(depths_out.pop(0))
            if attn:
                yield f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{j}", "same"
            if level and j == cfg.num_res_blocks:
                yield (
                    f"output_blocks.{idx}.{2 if attn else 1}",
                    f"up_blocks.{up}.upsamplers.0",
                    "same",
                )
            idx += 1
    yield "out.0", "conv_norm_out", "same"
    yield "out.2", "conv_out", "same"


def _vae_pairs(cfg: VAEConfig) -> Pairs:
    n = len(cfg.ch_mult)
    for part in ("encoder", "decoder"):
        yield f"{part}.conv_in", f"{part}.conv_in", "same"
        yield f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"
        yield f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attn"
        yield f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet"
        yield f"{part}.norm_out", f"{part}.conv_norm_out", "same"
        yield f"{part}.conv_out", f"{part}.conv_out", "same"
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            yield (
                f"encoder.down.{i}.block.{j}",
                f"encoder.down_blocks.{i}.resnets.{j}",
                "vae_resnet",
            )
        if i != n - 1:
            yield f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", "same"
    # ldm stores decoder levels shallowest first; diffusers runs (and numbers) them deepest first.
    for i in range(n):
        level = n - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            yield (
                f"decoder.up.{level}.block.{j}",
                f"decoder.up_blocks.{i}.resnets.{j}",
                "vae_resnet",
            )
        if level != 0:
            yield f"decoder.up.{level}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", "same"
    yield "quant_conv", "quant_conv", "same"
    yield "post_quant_conv", "post_quant_conv", "same"


def _rename(
    sd: Mapping[str, torch.Tensor], pairs: Pairs, to_diffusers: bool, what: str
) -> dict[str, torch.Tensor]:
    """Rename every key of `sd` through the longest matching module prefix; fail on strays."""
    table: dict[str, tuple[str, dict[str, str], str]] = {}
    for ldm, diff, kind in pairs:
        suffixes = _SUFFIXES[kind]
        if to_diffusers:
            table[ldm] = (diff, suffixes, kind)
        else:
            inverse = {v: k for k, v in suffixes.items()}
            if kind == "vae_attn":
                inverse |= _LEGACY_VAE_ATTN
            table[diff] = (ldm, inverse, kind)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:n]))
            if hit is not None:
                break
        else:
            unknown.append(key)
            continue
        new_prefix, suffixes, kind = hit
        module, param = ".".join(parts[n:-1]), parts[-1]
        if suffixes and kind != "same":
            if module not in suffixes:
                unknown.append(key)
                continue
            module = suffixes[module]
        new_key = ".".join(p for p in (new_prefix, module, param) if p)
        if kind == "vae_attn" and param == "weight" and module not in ("norm", "group_norm"):
            # ldm's 1x1 conv (C, C, 1, 1) <-> diffusers' Linear (C, C)
            if to_diffusers and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            elif not to_diffusers and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[new_key] = tensor
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        src = "ldm" if to_diffusers else "diffusers"
        raise EmberError(f"{len(unknown)} {what} keys are not {src} names of this config: {shown}")
    return out


def unet_ldm_to_diffusers(
    sd: Mapping[str, torch.Tensor], cfg: UNetConfig
) -> dict[str, torch.Tensor]:
    """ldm U-Net keys (`input_blocks.1.0.in_layers.0.weight`) -> diffusers keys."""
    return _rename(sd, _unet_pairs(cfg), to_diffusers=True, what="U-Net")


def unet_diffusers_to_ldm(
    sd: Mapping[str, torch.Tensor], cfg: UNetConfig
) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel` keys (`down_blocks.0.resnets.0.norm1.weight`) -> ldm."""
    return _rename(sd, _unet_pairs(cfg), to_diffusers=False, what="U-Net")


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """ldm autoencoder keys -> diffusers `AutoencoderKL` keys (mid attention 1x1 conv -> Linear)."""
    return _rename(sd, _vae_pairs(cfg), to_diffusers=True, what="VAE")


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` keys -> ldm keys (mid attention Linear -> 1x1 convs).

    Also accepts the legacy `query/key/value/proj_attn` attention names of older diffusers files.
    """
    return _rename(sd, _vae_pairs(cfg), to_diffusers=False, what="VAE")


# --- configs ---------------------------------------------------------------------------------

_UNET_DEFAULTS = {  # diffusers UNet2DConditionModel defaults for keys a config.json may omit
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
}
# Settings ember's U-Net hard-codes; a diffusers config with other values is another architecture.
_UNET_FIXED = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}


def _uniform(value: object, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise EmberError(f"diffusers {name}={value!r} varies per block; ember needs one value")
        value = value[0]
    if not isinstance(value, int):
        raise EmberError(f"diffusers {name}={value!r} is not an integer")
    return value


def unet_config_from_diffusers(d: Mapping[str, object]) -> UNetConfig:
    """UNetConfig from a diffusers `UNet2DConditionModel` config.json dict.

    diffusers' `attention_head_dim` is really the number of heads (SD 1.5: 8); a per-block list
    (SD 2.x: [5, 10, 20, 20]) is turned into ldm's fixed `num_head_channels` (64).
    """
    get = {**_UNET_DEFAULTS, **d}.get
    for key, value in _UNET_FIXED.items():
        found = get(key, value)
        if isinstance(found, list | tuple) and key == "only_cross_attention":
            found = any(found)
        if found != value:
            raise EmberError(f"diffusers U-Net {key}={found!r} is not supported (need {value!r})")
    chans = list(get("block_out_channels"))
    mc = chans[0]
    if any(c % mc for c in chans):
        raise EmberError(f"block_out_channels {chans} are not multiples of the first")
    down = list(get("down_block_types"))
    up = list(get("up_block_types") or [])
    attn_levels = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or len(down) != len(
        chans
    ):
        raise EmberError(f"unsupported down_block_types {down}")
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)]
    if up and up != mirrored:
        raise EmberError(f"up_block_types {up} do not mirror down_block_types {down}")
    adm = {}
    kind = get("addition_embed_type", None)
    if kind == "text_time":  # SDXL: pooled text embedding + size sinusoids into label_emb
        adm = {
            "adm_in_channels": int(get("projection_class_embeddings_input_dim")),
            "adm_time_dim": int(get("addition_time_embed_dim")),
        }
    elif kind is not None:
        raise EmberError(f"diffusers U-Net addition_embed_type={kind!r} is not supported")
    heads = get("num_attention_heads") or get("attention_head_dim")
    # Levels whose heads matter: those with attention, and the last (the mid block uses it).
    used = [i for i, a in enumerate(attn_levels) if a] + [len(chans) - 1]
    if isinstance(heads, list | tuple):
        per_level = [int(heads[i]) for i in used]
        dims = {chans[i] // h for i, h in zip(used, per_level, strict=True)}
        # A per-block list is what ldm's fixed head width becomes; prefer reading it back so.
        if len(dims) == 1 and all(chans[i] % h == 0 for i, h in zip(used, per_level, strict=True)):
            num_heads, head_channels = -1, dims.pop()
        elif len(set(per_level)) == 1:
            num_heads, head_channels = per_level[0], -1
        else:
            raise EmberError(f"heads per block {heads} fit neither a fixed count nor a fixed width")
    else:
        num_heads, head_channels = int(heads), -1
    return UNetConfig(
        in_channels=int(get("in_channels")),
        out_channels=int(get("out_channels")),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=_uniform(get("layers_per_block"), "layers_per_block"),
        attention_resolutions=tuple(2**i for i, a in reversed(list(enumerate(attn_levels))) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        **_depths(get, attn_levels, _uniform(get("layers_per_block"), "layers_per_block")),
        **adm,
        context_dim=_uniform(get("cross_attention_dim"), "cross_attention_dim"),
        use_linear_in_transformer=bool(get("use_linear_projection")),
        norm_groups=int(get("norm_num_groups")),
    ).canonical()


def _depths(get, attn_levels: list[bool], blocks: int) -> dict:
    """UNetConfig's transformer-depth fields from diffusers' `transformer_layers_per_block` (an int,
    one per level, or a list per block) and `reverse_transformer_layers_per_block` (per up block).
    Listed per block; `UNetConfig.canonical` folds a uniform depth (SD 1.x/2.x) back."""
    levels = len(attn_levels)
    per_level = get("transformer_layers_per_block")
    if isinstance(per_level, int):
        per_level = [per_level] * levels
    per_level = [x if isinstance(x, list | tuple) else [x] * blocks for x in per_level]
    reverse = get("reverse_transformer_layers_per_block", None)
    if reverse is None:
        if any(len(set(x)) > 1 for x in per_level):
            raise EmberError("per-block transformer_layers_per_block needs reverse_... too")
        reverse = [[x[0]] * (blocks + 1) for x in reversed(per_level)]
    if len(per_level) != levels or any(len(x) != blocks for x in per_level):
        raise EmberError(f"transformer_layers_per_block {per_level} does not fit {levels} levels")
    if len(reverse) != levels or any(len(x) != blocks + 1 for x in reverse):
        raise EmberError(f"reverse_transformer_layers_per_block {reverse} does not fit the U-Net")
    inputs = tuple(
        int(d) if a else 0 for x, a in zip(per_level, attn_levels, strict=True) for d in x
    )
    outputs = tuple(
        int(d) if a else 0 for x, a in zip(reverse, attn_levels[::-1], strict=True) for d in x
    )
    middle = int(per_level[-1][0])  # diffusers' mid block takes the last level's (first) depth
    return {  # folded into `transformer_depth` where uniform, by `UNetConfig.canonical`
        "transformer_depth_input": inputs,
        "transformer_depth_middle": middle,
        "transformer_depth_output": outputs,
    }


def unet_config_to_diffusers(cfg: UNetConfig, *, sample_size: int | None = None) -> dict:
    """A diffusers `UNet2DConditionModel` config dict describing the same network as `cfg`.

    `sample_size` (latent size) is only metadata for diffusers pipelines; left out when None.
    """
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**i in cfg.attention_resolutions for i in range(len(chans))]
    if cfg.num_head_channels > 0:
        heads: int | list[int] = [c // cfg.num_head_channels for c in chans]
    else:
        heads = cfg.num_heads
    d = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": heads,
        "transformer_layers_per_block": cfg.transformer_depth,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_groups,
    } | {k: v for k, v in _UNET_FIXED.items() if v is not None}
    if cfg.transformer_depth_input:
        n = cfg.num_res_blocks
        ins, outs = cfg.input_depths(), cfg.output_depths()
        per_level = [list(ins[i * n : (i + 1) * n]) for i in range(len(chans))]
        per_level[-1] = [cfg.middle_depth()] * n if not any(per_level[-1]) else per_level[-1]
        if per_level[-1][0] != cfg.middle_depth():
            raise EmberError(
                f"a middle block of depth {cfg.middle_depth()} beside a last level of depths "
                f"{per_level[-1]}: diffusers' config cannot describe that U-Net"
            )
        d["transformer_layers_per_block"] = [
            max(x[0], 1) if len(set(x)) == 1 else x for x in per_level
        ]
        reverse = [list(outs[i * (n + 1) : (i + 1) * (n + 1)]) for i in range(len(chans))]
        default = [[max(x[0], 1)] * (n + 1) for x in reversed(per_level)]
        if any(r != dd and any(r) for r, dd in zip(reverse, default, strict=True)):
            d["reverse_transformer_layers_per_block"] = [[max(v, 1) for v in r] for r in reverse]
    if cfg.adm_in_channels:
        d |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": cfg.adm_time_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        }
    if sample_size is not None:
        d["sample_size"] = sample_size
    return d


def vae_config_from_diffusers(d: Mapping[str, object]) -> VAEConfig:
    """VAEConfig from a diffusers `AutoencoderKL` config.json dict."""
    chans = list(d.get("block_out_channels", [64]))
    ch = chans[0]
    if any(c % ch for c in chans):
        raise EmberError(f"block_out_channels {chans} are not multiples of the first")
    for key, kind in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(d.get(key, [kind] * len(chans)))
        if types != [kind] * len(chans):
            raise EmberError(f"unsupported VAE {key} {types}")
    for key, value in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
        if d.get(key, value) != value:
            raise EmberError(
                f"diffusers VAE {key}={d.get(key)!r} is not supported (need {value!r})"
            )
    if d.get("mid_block_add_attention", True) is not True:
        raise EmberError("diffusers VAE without mid-block attention is not supported")
    latent = int(d.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_ch=int(d.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(c // ch for c in chans),
        num_res_blocks=int(d.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """A diffusers `AutoencoderKL` config dict describing the same network as `cfg`."""
    if cfg.embed_dim != cfg.z_channels:
        # diffusers uses latent_channels for both the encoder output and the quant_conv width.
        raise EmberError(
            f"diffusers needs embed_dim == z_channels, got {cfg.embed_dim} != {cfg.z_channels}"
        )
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "act_fn": "silu",
        "scaling_factor": cfg.scaling_factor,
    }
