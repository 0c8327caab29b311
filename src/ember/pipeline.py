"""txt2img, img2img and inpainting, composed from the model, the denoisers and the samplers.

Works on tensors only (images in [0, 1] in and out); files, PIL and records live in `images.py` and
`service.py`. A batch runs in five stages: `encode_conditioning`, `initial_latents`,
`build_guided_denoiser`, `sample`, `decode_latents`.

Randomness: image i of a batch owns a CPU `torch.Generator` seeded `seed + i`, from which (in this
order, as diffusers does with a list of generators) its init image's VAE posterior sample, its
initial noise, the masked image's posterior sample (9-channel inpainting U-Nets) and its sampler
noise are drawn. So an image does not depend on its batch-mates, and the same seed gives the same
picture as diffusers and A1111.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ember.compiled import find as find_compiled
from ember.compiled import hooked
from ember.device import available_memory, check_memory
from ember.diffusion import denoisers as D
from ember.diffusion.samplers import SAMPLERS, draw_noise
from ember.diffusion.schedules import (
    ddim_final_sigma,
    get_sigmas,
    initial_noise_scale,
    truncate_for_strength,
)
from ember.errors import EmberError
from ember.models.vae_tiling import decode_tiled, encode_tiled, peak_bytes
from ember.settings import GenerationParams, batch_key, resolve, validate

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

# Layout guidance acts on this leading fraction of the steps, where the layout is decided.
LAYOUT_STEPS = 0.2
# A VAE pass runs whole while its estimated activations (`vae_tiling.peak_bytes`) take at most this
# share of the memory free: the rest is room for the estimate's error and for other processes.
# Where the system does not say what is free (not Linux), VAE_FREE_UNKNOWN is assumed.
VAE_MEMORY_SHARE = 0.5
VAE_FREE_UNKNOWN = 8 * 2**30


@dataclass(frozen=True)
class Inputs:
    """Optional inputs: `init_image` (1, 3, H, W) in [0, 1]; `mask` (1, 1, H, W), 1 = repaint."""

    init_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"


@dataclass
class Latents:
    """The starting point of sampling: `x` at `sigmas[0]`, and what inpainting keeps."""

    x: torch.Tensor  # (B, C, h, w)
    sigmas: torch.Tensor  # the schedule actually sampled (img2img truncates it)
    init: torch.Tensor | None = None  # img2img/inpaint: the init image's latents
    keep_mask: torch.Tensor | None = None  # ordinary model inpainting: latent mask, 1 = repaint
    concat: torch.Tensor | None = None  # 9-channel inpainting U-Nets: [mask, masked latents]


def guided(cfg: float) -> bool:
    """Classifier-free guidance runs only above scale 1: at or below it the unconditional pass is
    skipped entirely (half the U-Net work), as diffusers and A1111 do."""
    return cfg > 1.0


def schedule_of(loaded, params: GenerationParams) -> torch.Tensor:
    """The full sigma schedule of a request (before img2img truncates it)."""
    try:
        return get_sigmas(
            params.schedule, params.steps, loaded.config.schedule, sampler=params.sampler,
            spacing=params.timestep_spacing,
        )  # fmt: skip
    except ValueError as exc:  # e.g. more steps than the model's training schedule has
        raise EmberError(str(exc)) from None


def eta_for(params: GenerationParams) -> float:
    """Noise scale of stochastic samplers: DDIM is deterministic unless asked, the others use 1."""
    if params.eta is not None:
        return params.eta
    return 0.0 if params.sampler == "ddim" else 1.0


def generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


class EncodedText(NamedTuple):
    """A request's text conditioning: (cond, uncond) contexts, each (1, L, D), and for SDXL the
    pooled embeddings (1, P) of each."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_text(loaded, params: GenerationParams) -> EncodedText:
    """(cond, uncond, ...) with A1111 weighting and long-prompt chunking. Without guidance
    (cfg <= 1) the negative prompt is not encoded, as diffusers does: uncond is cond."""
    from ember.prompts import encode_prompt, encode_prompts, strip_extra_networks

    unguided = params.cfg is not None and not guided(params.cfg)
    if loaded.config.sdxl:
        from ember.conditioning import encode_sdxl_prompts

        return EncodedText(*encode_sdxl_prompts(
            loaded, params.prompt, params.negative_prompt, params.clip_skip, guided=not unguided
        ))  # fmt: skip
    encoder = loaded.model.cond_stage_model
    if unguided:
        text = strip_extra_networks(params.prompt)
        cond = encode_prompt(text, loaded.tokenizer, encoder, params.clip_skip)
        return EncodedText(cond, cond)
    return EncodedText(*encode_prompts(
        params.prompt, params.negative_prompt, loaded.tokenizer, encoder, clip_skip=params.clip_skip
    ))  # fmt: skip


def generate(
    loaded,
    params: GenerationParams,
    inputs: Inputs = Inputs(),
    *,
    callback: Callback | None = None,
    refiner=None,
) -> torch.Tensor:
    """Generate `params.batch` images -> (B, 3, H, W) float32 in [0, 1]."""
    return generate_batch(loaded, [params], [inputs], callback=callback, refiner=refiner)[0]


@torch.no_grad()
def generate_batch(
    loaded,
    requests: list[GenerationParams],
    inputs: list[Inputs] | None = None,
    *,
    callback: Callback | None = None,
    refiner=None,
) -> list[torch.Tensor]:
    """Run requests that share a `batch_key` and mode as one U-Net batch per prompt length.

    `refiner` (a loaded model, for requests that name one) takes over below the noise level of
    `refiner_switch_at` and decodes the result.

    Each request keeps its own prompts, seeds and noise, so its images are those it would get alone
    (up to float summation order in batched kernels). Returns one (B_i, 3, H, W) tensor per request.
    """
    inputs = inputs or [Inputs() for _ in requests]
    requests = [resolve_vae_tiling(loaded, validate(resolve(p, loaded.config))) for p in requests]
    key, mode = batch_key(requests[0]), inputs[0].mode
    if any(batch_key(p) != key or i.mode != mode for p, i in zip(requests, inputs, strict=True)):
        raise ValueError("requests in one batch must share their batch key and mode")
    texts = [encode_text(loaded, p) for p in requests]
    # Prompts of different token lengths cannot share one cross-attention batch unchanged.
    groups: dict[tuple[int, int], list[int]] = {}
    for n, text in enumerate(texts):
        groups.setdefault((text.cond.shape[1], text.uncond.shape[1]), []).append(n)
    out: list[torch.Tensor | None] = [None] * len(requests)
    for members in groups.values():
        images = _generate_group(
            loaded, [requests[n] for n in members], [inputs[n] for n in members],
            [texts[n] for n in members], callback, refiner,
        )  # fmt: skip
        for n, image in zip(members, images, strict=True):
            out[n] = image
    return out  # type: ignore[return-value]


def _generate_group(loaded, requests, inputs, texts, callback, refiner) -> list[torch.Tensor]:
    first = requests[0]
    counts = [p.batch for p in requests]
    gens = [g for p in requests for g in generators(p.seed, p.batch)]
    tiled = vae_tiled(requests)
    cond = encode_conditioning(loaded, texts, counts, first.cfg, requests)
    latents = initial_latents(loaded, first, inputs, counts, gens, tiled)
    if latents.concat is not None:
        cond = dataclasses.replace(cond, concat=latents.concat)
    denoiser = build_guided_denoiser(loaded, requests, counts, latents)
    decoder = loaded
    if refiner is not None and first.refiner_switch_at < 1:
        denoiser = _with_refiner(loaded, refiner, denoiser, requests, counts, latents)
        decoder = refiner
    x = sample(loaded, denoiser, latents, cond, first, gens, callback)
    if not torch.isfinite(x).all():
        raise EmberError("the model produced NaN/inf values; no image was written")
    images = decode_latents(decoder, x, tiled=tiled)
    if not torch.isfinite(images).all():
        raise EmberError("the model produced NaN/inf values; no image was written")
    return list(images.split(counts))


# ---------------------------------------------------------------------------------------------
# the stages


def encode_conditioning(
    loaded,
    texts: list[EncodedText],
    counts: list[int],
    cfg: float,
    requests: list[GenerationParams] | None = None,
) -> D.Conditioning:
    """Stage 1: each request's (cond, uncond) text context repeated for its images, stacked; for
    SDXL with its vectors (pooled text and the request's micro-conditioning, `ember.conditioning`)."""
    dtype = loaded.dtype
    cond = torch.cat(
        [t.cond.to(dtype).expand(n, -1, -1) for t, n in zip(texts, counts, strict=True)]
    )
    uncond = torch.cat(
        [t.uncond.to(dtype).expand(n, -1, -1) for t, n in zip(texts, counts, strict=True)]
    )
    vector = uncond_vector = None
    if loaded.config.sdxl:
        from ember.conditioning import micro_conditions, sdxl_vector

        model_cfg = loaded.config
        assert requests is not None, "SDXL conditioning needs the requests' sizes"

        def vectors(pooled: str, negative: bool) -> torch.Tensor:
            return torch.cat([
                sdxl_vector(model_cfg, getattr(t, pooled), micro_conditions(
                    model_cfg, p, negative=negative
                )).to(dtype).expand(n, -1)
                for t, p, n in zip(texts, requests, counts, strict=True)
            ])  # fmt: skip

        vector = vectors("pooled", False)
        uncond_vector = vectors("uncond_pooled", True) if guided(cfg) else None
    return D.Conditioning(
        context=cond, uncond_context=uncond if guided(cfg) else None, vector=vector,
        uncond_vector=uncond_vector,
    )  # fmt: skip


def initial_latents(
    loaded, first: GenerationParams, inputs: list[Inputs], counts: list[int], gens, tiled=False
) -> Latents:
    """Stage 2: the sigma schedule and the starting latents (pure noise, or the init image's
    latents noised to the first sigma), with what inpainting needs; `tiled` as `encode_images`."""
    cfg = loaded.config
    ds = cfg.vae.downsample
    if first.width % ds or first.height % ds:
        raise EmberError(f"size must be a multiple of {ds} for this model")
    shape = (sum(counts), cfg.vae.embed_dim, first.height // ds, first.width // ds)
    sigmas = schedule_of(loaded, first)
    mode = inputs[0].mode
    # An inpainting U-Net at full strength starts from pure noise, as diffusers' inpainting
    # pipelines do; everything else starts from the init image's latents noised to sigmas[0].
    from_image = mode != "txt2img" and not (cfg.inpainting and first.strength >= 1.0)
    init = concat = keep_mask = masks = None
    if mode != "txt2img":
        images = torch.cat([_check_image(i.init_image, first).expand(n, -1, -1, -1)
                            for i, n in zip(inputs, counts, strict=True)])  # fmt: skip
        if from_image:
            init = encode_images(loaded, images, gens, tiled)
            sigmas = truncate_for_strength(sigmas, first.steps, first.strength)
        if mode == "inpaint":
            masks = torch.cat(
                [i.mask.expand(n, -1, -1, -1) for i, n in zip(inputs, counts, strict=True)]
            )
            if not cfg.inpainting:
                keep_mask = _latent_mask(masks, first, shape)
    if cfg.inpainting and masks is None:
        # txt2img, or img2img without a mask, on an inpainting U-Net: A1111's conditioning for
        # these modes, everything repainted (a mask of ones), so the masked image is all grey.
        masks = torch.ones(shape[0], 1, first.height, first.width)
        images = torch.full((shape[0], 3, first.height, first.width), 0.5)
    noise = draw_noise(shape, gens)
    if masks is not None and cfg.inpainting:
        # The masked image's posterior sample is drawn after the noise, as diffusers'
        # `StableDiffusion(XL)InpaintPipeline` draws it (`prepare_latents`, then
        # `prepare_mask_latents`), so the same seed gives the same image.
        concat = _inpaint_concat(loaded, images, masks, first, gens, tiled)
    if init is not None:
        x = init + noise * sigmas[0]
    else:
        x = noise * initial_noise_scale(sigmas, first.sampler, spacing=first.timestep_spacing)
    return Latents(x, sigmas, init, keep_mask, concat)


def build_guided_denoiser(
    loaded, requests: list[GenerationParams], counts: list[int], latents: Latents
) -> D.Denoiser:
    """Stage 3: the network as an x0 denoiser, with classifier-free guidance, layout guidance and
    inpainting's latent blending wrapped around it as each applies.

    The approximate speed-ups act here, on this run only: token merging (`tome`) hooks onto the
    U-Net for each of its calls and off again, and DeepCache (`deepcache`) keeps its cache in the
    sampling pass's own `DeepCacheUNet`. Layout guidance's gradient pass runs the whole network
    every call (it reads the attention of blocks DeepCache leaves out), outside DeepCache's count.
    """
    from ember.models.deepcache import DeepCacheUNet
    from ember.models.tome import token_merging

    dtype = loaded.dtype
    unet = loaded.model.model.diffusion_model
    compiled = find_compiled(loaded, latents.x.shape[-2:])  # `ember compile`'s package
    first = requests[0]

    def unet_fn_of(run) -> D.UNetFn:
        def unet_fn(
            x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
        ) -> torch.Tensor:
            with token_merging(unet, first.tome, t):
                x, t = x.to(dtype), t.to(dtype)
                if (
                    run is unet
                    and compiled is not None
                    and compiled.accepts(x, context)
                    and not hooked(unet)
                ):
                    return compiled(x, t, context, y).float()  # (hooks, e.g. ToMe's, need eager)
                return run(x, t, context, y).float()

        return unet_fn

    full = D.build_denoiser(unet_fn_of(unet), loaded.config.schedule)
    base = full
    if first.deepcache > 1:
        cached = DeepCacheUNet(unet, first.deepcache)
        base = D.build_denoiser(unet_fn_of(cached), loaded.config.schedule)
    denoiser = D.CFGDenoiser(base, first.cfg) if guided(first.cfg) else base
    if first.layout_guidance > 0:
        denoiser = _with_layout_guidance(loaded, denoiser, full, requests, counts, latents.x.shape)
    if latents.keep_mask is not None:
        denoiser = MaskBlendDenoiser(denoiser, latents.init, latents.keep_mask)
    return denoiser


def sample(
    loaded, denoiser, latents: Latents, cond: D.Conditioning, first: GenerationParams, gens,
    callback: Callback | None,
) -> torch.Tensor:  # fmt: skip
    """Stage 4: run the sampler over the schedule -> final latents."""
    x, sigmas = latents.x, latents.sigmas
    if len(sigmas) > 1:
        kwargs = {}
        if first.sampler == "ddim":
            # DDIM ends at the noise level of training step 0, not 0 (diffusers' final alpha).
            kwargs["final_sigma"] = ddim_final_sigma(loaded.config.schedule)
        if first.sampler == "lcm":
            kwargs["schedule_cfg"] = loaded.config.schedule  # LCM's boundary-condition scalings
        x = SAMPLERS[first.sampler](
            denoiser, x, sigmas, cond, generator=gens, eta=eta_for(first), callback=callback,
            **kwargs,
        )  # fmt: skip
    if latents.keep_mask is not None:
        x = latents.init * (1 - latents.keep_mask) + x * latents.keep_mask
    return x


@torch.no_grad()
def decode_latents(
    loaded, latents: torch.Tensor, vae=None, *, tiled: bool | list[bool] = False
) -> torch.Tensor:
    """Stage 5: scaled latents -> (B, 3, H, W) float32 images in [0, 1], by the model's VAE or
    `vae` (a `vae_files.LoadedVAE`: e.g. TAESD for cheap previews).

    `tiled` (for the batch, or per image): decode in overlapping tiles (`models.vae_tiling`).
    A batch decodes whole unless an image is tiled or the whole batch would not fit
    (`VAE_MEMORY_SHARE`); then image by image, which changes an untiled image only by float
    summation order, as batching the U-Net does.
    """
    if vae is None:
        module, scaling = loaded.model.first_stage_model, loaded.config.vae.scaling_factor
    else:
        module, scaling = vae.module, vae.scaling_factor
    z = (latents / scaling).to(loaded.dtype)
    flags = [tiled] * len(z) if isinstance(tiled, bool) else tiled
    f = module.cfg.downsample
    if not any(flags) and (
        len(z) == 1 or _fits(peak_bytes(module, z.shape[-2] * f, z.shape[-1] * f, z.dtype) * len(z))
    ):
        pixels = module.decode(z).float()
    else:
        pixels = torch.cat([
            decode_tiled(module, zi) if t else module.decode(zi).float()
            for zi, t in zip(z.split(1), flags, strict=True)
        ])  # fmt: skip
    return (pixels / 2 + 0.5).clamp(0, 1)


def resolve_vae_tiling(loaded, params: GenerationParams) -> GenerationParams:
    """`vae_tiling="auto"` decided for this model, size and machine now: "on" where one image's
    whole decode or encode would need more than `VAE_MEMORY_SHARE` of the free memory, else
    "off". Applied before generating, so the record says which ran and `--from` makes the same
    pixels on a machine with more or less memory. "off" where the whole decode would not fit at
    all is an EmberError, not the kernel's OOM killer after sampling."""
    if params.vae_tiling == "on":
        return params
    need = peak_bytes(loaded.model.first_stage_model, params.height, params.width, loaded.dtype)
    if params.vae_tiling == "off":
        what = f"decoding {params.width}x{params.height} whole (--vae-tiling on bounds it)"
        check_memory(need, what, loaded.dtype)
        return params
    return dataclasses.replace(params, vae_tiling="off" if _fits(need) else "on")


def vae_tiled(requests: list[GenerationParams]) -> list[bool]:
    """Per image of a batch: is it decoded (and encoded) in tiles."""
    return [p.vae_tiling == "on" for p in requests for _ in range(p.batch)]


def _fits(need: int) -> bool:
    free = available_memory()
    return need <= VAE_MEMORY_SHARE * (VAE_FREE_UNKNOWN if free is None else free)


# ---------------------------------------------------------------------------------------------
# helpers of the stages


def _with_layout_guidance(loaded, denoiser, cond_denoiser, requests, counts, shape):
    """`denoiser` wrapped in layout guidance for the images whose prompt names a relation or count.

    Guidance covers the leading `LAYOUT_STEPS` of the full schedule (before img2img truncates
    it), so img2img guides the same noise levels.
    """
    from ember.diffusion.layout import LayoutGuidedDenoiser, guided_layers
    from ember.prompts import layout_from_prompt

    regions = [layout_from_prompt(p.prompt, loaded.tokenizer) for p in requests]
    per_image = [r for r, n in zip(regions, counts, strict=True) for _ in range(n)]
    if not any(per_image):
        return denoiser
    first = requests[0]
    schedule = schedule_of(loaded, first)
    stop = float(schedule[min(round(LAYOUT_STEPS * first.steps), len(schedule) - 1)])
    unet = loaded.model.model.diffusion_model
    return LayoutGuidedDenoiser(
        denoiser, cond_denoiser, guided_layers(unet), per_image, strength=first.layout_guidance,
        sigma_stop=stop, latent_hw=(shape[2], shape[3]),
    )  # fmt: skip


def _with_refiner(loaded, refiner, denoiser, requests, counts, latents):
    """`denoiser` handing over to the refiner's below training timestep
    `round(T * (1 - refiner_switch_at))`: the rule of diffusers' `denoising_end` and of A1111
    (which switches by timestep by default), so 0.8 gives the refiner t < 200."""
    from ember.diffusion.schedules import sigma_to_t, train_sigmas

    if refiner.config.vae.embed_dim != loaded.config.vae.embed_dim:
        raise EmberError(
            f"refiner {refiner.name} works on {refiner.config.vae.embed_dim}-channel latents, "
            f"the model on {loaded.config.vae.embed_dim}"
        )
    if latents.concat is not None:
        raise EmberError("a refiner cannot follow an inpainting model (9-channel U-Net)")
    first = requests[0]
    texts = [encode_text(refiner, p) for p in requests]
    if len({(t.cond.shape, t.uncond.shape) for t in texts}) > 1:
        raise EmberError("requests sharing a batch with a refiner must encode to equal lengths")
    cond = encode_conditioning(refiner, texts, counts, first.cfg, requests)
    second = build_guided_denoiser(refiner, requests, counts, latents)
    schedule = loaded.config.schedule
    cutoff = round(schedule.num_train_timesteps * (1 - first.refiner_switch_at))
    table = train_sigmas(schedule)

    def use_refiner(sigma: torch.Tensor) -> bool:
        return bool(sigma_to_t(sigma.max().cpu(), table).round() < cutoff)

    return D.SwitchDenoiser(denoiser, second, cond, use_refiner)


class MaskBlendDenoiser:
    """Inpainting with an ordinary model: keep the known region (A1111's latent blending)."""

    def __init__(self, inner, init_latents: torch.Tensor, mask: torch.Tensor):
        self.inner, self.init_latents, self.mask = inner, init_latents, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        denoised = self.inner(x, sigma, cond)
        return self.init_latents * (1 - self.mask) + denoised * self.mask


def _check_image(image: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    if image.shape[-2:] != (params.height, params.width):
        raise EmberError(
            f"init image is {image.shape[-1]}x{image.shape[-2]} but the size is "
            f"{params.width}x{params.height}"
        )
    return image


def _check_mask(mask: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    if mask.shape[-2:] != (params.height, params.width):
        raise EmberError(
            f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {params.width}x{params.height}"
        )
    return (mask >= 0.5).float()


def _latent_mask(mask: torch.Tensor, params: GenerationParams, shape) -> torch.Tensor:
    binary = _check_mask(mask, params)
    return F.interpolate(binary, size=shape[-2:]).expand(shape[0], -1, -1, -1)


def _inpaint_concat(loaded, image, mask, params, gens, tiled) -> torch.Tensor:
    """9-channel inpainting U-Nets take [mask, masked-image latents] beside the noisy latents.

    The masked pixels are 0 in the VAE's [-1, 1] range (grey, 0.5 here), not black: the
    inpainting models were trained on `(1 - mask) * image` of [-1, 1] images (RunwayML's
    sd-v1-5-inpainting), and diffusers (`init_image * (mask < 0.5)`) and A1111
    (`inpainting_image_conditioning`) mask so."""
    binary = _check_mask(mask, params)
    masked = torch.where(binary < 0.5, image, 0.5)  # (B, 3, H, W)
    masked_latents = encode_images(loaded, masked, gens, tiled)
    ds = loaded.config.vae.downsample
    small = F.interpolate(binary, size=(params.height // ds, params.width // ds))
    return torch.cat([small.expand(image.shape[0], -1, -1, -1), masked_latents], dim=1)


@torch.no_grad()
def encode_images(
    loaded, images: torch.Tensor, gens: list[torch.Generator], tiled: bool | list[bool] = False
) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> scaled latents, each sampled with its image's generator;
    `tiled` (for the batch, or per image): encoded in overlapping tiles (`models.vae_tiling`)."""
    vae = loaded.model.first_stage_model
    dtype = loaded.dtype
    flags = [tiled] * len(gens) if isinstance(tiled, bool) else tiled
    out = []
    for i, (g, t) in enumerate(zip(gens, flags, strict=True)):
        x = (images[i : i + 1] * 2 - 1).to(dtype)
        posterior = encode_tiled(vae, x) if t else vae.encode(x)
        out.append(posterior.sample(g).float())
    return torch.cat(out) * loaded.config.vae.scaling_factor
