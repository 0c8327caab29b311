"""Noise schedules: the training-time discretisation and the sigmas a sampler walks down.

Notation follows Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", EDM): a latent at noise level `sigma` is `x = x0 + sigma * n` (variance exploding form).
A DDPM-trained model with cumulative alphas `a_t` sees the same point as `sqrt(a_t) * x`, with
`sigma_t = sqrt((1 - a_t) / a_t)`; the discrete timestep `t` appears only at the network's input,
through `sigma_to_t` / `t_to_sigma`.

A schedule is a 1-D float32 tensor of `steps + 1` decreasing sigmas ending in 0.
"""

from __future__ import annotations

import math

import torch

from ember.config import ScheduleConfig

SCHEDULES = ("default", "karras", "exponential")
# diffusers' `timestep_spacing` values; A1111's "sgm_uniform" scheduler is "trailing".
SPACINGS = ("leading", "linspace", "trailing")

# Samplers whose diffusers counterpart works in the variance-preserving space (init_noise_sigma = 1)
# and picks integer timesteps; everything else follows EulerDiscreteScheduler.
_VP_SAMPLERS = frozenset({"ddim", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "unipc"})


def train_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 betas, computed exactly as diffusers' schedulers do (same dtype, same order)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17 ("squaredcos_cap_v2"), betas capped at 0.999.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"unknown beta_schedule {cfg.beta_schedule!r}; choose one of scaled_linear, linear, cosine"
    )


def train_alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 cumprod of (1 - beta), bit-identical to diffusers' alphas_cumprod."""
    return torch.cumprod(1.0 - train_betas(cfg), dim=0)


def train_sigmas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 sigma_t = sqrt((1 - a_t) / a_t), increasing with t."""
    a = train_alphas_cumprod(cfg)
    return ((1 - a) / a) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of `sigma` by linear interpolation of log-sigma in the training table.

    `sigmas` is the (T,) table from `train_sigmas`. Out-of-range sigmas clamp to [0, T-1], as in
    k-diffusion's `DiscreteSchedule.sigma_to_t` and diffusers' `_sigma_to_t`.
    """
    log_sigmas = sigmas.to(torch.float64).log()  # (T,)
    log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
    low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
    low = low.clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).to(torch.float32)


def _lerp_table(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear lookup of `table` (T,) at fractional indices `t` (np.interp)."""
    t = t.to(torch.float64).clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    table = table.to(torch.float64)
    return (1 - w) * table[low] + w * table[low + 1]


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigma_to_t`: log-sigma interpolated at fractional timesteps (k-diffusion)."""
    return _lerp_table(t, sigmas.log()).exp().to(torch.float32)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)]).to(
        torch.float32
    )


def _lcm_timesteps(steps: int, cfg: ScheduleConfig, original_steps: int) -> torch.Tensor:
    """(steps,) LCMScheduler timesteps: evenly spaced picks from the `original_steps` distillation
    timesteps `k * T // original_steps - 1`, as `np.floor(np.linspace(0, N, steps, endpoint=False))`
    picks them (numpy's `arange * step` form, which a torch.linspace differs from at 22 steps)."""
    n = cfg.num_train_timesteps
    if not 1 <= original_steps <= n:
        raise ValueError(f"LCM original_inference_steps must be in [1, {n}], got {original_steps}")
    if steps > original_steps:
        raise ValueError(
            f"the lcm sampler takes at most original_inference_steps={original_steps} steps, "
            f"got {steps}"
        )
    k = n // original_steps
    origin = (torch.arange(1, original_steps + 1, dtype=torch.float64) * k - 1).flip(0)
    idx = (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor().long()
    return origin[idx]


def _spaced_timesteps(spacing: str, steps: int, cfg: ScheduleConfig, sampler: str | None):
    """(steps,) float64 timesteps of diffusers' `timestep_spacing=spacing` in the scheduler that
    `sampler` corresponds to (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2). `trailing` is the same in every scheduler; `leading` and `linspace`
    differ between the Euler family, DDIM (and LCM) and the DPM-Solver family."""
    n = cfg.num_train_timesteps
    k = torch.arange(steps, dtype=torch.float64)
    dpm = sampler in _VP_SAMPLERS and sampler not in ("ddim", "lcm")
    if spacing == "trailing":
        # np.arange(T, 0, -T / steps).round() - 1, exactly `steps` values (numpy's arange can
        # yield one more for some step counts from float error; that extra step is not taken).
        return (n + k * (-n / steps)).round() - 1
    if spacing == "leading":
        if dpm:  # DPMSolverMultistep / UniPC: steps + 1 points at T // (steps + 1), last dropped.
            points = torch.arange(steps + 1, dtype=torch.float64) * (n // (steps + 1))
            return points.flip(0)[:-1] + cfg.steps_offset
        return (k * (n // steps)).flip(0) + cfg.steps_offset
    # linspace
    if dpm:
        return torch.linspace(0, n - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    if sampler in ("ddim", "lcm"):
        return torch.linspace(0, n - 1, steps, dtype=torch.float64).round().flip(0)
    return torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0)


def _default_timesteps(
    steps: int, cfg: ScheduleConfig, sampler: str | None, original_steps: int = 50
) -> torch.Tensor:
    """(steps,) float64 timesteps of the diffusers scheduler that `sampler` corresponds to."""
    n = cfg.num_train_timesteps
    if sampler == "ddim":
        # DDIMScheduler, timestep_spacing="leading": t = k * (T // steps) + steps_offset.
        ratio = n // steps
        return (torch.arange(steps, dtype=torch.float64) * ratio + cfg.steps_offset).flip(0)
    if sampler == "lcm":
        return _lcm_timesteps(steps, cfg, original_steps)
    if sampler in _VP_SAMPLERS:
        # DPMSolverMultistepScheduler "linspace": steps + 1 points, rounded, the last (0) dropped.
        return torch.linspace(0, n - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    # EulerDiscreteScheduler & co., "linspace": fractional timesteps.
    return torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0)


def get_sigmas(
    schedule: str,
    steps: int,
    cfg: ScheduleConfig,
    *,
    sampler: str | None = None,
    spacing: str | None = None,
    original_inference_steps: int = 50,
) -> torch.Tensor:
    """(steps + 1,) float32 decreasing sigmas ending in 0.

    - `default`: the model's own discretisation, spaced as diffusers spaces it for `sampler`:
      euler / euler_a / heun / dpm2 / dpmpp_sde (and None) follow EulerDiscreteScheduler's
      `timestep_spacing="linspace"` (fractional t, sigma interpolated *linearly in sigma* as
      `np.interp` does); dpmpp_2m / dpmpp_2m_sde / unipc follow DPMSolverMultistepScheduler's
      `linspace` (steps + 1 rounded points, last dropped); ddim follows DDIMScheduler's `leading`
      spacing with `steps_offset` (its final alpha is `ddim_final_sigma`, see `sample_ddim`);
      lcm follows LCMScheduler (`original_inference_steps` distillation steps, default 50).
      `spacing` ("leading", "linspace" or "trailing"; None keeps the per-sampler default above)
      picks diffusers' `timestep_spacing` of that same scheduler instead; few-step distilled
      models want "trailing" (A1111's `sgm_uniform`), which starts at t = T - 1.
    - `karras`: Karras et al. 2022 eq. 5 with rho = 7 between the model's sigma_min and sigma_max.
    - `exponential`: log-sigma evenly spaced between sigma_max and sigma_min.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing is not None and schedule != "default":
        raise ValueError(f"spacing {spacing!r} applies to the default schedule, not {schedule!r}")
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n - cfg.steps_offset:
        raise ValueError(f"steps must be in [1, {n - cfg.steps_offset}], got {steps}")
    table = train_sigmas(cfg)  # (T,)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if schedule == "default":
        if spacing is None:
            t = _default_timesteps(steps, cfg, sampler, original_inference_steps)
        else:
            t = _spaced_timesteps(spacing, steps, cfg, sampler)
        return _append_zero(_lerp_table(t, table))
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if schedule == "karras":
        rho = 7.0
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return _append_zero((hi + ramp * (lo - hi)) ** rho)
    return _append_zero(
        torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    )


def ddim_final_sigma(cfg: ScheduleConfig) -> float:
    """Sigma of DDIMScheduler's `final_alpha_cumprod`: 0 with set_alpha_to_one, else sigma(t=0)."""
    return 0.0 if cfg.set_alpha_to_one else float(train_sigmas(cfg)[0])


def initial_noise_scale(
    sigmas: torch.Tensor, sampler: str | None = None, *, spacing: str | None = None
) -> float:
    """Std of the pure-noise starting latent, as diffusers' `init_noise_sigma` implies.

    In the sigma (variance exploding) space the textbook start is `sigmas[0]`; that is what
    EulerDiscreteScheduler & co. use with "linspace" and "trailing" spacing. Schedulers that work
    in the variance-preserving space (DDIM, DPM-Solver multistep, LCM, UniPC), and the Euler
    family with "leading" spacing, start from unit noise, which is `sqrt(sigmas[0]**2 + 1)` here.
    Start with `x = noise * initial_noise_scale(...)`; pass the `spacing` given to `get_sigmas`.
    """
    s0 = float(sigmas[0])
    vp = sampler in _VP_SAMPLERS or spacing == "leading"
    return math.sqrt(s0 * s0 + 1) if vp else s0


def truncate_for_strength(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """Tail of `sigmas` for img2img at `strength` (diffusers' `get_timesteps`).

    `init_timestep = min(int(steps * strength), steps)`, `t_start = steps - init_timestep`;
    the result starts at `sigmas[t_start]`, and the image latent is noised to it as
    `x = x0 + noise * result[0]` (diffusers' `add_noise`, in sigma space, for every scheduler).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if len(sigmas) != steps + 1:
        raise ValueError(f"expected {steps + 1} sigmas for {steps} steps, got {len(sigmas)}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step; "
            f"use strength >= {1 / steps:.3g} or more steps"
        )
    return sigmas[max(steps - init_timestep, 0) :]
