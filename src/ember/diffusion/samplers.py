"""Samplers: pure functions that walk a latent down a tensor of sigmas (k-diffusion style).

Every sampler has the signature
`sample_x(denoiser, x, sigmas, cond, *, generator=None, eta=..., callback=None) -> x`
where `denoiser(x, sigma, cond) -> x0`, `x` starts at noise level `sigmas[0]` (see
`schedules.initial_noise_scale`) and the result is at `sigmas[-1]` (normally 0).
`callback(step_index, total_steps, x, denoised)` is called once per step.

All randomness comes from `generator`: one `torch.Generator`, or a list with one per batch item
(each item's noise from its own generator, as diffusers' `randn_tensor` does), so an image is
reproducible from its seed alone. Noise is drawn on the generator's device in float32 with the
sample's shape at the same points in the loop as the matching diffusers scheduler draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ember.config import ScheduleConfig
from ember.diffusion.brownian import BrownianNoise
from ember.diffusion.denoisers import Conditioning, Denoiser
from ember.diffusion.schedules import sigma_to_t, train_sigmas

Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None] | None


def draw_noise(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn exactly as diffusers' `randn_tensor` draws it."""
    shape = tuple(shape)
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [
            torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
            for g in generator
        ]
        noise = torch.cat(parts)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return draw_noise(x.shape, generator, device=x.device, dtype=x.dtype)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down then fresh noise of std sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_to^2. With eta = 1 this is the DDPM posterior's variance
    (Ho et al. 2020); with eta = 0 it is deterministic. Song et al. 2021 (DDIM), eq. 16.
    """
    if eta == 0 or float(sigma_to) == 0:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    return sigmas.to(device=x.device, dtype=torch.float32), x.new_ones(
        x.shape[0], dtype=torch.float32
    )


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then noise of std sigma_up (k-diffusion).

    Noise is drawn at every step (also the last, where it is scaled by 0), like diffusers.
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if eta > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the step to 0."""
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next * s_in, cond))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver-2 in sigma form: the derivative at the log-midpoint sigma (Lu et al. 2022a,
    as in k-diffusion's `sample_dpm_2` and diffusers' KDPM2DiscreteScheduler)."""
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, cond))
        x = x + d_2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep, midpoint form (Lu et al. 2022b, Algorithm 2).

    In sigma space with lambda = -log(sigma): x' = (sigma'/sigma) x - expm1(-h) D, where D
    extrapolates the last two x0 predictions. First step and the step to sigma = 0 are
    first order, as in diffusers (`lower_order_final`, `final_sigmas_type="zero"`).
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


def _unipc_coefficients(h: torch.Tensor, rks: list[torch.Tensor], order: int) -> torch.Tensor:
    """UniPC-bh2 weights: solve R rho = b, R[i][k] = rks[k]^i, b[i] = i! phi_{i+2}(-h) h / B(h).

    `phi` are the exponential-integrator functions in the data-prediction form; B(h) = expm1(-h)
    is the "bh2" choice (Zhao et al. 2023, section 3.3).
    """
    hh = -h
    b_h = torch.expm1(hh)
    h_phi_k = b_h / hh - 1
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.stack([torch.stack([rk**i for rk in rks]) for i in range(order)])
    return torch.linalg.solve(r, torch.stack(b))


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): a second-order multistep predictor (UniP) plus a corrector (UniC)
    that reuses each step's model evaluation to refine the sample it was made at, so it costs no
    extra evaluations. Data prediction, B(h) = expm1(-h) ("bh2"), order 2, first and last steps
    first order: the defaults of diffusers' UniPCMultistepScheduler.

    In sigma space (lambda = -log sigma) a step from s to t with x0 predictions D is
    x_t = (sigma_t / sigma_s) x_s - expm1(-h) (D_s + sum_k rho_k (D_k - D_s) / r_k).
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    lambdas = -sigmas.double().log()  # +inf at sigma = 0
    outputs: list[torch.Tensor] = []  # x0 predictions, newest last (at most 2 kept)
    last_x, last_order = None, 0
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        if last_x is not None:  # UniC: correct x (made at step i - 1) with the new evaluation
            m0 = outputs[-1]
            h = lambdas[i] - lambdas[i - 1]
            if last_order == 1:
                res = 0.5 * (denoised - m0)
            else:
                r1 = (lambdas[i - 2] - lambdas[i - 1]) / h
                rhos = _unipc_coefficients(h, [r1, torch.ones_like(r1)], 2).float()
                res = rhos[1] * (denoised - m0) + rhos[0] * (outputs[-2] - m0) / r1.float()
            b_h = torch.expm1(-h).float()
            ratio = (sigmas[i] / sigmas[i - 1]).float()
            x = ratio * last_x - b_h * m0 - b_h * res
        outputs = [*outputs[-1:], denoised]
        order = min(2, n - i, len(outputs))  # lower order at the start and at the end
        last_x, last_order = x, order
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = lambdas[i + 1] - lambdas[i]
        b_h = torch.expm1(-h).float()
        x_next = (sigmas[i + 1] / sigmas[i]) * x - b_h * denoised
        if order == 2:  # UniP-2: rho = 1/2 on the divided difference to the previous output
            r1 = ((lambdas[i - 1] - lambdas[i]) / h).float()
            x_next = x_next - b_h * 0.5 * (outputs[-2] - denoised) / r1
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint form (Lu et al. 2022b; diffusers' "sde-dpmsolver++").

    eta = 1 is the reverse SDE; eta = 0 reduces to `sample_dpmpp_2m`. Noise is drawn once per
    step before the update, like diffusers.
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        noise = _noise_like(x, generator) if eta > 0 else None
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        coef = -torch.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = (sigma_next / sigma) * torch.exp(-eta_h) * x + coef * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x + 0.5 * coef * (1 / r) * (denoised - old_denoised)
        if noise is not None:
            x = x + noise * sigma_next * (-torch.expm1(-2 * eta_h)) ** 0.5
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, 2S with r = 1/2), as k-diffusion's `sample_dpmpp_sde`.

    As there, the noise is increments of one Brownian path per image (`brownian.BrownianNoise`,
    seeded from `generator`), so the two noises of a step are correlated as the SDE requires and
    the image converges as the step count grows instead of changing with it.
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    r = 0.5
    noise = BrownianNoise(x, float(sigmas.max()), generator) if eta > 0 else None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = -sigma.log(), -sigma_next.log()
        sigma_mid = (-(lam + r * (lam_next - lam))).exp()
        # Substep to the midpoint (ancestral), then the full step with the blended x0.
        down, up = get_ancestral_step(sigma, sigma_mid, eta)
        x_2 = (down / sigma) * x - torch.expm1(lam + down.log()) * denoised
        if noise is not None:
            x_2 = x_2 + noise(sigma, sigma_mid) * up
        denoised_2 = denoiser(x_2, sigma_mid * s_in, cond)
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        fac = 1 / (2 * r)
        d = (1 - fac) * denoised + fac * denoised_2
        x = (down / sigma) * x - torch.expm1(lam + down.log()) * d
        if noise is not None:
            x = x + noise(sigma, sigma_next) * up
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 0.0,
    callback: Callback = None,
    final_sigma: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma form: x' = x0 + sigma_down * eps + sigma_up * z.

    Dividing DDIM's update by sqrt(alpha') turns it into exactly this; its eta-variance (eq. 16)
    is `get_ancestral_step`. Default eta is 0 (deterministic DDIM).

    DDIMScheduler's last step does not reach sigma = 0: it ends at `final_alpha_cumprod`
    (alphas_cumprod[0] when set_alpha_to_one is False). Pass `final_sigma=ddim_final_sigma(cfg)`
    to reproduce that: the last step then targets `final_sigma` instead of 0 and the result is
    returned in the network's variance-preserving scale, `x / sqrt(final_sigma^2 + 1)`, which is
    the latent diffusers hands to the VAE.
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    end_early = final_sigma > 0 and sigmas[-1] == 0
    for i in range(n):
        sigma = sigmas[i]
        sigma_next = sigmas[i + 1]
        if i == n - 1 and end_early:
            sigma_next = sigma_next.new_tensor(final_sigma)
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        eps = to_d(x, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + eps * sigma_down
        if eta > 0:
            x = x + _noise_like(x, generator) * sigma_up
    if end_early:
        x = x / math.sqrt(final_sigma**2 + 1)
    return x


def lcm_boundary_scalings(
    t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of a consistency model's boundary condition at discrete timestep `t`
    (Song et al. 2023, "Consistency Models", eq. 7 with LCM's `timestep_scaling`, as in
    LCMScheduler): f(x, t) = c_skip x + c_out x0, c_skip -> 1 and c_out -> 0 as t -> 0."""
    scaled = t.float() * timestep_scaling  # float32, as LCMScheduler computes it
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    callback: Callback = None,
    schedule_cfg: ScheduleConfig | None = None,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1), step for step
    LCMScheduler's.

    Each step forms the consistency function's output f = c_out x0 + c_skip x_vp (x_vp = x /
    sqrt(sigma^2 + 1), the network's variance-preserving input), then re-noises it to the next
    sigma with fresh noise; the last step returns f itself and draws nothing. The boundary
    scalings need each sigma's discrete timestep: pass the model's `schedule_cfg` to apply them
    exactly as LCMScheduler does (t from `sigma_to_t`, rounded). Without it they are skipped,
    i.e. their t -> infinity limit (c_skip = 0, c_out = 1), which differs by ~1e-5 at t = 19.
    """
    sigmas, s_in = _prepare(x, sigmas)
    n = len(sigmas) - 1
    scalings = None
    if schedule_cfg is not None:
        t = sigma_to_t(sigmas[:-1].cpu(), train_sigmas(schedule_cfg)).round()  # (n,)
        scalings = [c.to(x.device) for c in lcm_boundary_scalings(t, timestep_scaling)]
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback(i, n, x, denoised)
        if scalings is not None:
            c_skip, c_out = scalings[0][i], scalings[1][i]
            denoised = c_out * denoised + c_skip * x / (sigmas[i] ** 2 + 1) ** 0.5
        x = denoised
        if i < n - 1 and sigmas[i + 1] > 0:
            x = x + _noise_like(x, generator) * sigmas[i + 1]
    return x


Sampler = Callable[..., torch.Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
    "unipc": sample_unipc,
}

# A1111 display names (lower-cased) and aliases -> ember sampler names.
_ALIASES = {
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "euler ancestral": "euler_a",
    "dpm2": "dpm2",
    "dpm_2": "dpm2",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ sde": "dpmpp_sde",
}
_SCHEDULE_SUFFIXES = {" karras": "karras", " exponential": "exponential"}


def resolve_sampler(name: str) -> tuple[str, str]:
    """(sampler_name, schedule_name) for an ember name ("dpmpp_2m") or an A1111 one
    ("DPM++ 2M Karras", "Euler a", "DDIM"), case-insensitive."""
    key = " ".join(name.strip().lower().split())
    schedule = "default"
    for suffix, sched in _SCHEDULE_SUFFIXES.items():
        if key.endswith(suffix):
            key, schedule = key[: -len(suffix)], sched
            break
    sampler = _ALIASES.get(key, key)
    if sampler not in SAMPLERS:
        a1111 = [
            "Euler a", "Euler", "Heun", "DPM2", "DPM2 Karras", "DPM++ 2M", "DPM++ 2M Karras",
            "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DDIM", "LCM", "UniPC",
        ]  # fmt: skip
        raise ValueError(
            f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
            f"or {', '.join(a1111)} (any with ' Karras' or ' Exponential')"
        )
    return sampler, schedule
