"""Frozen configuration dataclasses and the named presets.

Every model ember builds is described by a `ModelConfig`; it is written (as JSON) into each
checkpoint's metadata and each run folder, so a file always says what it is.
Field names follow the CompVis ldm configs (`model_channels`, `channel_mult`, ...) because the
state-dict names we load follow ldm too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    """ldm `UNetModel` hyper-parameters (openaimodel.py)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, ...) at which SpatialTransformers are inserted.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Exactly one of num_heads / num_head_channels is used (the other is -1), as in ldm.
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: proj_in/proj_out are Linear, not 1x1 Conv
    norm_groups: int = 32
    # Transformer blocks per SpatialTransformer where they vary (SDXL: 2 and 10 per level; SSD-1B
    # and Vega drop some), as sgm's openaimodel takes them: one entry per input ResBlock, the middle
    # block, one per output ResBlock; 0 = no transformer there. Empty / None: `transformer_depth`
    # at the downsampling factors in `attention_resolutions`.
    transformer_depth_input: tuple[int, ...] = ()
    transformer_depth_middle: int | None = None
    transformer_depth_output: tuple[int, ...] = ()
    # SDXL's `label_emb` ("sequential" in sgm, diffusers' `text_time` addition embedding): the
    # width of the vector it takes (pooled text embedding + micro-conditioning), 0 = none; each
    # micro-conditioning number is an `adm_time_dim`-wide sinusoid.
    adm_in_channels: int = 0
    adm_time_dim: int = 256

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def input_depths(self) -> tuple[int, ...]:
        """Transformer depth after each input ResBlock, level by level (0: none)."""
        if self.transformer_depth_input:
            return self.transformer_depth_input
        return tuple(
            self.transformer_depth if 2**level in self.attention_resolutions else 0
            for level in range(len(self.channel_mult))
            for _ in range(self.num_res_blocks)
        )

    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        if self.transformer_depth_input:
            return self.transformer_depth_input[-1]
        return self.transformer_depth

    def canonical(self) -> UNetConfig:
        """The same network with per-block depths folded into `transformer_depth` where they are
        one depth at `attention_resolutions` (SD 1.x/2.x, the SDXL refiner), so equal networks
        have equal configs however they were read."""
        if not self.transformer_depth_input:
            return self
        used = {d for d in self.input_depths() + self.output_depths() if d}
        used.add(self.middle_depth())
        if len(used) != 1:
            return self
        levels = range(len(self.channel_mult))
        n = self.num_res_blocks
        uniform = dataclasses.replace(
            self,
            attention_resolutions=tuple(
                2**lv for lv in reversed(levels) if any(self.input_depths()[lv * n : lv * n + n])
            ),
            transformer_depth=used.pop(),
            transformer_depth_input=(),
            transformer_depth_middle=None,
            transformer_depth_output=(),
        )
        same = (uniform.input_depths(), uniform.output_depths()) == (
            self.input_depths(),
            self.output_depths(),
        )
        return uniform if same else self

    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth after each output ResBlock, deepest level first (0: none)."""
        if self.transformer_depth_output:
            return self.transformer_depth_output
        levels = len(self.channel_mult)
        inputs = self.input_depths()
        return tuple(
            inputs[level * self.num_res_blocks]  # a level's blocks share the input's depth
            for level in reversed(range(levels))
            for _ in range(self.num_res_blocks + 1)
        )


@dataclass(frozen=True)
class VAEConfig:
    """ldm `AutoencoderKL` hyper-parameters (ddconfig + embed_dim)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A frozen text encoder.

    kind="clip": the CLIP text transformer (`models/clip.py`; SD 1.x CLIP ViT-L/14, SD 2.x
    OpenCLIP ViT-H/14, SDXL's ViT-L and bigG).
    kind="minilm": the all-MiniLM-L6-v2 BERT encoder used by ember's own default model.
    `layer`: "last" takes the final hidden state; "penultimate" the one before it (SD 2.x),
    both followed by the final layer norm, as ldm's FrozenOpenCLIPEmbedder does; a number k
    (1 <= k <= num_layers) the output of layer k. `depth` is the number of layers that run.
    """

    kind: Literal["clip", "minilm"] = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    layer: Literal["last", "penultimate"] | int = "last"
    pad_token_id: int = 49407  # SD 1.x pads with <|endoftext|>; OpenCLIP pads with 0 ("!")
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # Whether a hidden layer other than the last goes through the final layer norm: SD 2.x (ldm)
    # and A1111's clip skip do that; SDXL (sgm, diffusers) takes the penultimate layer as it is.
    final_norm: bool = True
    # SDXL's pooled embedding: the final layer's end-of-text state through `text_projection`
    # (OpenCLIP), this wide; 0 = the encoder has no projection.
    projection_dim: int = 0

    def __post_init__(self) -> None:
        named = self.layer in ("last", "penultimate")
        if not named and not (isinstance(self.layer, int) and 1 <= self.layer <= self.num_layers):
            raise ValueError(
                f"text layer {self.layer!r}: expected 'last', 'penultimate' or a layer number "
                f"1-{self.num_layers}"
            )

    @property
    def depth(self) -> int:
        """How many transformer layers run: the context is the output of layer `depth`."""
        if self.layer == "last":
            return self.num_layers
        if self.layer == "penultimate":
            return self.num_layers - 1
        return int(self.layer)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training-time noise schedule (diffusers' scheduler_config.json fields)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear", "cosine"] = "scaled_linear"
    prediction: Prediction = "eps"
    steps_offset: int = 1
    set_alpha_to_one: bool = False


SD_DEFAULT_CFG = 7.0
# ember's own 64x64 models score best on the shapes eval at cfg 5 (the measurements for each bundled
# model: docs/training.md, "Guidance scale").
EMBER_SMALL_CFG = 5.0
# Layout guidance (ember.diffusion.layout) for ember's own models: without it the bundled model
# draws "A left of B" the right way round at chance (docs/training.md, "Layout guidance").
EMBER_SMALL_LAYOUT = 2.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    schedule: ScheduleConfig = ScheduleConfig()
    # SDXL base: the second text encoder (OpenCLIP ViT-bigG), whose states are concatenated to the
    # first's and whose pooled embedding conditions `label_emb`. None: one encoder.
    text_2: TextConfig | None = None
    size: int = 512  # native image size in pixels
    # The classifier-free guidance scale the model is made for: generation's default where the
    # user gives none. None: Stable Diffusion's customary 7.
    guidance: float | None = None
    # The layout guidance strength generation uses where the user gives none. None: off.
    layout_guidance: float | None = None
    # What a few-step model is made for (a sidecar .json or the file's metadata says so): the
    # sampler, steps and timestep spacing generation uses where the user gives none. None: ember's
    # defaults (DPM++ 2M, 20 steps, the sampler's customary spacing).
    sampler: str | None = None
    steps: int | None = None
    timestep_spacing: str | None = None

    @property
    def default_cfg(self) -> float:
        return SD_DEFAULT_CFG if self.guidance is None else self.guidance

    @property
    def default_layout_guidance(self) -> float:
        return 0.0 if self.layout_guidance is None else self.layout_guidance

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def sdxl(self) -> bool:
        """SDXL-style conditioning: text encoders under `conditioner.embedders`, `label_emb`."""
        return self.unet.adm_in_channels > 0

    @property
    def micro_conditions(self) -> int:
        """How many numbers the size (and aesthetic) conditioning has: 6 for SDXL base (original
        size, crop top-left, target size), 5 for the refiner (original size, crop, aesthetic
        score); 0 without `label_emb`."""
        if not self.sdxl:
            return 0
        pooled = (self.text_2 or self.text).projection_dim
        return (self.unet.adm_in_channels - pooled) // self.unet.adm_time_dim

    def text_encoders(self) -> tuple[TextConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ModelConfig:
        return model_config_from_dict(json.loads(text))


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) frozen dataclass from `asdict` output, lists back to tuples."""
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"unknown {cls.__name__} field {key!r}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        name=data["name"],
        unet=_build(UNetConfig, _without_coord_channels(data["unet"])),
        vae=_build(VAEConfig, data["vae"]),
        text=_build(TextConfig, data["text"]),
        text_2=_build(TextConfig, data["text_2"]) if data.get("text_2") else None,
        schedule=_build(ScheduleConfig, data.get("schedule", {})),
        size=data.get("size", 512),
        # files written before the field existed get their preset's
        guidance=data["guidance"]
        if "guidance" in data
        else _preset_value(data["name"], "guidance"),
        layout_guidance=data["layout_guidance"]
        if "layout_guidance" in data
        else _preset_value(data["name"], "layout_guidance"),
        sampler=data.get("sampler"),
        steps=data.get("steps"),
        timestep_spacing=data.get("timestep_spacing"),
    )


def _without_coord_channels(unet: dict[str, Any]) -> dict[str, Any]:
    """Files written while UNetConfig had `coord_channels` (a dropped experiment) record it false."""
    unet = dict(unet)
    if unet.pop("coord_channels", False):
        raise ValueError("U-Nets with coordinate input channels (coord_channels) are not supported")
    return unet


def _preset_value(name: str, field_name: str) -> float | None:
    preset = PRESETS.get(name)
    return getattr(preset, field_name) if preset is not None else None


CLIP_L = TextConfig()
OPENCLIP_H = TextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=24,
    num_heads=16,
    hidden_act="gelu",
    layer="penultimate",
    pad_token_id=0,
)
MINILM = TextConfig(
    kind="minilm",
    vocab_size=30522,
    hidden_size=384,
    intermediate_size=1536,
    num_layers=6,
    num_heads=12,
    max_length=32,
    hidden_act="gelu",
    pad_token_id=0,
    bos_token_id=101,
    eos_token_id=102,
)

# SDXL's encoders (sgm `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)` and
# `FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False)`): penultimate states, no final norm.
SDXL_CLIP_L = TextConfig(layer="penultimate", final_norm=False)
OPENCLIP_BIGG = TextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_layers=32,
    num_heads=20,
    hidden_act="gelu",
    layer="penultimate",
    pad_token_id=0,
    final_norm=False,
    projection_dim=1280,
)

SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SD15_UNET = UNetConfig()
SD21_UNET = UNetConfig(
    num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
)
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    attention_resolutions=(4, 2),
    num_heads=-1,
    num_head_channels=64,
    context_dim=2048,
    use_linear_in_transformer=True,
    transformer_depth_input=(0, 0, 2, 2, 10, 10),
    transformer_depth_middle=10,
    transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
    adm_in_channels=2816,  # pooled bigG (1280) + 6 size numbers x 256
)
# The refiner: wider (384), 4 levels, 4 transformer blocks where it has any, bigG only, and an
# aesthetic score in place of the target size.
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    attention_resolutions=(4, 2),
    num_heads=-1,
    num_head_channels=64,
    context_dim=1280,
    use_linear_in_transformer=True,
    transformer_depth=4,
    adm_in_channels=2560,  # pooled bigG (1280) + 5 numbers x 256
)

# Tiny architectures for tests: same code paths (cross-attention, down/up sampling, mid block).
TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=2,
    context_dim=32,
    norm_groups=8,
)
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
TINY_TEXT = TextConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4)
# SD 2.x-shaped tiny parts: linear transformer projections, fixed head width, OpenCLIP-style padding.
TINY_UNET_V2 = dataclasses.replace(
    TINY_UNET, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True
)
TINY_TEXT_V2 = dataclasses.replace(TINY_TEXT, hidden_act="gelu", pad_token_id=0)

# ember's own default model: 64x64 images, a 4x VAE (16x16x4 latents), MiniLM text context.
EMBER_VAE = VAEConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, scaling_factor=1.0)
EMBER_UNET = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(4, 2),
    num_heads=-1,
    num_head_channels=32,
    context_dim=384,
    use_linear_in_transformer=True,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig("sd15", SD15_UNET, SD_VAE, CLIP_L),
    "sd15-inpaint": ModelConfig(
        "sd15-inpaint", dataclasses.replace(SD15_UNET, in_channels=9), SD_VAE, CLIP_L
    ),
    "sd21": ModelConfig(
        "sd21", SD21_UNET, SD_VAE, OPENCLIP_H, ScheduleConfig(prediction="v"), size=768
    ),
    "sd21-base": ModelConfig("sd21-base", SD21_UNET, SD_VAE, OPENCLIP_H),
    "sdxl": ModelConfig("sdxl", SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, text_2=OPENCLIP_BIGG, size=1024),
    "sdxl-refiner": ModelConfig(
        "sdxl-refiner", SDXL_REFINER_UNET, SDXL_VAE, OPENCLIP_BIGG, size=1024
    ),
    "tiny": ModelConfig("tiny", TINY_UNET, TINY_VAE, TINY_TEXT, size=64),
    "tiny-v": ModelConfig(
        "tiny-v", TINY_UNET_V2, TINY_VAE, TINY_TEXT_V2, ScheduleConfig(prediction="v"), size=64
    ),
    "tiny-inpaint": ModelConfig(
        "tiny-inpaint", dataclasses.replace(TINY_UNET, in_channels=9), TINY_VAE, TINY_TEXT, size=64
    ),
    "ember-small": ModelConfig(
        "ember-small",
        EMBER_UNET,
        EMBER_VAE,
        MINILM,
        ScheduleConfig(prediction="v"),
        size=64,
        guidance=EMBER_SMALL_CFG,
        layout_guidance=EMBER_SMALL_LAYOUT,
    ),
    # ember-small with 8 latent channels (16x16x8 latents: 6x compression instead of 12x), a
    # candidate for the next default model: small stars and crosses survive the VAE round trip.
    "ember-small-z8": ModelConfig(
        "ember-small-z8",
        dataclasses.replace(EMBER_UNET, in_channels=8, out_channels=8),
        dataclasses.replace(EMBER_VAE, z_channels=8, embed_dim=8),
        MINILM,
        ScheduleConfig(prediction="v"),
        size=64,
        guidance=EMBER_SMALL_CFG,
        layout_guidance=EMBER_SMALL_LAYOUT,
    ),
    # ember-small-z8 conditioned on MiniLM's fifth (penultimate) layer: the last one is tuned for
    # pooled sentence similarity and blurs word order and which colour goes with which shape.
    "ember-small-z8p": ModelConfig(
        "ember-small-z8p",
        dataclasses.replace(EMBER_UNET, in_channels=8, out_channels=8),
        dataclasses.replace(EMBER_VAE, z_channels=8, embed_dim=8),
        dataclasses.replace(MINILM, layer="penultimate"),
        ScheduleConfig(prediction="v"),
        size=64,
        guidance=EMBER_SMALL_CFG,
        layout_guidance=EMBER_SMALL_LAYOUT,
    ),
}

# Ends every refusal of a model, so a user learns what to look for instead.
SUPPORTED = (
    "ember loads SD 1.x, SD 2.x (512 and 768-v), SD inpainting, SDXL base (and SSD-1B, Vega) "
    "and ember's own models, "
    "as one .safetensors file or a diffusers folder"
)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
