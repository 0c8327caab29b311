"""txt2img, img2img and inpainting, composed from the model, the denoisers and the samplers.

Works on tensors only (images in [0, 1] in and out); files and PIL live in `images.py` and the CLI.
Randomness: image i of a batch owns a CPU `torch.Generator` seeded `seed + i`, from which (in this
order, as diffusers does with a list of generators) its VAE posterior sample, its initial noise and
its sampler noise are drawn. So an image does not depend on its batch-mates, and the same seed gives
the same picture as diffusers and A1111.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.settings import GenerationParams
from ember.errors import EmberError

MAX_SIDE = 2048
MAX_PIXELS = 2048 * 2048
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**32 - 1

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


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


def validate(params: GenerationParams, multiple: int = 8) -> GenerationParams:
    """Check user-facing limits; return params with sampler/schedule resolved to ember names."""
    from ember.diffusion.samplers import resolve_sampler

    for name in ("width", "height"):
        v = getattr(params, name)
        if not isinstance(v, int) or v < multiple or v > MAX_SIDE or v % multiple:
            raise EmberError(
                f"{name} {v} is not allowed: use a multiple of {multiple} from {multiple} to {MAX_SIDE}"
            )
    if params.width * params.height > MAX_PIXELS:
        raise EmberError(
            f"size {params.width}x{params.height} is over the limit of {MAX_PIXELS} pixels"
        )
    if not isinstance(params.steps, int) or not 1 <= params.steps <= MAX_STEPS:
        raise EmberError(f"steps {params.steps} is not allowed: use 1 to {MAX_STEPS}")
    if not isinstance(params.batch, int) or not 1 <= params.batch <= MAX_BATCH:
        raise EmberError(f"batch {params.batch} is not allowed: use 1 to {MAX_BATCH}")
    if not math.isfinite(params.cfg) or not 0 <= params.cfg <= 100:
        raise EmberError(f"cfg {params.cfg} is not allowed: use a number from 0 to 100")
    if not math.isfinite(params.strength) or not 0 <= params.strength <= 1:
        raise EmberError(f"strength {params.strength} is not allowed: use a number from 0 to 1")
    if params.eta is not None and (not math.isfinite(params.eta) or not 0 <= params.eta <= 10):
        raise EmberError(f"eta {params.eta} is not allowed: use a number from 0 to 10")
    if not math.isfinite(params.layout_guidance) or not 0 <= params.layout_guidance <= 10:
        raise EmberError(
            f"layout guidance {params.layout_guidance} is not allowed: use a number from 0 to 10"
        )
    if not isinstance(params.seed, int) or not 0 <= params.seed <= MAX_SEED:
        raise EmberError(f"seed {params.seed} is not allowed: use 0 to {MAX_SEED}")
    if not isinstance(params.clip_skip, int) or not 1 <= params.clip_skip <= 12:
        raise EmberError(f"clip skip {params.clip_skip} is not allowed: use 1 to 12")
    try:
        sampler, implied_schedule = resolve_sampler(str(params.sampler))
    except ValueError as exc:
        raise EmberError(str(exc)) from None
    schedule = params.schedule
    if schedule in ("default", "automatic", "Automatic", "") and implied_schedule:
        schedule = implied_schedule
    schedule = schedule.lower()
    if schedule == "automatic":
        schedule = "default"
    if schedule not in ("default", "karras", "exponential"):
        raise EmberError(
            f"unknown schedule {params.schedule!r}; choose default, karras or exponential"
        )
    return dataclasses.replace(params, sampler=sampler, schedule=schedule)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str = "cpu") -> bool:
    """True where bf16 arithmetic runs in hardware: CUDA with bf16, or a CPU with AVX512-BF16 or
    AMX tiles. Elsewhere oneDNN emulates bf16, which is slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype for `name`: "fp32", "bf16", or "auto" (bf16 only where `native_bf16`).

    bf16 weights keep GroupNorm, softmax, the sampler and the VAE output in fp32; measured on the
    decoded image it stays >= 30 dB PSNR of fp32 (bench/results.md, tests/test_bf16.py).
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise EmberError(f"dtype {name!r} is not allowed: use auto, fp32 or bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def eta_for(params: GenerationParams) -> float:
    """Noise scale of stochastic samplers: DDIM is deterministic unless asked, the others use 1."""
    if params.eta is not None:
        return params.eta
    return 0.0 if params.sampler == "ddim" else 1.0


def generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


def randn(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    """One draw of `shape[1:]` per generator, stacked: diffusers' `randn_tensor` with a generator list."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])


@torch.no_grad()
def encode_text(loaded, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond), each (1, L, D), with A1111 weighting and long-prompt chunking."""
    from ember.prompts import encode_prompts

    encoder = loaded.model.cond_stage_model
    return encode_prompts(
        params.prompt, params.negative_prompt, loaded.tokenizer, encoder, clip_skip=params.clip_skip
    )


# Settings that must agree for requests to share one U-Net batch.
SHARED = (
    "width", "height", "sampler", "schedule", "steps", "cfg", "strength", "eta", "layout_guidance",
)  # fmt: skip


def generate(
    loaded,
    params: GenerationParams,
    inputs: Inputs = Inputs(),
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Generate `params.batch` images -> (B, 3, H, W) float32 in [0, 1]."""
    return generate_batch(loaded, [params], [inputs], callback=callback)[0]


@torch.no_grad()
def generate_batch(
    loaded,
    requests: list[GenerationParams],
    inputs: list[Inputs] | None = None,
    *,
    callback: Callback | None = None,
) -> list[torch.Tensor]:
    """Run several requests that share size and sampler settings as one U-Net batch.

    Each request keeps its own prompts, seeds and noise, so its images are those it would get alone
    (up to float summation order in batched kernels). Returns one (B_i, 3, H, W) tensor per request.
    """
    from ember.diffusion import denoisers as D
    from ember.diffusion.samplers import SAMPLERS
    from ember.diffusion.schedules import (
        ddim_final_sigma,
        get_sigmas,
        initial_noise_scale,
        truncate_for_strength,
    )

    cfg = loaded.config
    inputs = inputs or [Inputs() for _ in requests]
    requests = [validate(p) for p in requests]
    first = requests[0]
    for p, inp in zip(requests[1:], inputs[1:], strict=True):
        if any(getattr(p, k) != getattr(first, k) for k in SHARED) or inp.mode != inputs[0].mode:
            raise ValueError("requests in one batch must share size, sampler and mode settings")
    texts = [encode_text(loaded, p) for p in requests]
    if len({(c.shape[1], u.shape[1]) for c, u in texts}) > 1:
        # Prompts of different lengths cannot share one cross-attention batch unchanged.
        return [
            generate_batch(loaded, [p], [i], callback=callback)[0]
            for p, i in zip(requests, inputs, strict=True)
        ]

    ds = cfg.vae.downsample
    if first.width % ds or first.height % ds:
        raise EmberError(f"size must be a multiple of {ds} for this model")
    counts = [p.batch for p in requests]
    B = sum(counts)
    shape = (B, cfg.vae.embed_dim, first.height // ds, first.width // ds)
    gens = [g for p in requests for g in generators(p.seed, p.batch)]
    dtype = loaded.dtype
    cond = torch.cat(
        [c.to(dtype).expand(n, -1, -1) for (c, _), n in zip(texts, counts, strict=True)]
    )
    uncond = torch.cat(
        [u.to(dtype).expand(n, -1, -1) for (_, u), n in zip(texts, counts, strict=True)]
    )
    unet = loaded.model.model.diffusion_model

    def unet_fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t.to(dtype), context).float()

    mode = inputs[0].mode
    sigmas = schedule = get_sigmas(first.schedule, first.steps, cfg.schedule, sampler=first.sampler)
    init_latents = concat = latent_mask = None
    if mode != "txt2img":
        images = torch.cat([_check_image(i.init_image, first).expand(n, -1, -1, -1)
                            for i, n in zip(inputs, counts, strict=True)])  # fmt: skip
        init_latents = encode_images(loaded, images, gens)
        if mode == "inpaint":
            masks = torch.cat(
                [i.mask.expand(n, -1, -1, -1) for i, n in zip(inputs, counts, strict=True)]
            )
            if cfg.inpainting:
                concat = _inpaint_concat(loaded, images, masks, first, gens)
            else:
                latent_mask = _latent_mask(masks, first, shape)
    from_image = init_latents is not None and not (cfg.inpainting and first.strength >= 1.0)
    if from_image:
        sigmas = truncate_for_strength(sigmas, first.steps, first.strength)
    noise = randn(shape, gens)
    if from_image:
        x = init_latents + noise * sigmas[0]
    else:
        x = noise * initial_noise_scale(sigmas, first.sampler)

    denoiser_cls = D.VDenoiser if cfg.schedule.prediction == "v" else D.EpsDenoiser
    base = denoiser_cls(unet_fn, cfg.schedule)
    denoiser = base if first.cfg == 1.0 else D.CFGDenoiser(base, first.cfg)
    if first.layout_guidance > 0:
        denoiser = _with_layout_guidance(loaded, denoiser, base, requests, counts, schedule, shape)
    if latent_mask is not None:
        denoiser = MaskBlendDenoiser(denoiser, init_latents, latent_mask)
    conditioning = D.Conditioning(
        context=cond, uncond_context=uncond if first.cfg != 1.0 else None, concat=concat
    )
    if len(sigmas) > 1:
        sampler = SAMPLERS[first.sampler]
        kwargs = {}
        if first.sampler == "ddim":
            # DDIM ends at the noise level of training step 0, not 0 (diffusers' final alpha).
            kwargs["final_sigma"] = ddim_final_sigma(cfg.schedule)
        eta = eta_for(first)
        x = sampler(
            denoiser, x, sigmas, conditioning, generator=gens, eta=eta, callback=callback, **kwargs
        )
    if latent_mask is not None:
        x = init_latents * (1 - latent_mask) + x * latent_mask
    if not torch.isfinite(x).all():
        raise EmberError("the model produced NaN/inf values; no image was written")
    images = decode_latents(loaded, x)
    if not torch.isfinite(images).all():
        raise EmberError("the model produced NaN/inf values; no image was written")
    return list(images.split(counts))


# Layout guidance acts on this leading fraction of the steps, where the layout is decided.
LAYOUT_STEPS = 0.2


def _with_layout_guidance(loaded, denoiser, cond_denoiser, requests, counts, schedule, shape):
    """`denoiser` wrapped in layout guidance for the images whose prompt names a relation or count.

    `schedule` is the full sigma schedule (before img2img truncates it), so img2img guides the
    same noise levels.
    """
    from ember.diffusion.layout import LayoutGuidedDenoiser, guided_layers, layout_from_prompt

    regions = [layout_from_prompt(p.prompt, loaded.tokenizer) for p in requests]
    per_image = [r for r, n in zip(regions, counts, strict=True) for _ in range(n)]
    if not any(per_image):
        return denoiser
    first = requests[0]
    stop = float(schedule[min(round(LAYOUT_STEPS * first.steps), len(schedule) - 1)])
    unet = loaded.model.model.diffusion_model
    return LayoutGuidedDenoiser(
        denoiser, cond_denoiser, guided_layers(unet), per_image, strength=first.layout_guidance,
        sigma_stop=stop, latent_hw=(shape[2], shape[3]),
    )  # fmt: skip


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


def _latent_mask(mask: torch.Tensor, params: GenerationParams, shape) -> torch.Tensor:
    if mask.shape[-2:] != (params.height, params.width):
        raise EmberError(
            f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {params.width}x{params.height}"
        )
    binary = (mask >= 0.5).float()
    return F.interpolate(binary, size=shape[-2:]).expand(shape[0], -1, -1, -1)


def _inpaint_concat(loaded, image, mask, params, gens) -> torch.Tensor:
    """9-channel inpainting U-Nets take [mask, masked-image latents] beside the noisy latents."""
    B = image.shape[0]
    binary = (mask >= 0.5).float()
    if mask.shape[-2:] != (params.height, params.width):
        raise EmberError(
            f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {params.width}x{params.height}"
        )
    masked = image * (binary < 0.5)
    masked_latents = encode_images(loaded, masked, gens)
    ds = loaded.config.vae.downsample
    small = F.interpolate(binary, size=(params.height // ds, params.width // ds)).expand(
        B, -1, -1, -1
    )
    return torch.cat([small, masked_latents], dim=1)


@torch.no_grad()
def encode_images(loaded, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> scaled latents, each sampled with its image's generator."""
    vae = loaded.model.first_stage_model
    dtype = loaded.dtype
    out = []
    for i, g in enumerate(gens):
        posterior = vae.encode((images[i : i + 1] * 2 - 1).to(dtype))
        out.append(posterior.sample(g).float())
    return torch.cat(out) * loaded.config.vae.scaling_factor


@torch.no_grad()
def decode_latents(loaded, latents: torch.Tensor) -> torch.Tensor:
    vae = loaded.model.first_stage_model
    z = (latents / loaded.config.vae.scaling_factor).to(loaded.dtype)
    pixels = vae.decode(z).float()
    return (pixels / 2 + 0.5).clamp(0, 1)
