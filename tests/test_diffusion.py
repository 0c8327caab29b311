"""Diffusion maths: parity with diffusers' schedulers, analytic convergence, schedule invariants.

Parity runs use SD 1.5's scheduler config and a fixed analytic "network" eps(x_in, t), so no U-Net
is needed. Spacing per comparison (diffusers defaults, as our `get_sigmas("default", ...)` mirrors):
Euler / Euler a / Heun / KDPM2: timestep_spacing="linspace" (fractional t); DPMSolverMultistep
(2M and 2M SDE) and UniPCMultistep: "linspace" with steps + 1 rounded points; DDIM: "leading" with steps_offset=1.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)

from ember.config import ScheduleConfig
from ember.diffusion.brownian import BrownianNoise, BrownianTree
from ember.diffusion.denoisers import CFGDenoiser, Conditioning, EpsDenoiser, VDenoiser
from ember.diffusion.losses import DiffusionLoss, add_noise, min_snr_weights
from ember.diffusion.samplers import SAMPLERS, draw_noise, resolve_sampler
from ember.diffusion.schedules import (
    ddim_final_sigma,
    get_sigmas,
    initial_noise_scale,
    sigma_to_t,
    t_to_sigma,
    train_alphas_cumprod,
    train_sigmas,
    truncate_for_strength,
)

SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
SHAPE = (2, 4, 8, 8)
STEPS = 10


def fake_unet(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A smooth deterministic stand-in for a network (eps or v), sensitive to t and context."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x_in.shape[0], 1, 1, 1)
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.6 * x_in * torch.cos(t / 700) + 0.2 * torch.sin(2 * x_in + t / 150 + c)


def run_diffusers(scheduler, steps: int, seed: int, ctx: torch.Tensor, **step_kwargs):
    """The StableDiffusionPipeline denoising loop with `fake_unet`."""
    scheduler.set_timesteps(steps)
    latents = draw_noise(SHAPE, torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed + 1)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        out = fake_unet(model_in, t.float(), ctx)
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = gen
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents


def run_ember(sampler: str, schedule: str, steps: int, seed: int, ctx, cfg, **kwargs):
    sigmas = get_sigmas(schedule, steps, cfg, sampler=sampler)
    den_cls = EpsDenoiser if cfg.prediction == "eps" else VDenoiser
    denoiser = den_cls(fake_unet, cfg, quantize=kwargs.pop("quantize", False))
    x = draw_noise(SHAPE, torch.Generator().manual_seed(seed)) * initial_noise_scale(
        sigmas, sampler
    )
    gen = torch.Generator().manual_seed(seed + 1)
    return SAMPLERS[sampler](denoiser, x, sigmas, Conditioning(ctx), generator=gen, **kwargs)


PARITY = [
    # (ember sampler, ember schedule, diffusers class, extra config, step kwargs, ember kwargs)
    ("euler", "default", EulerDiscreteScheduler, {}, {}, {}),
    ("euler", "karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, {}, {}),
    ("euler_a", "default", EulerAncestralDiscreteScheduler, {}, {}, {}),
    ("heun", "default", HeunDiscreteScheduler, {}, {}, {}),
    ("dpm2", "default", KDPM2DiscreteScheduler, {}, {}, {}),
    ("dpmpp_2m", "default", DPMSolverMultistepScheduler, {}, {}, {}),
    # diffusers rounds Karras timesteps for DPM-Solver: quantize=True reproduces that.
    (
        "dpmpp_2m",
        "karras",
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True},
        {},
        {"quantize": True},
    ),
    (
        "dpmpp_2m_sde",
        "default",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++"},
        {},
        {},
    ),
    ("unipc", "default", UniPCMultistepScheduler, {}, {}, {}),
    (
        "unipc",
        "karras",
        UniPCMultistepScheduler,
        {"use_karras_sigmas": True},
        {},
        {"quantize": True},
    ),
    (
        "ddim",
        "default",
        DDIMScheduler,
        {"clip_sample": False, "set_alpha_to_one": False},
        {"eta": 0.0},
        {"final_sigma": "ddim"},
    ),
    (
        "ddim",
        "default",
        DDIMScheduler,
        {"clip_sample": False, "set_alpha_to_one": False},
        {"eta": 1.0},
        {"final_sigma": "ddim", "eta": 1.0},
    ),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(
    "sampler,schedule,cls,extra,step_kwargs,ember_kwargs",
    PARITY,
    ids=[f"{p[0]}-{p[1]}-{p[2].__name__}-{i}" for i, p in enumerate(PARITY)],
)
def test_parity_with_diffusers(
    prediction, sampler, schedule, cls, extra, step_kwargs, ember_kwargs
):
    cfg = ScheduleConfig(prediction=prediction, set_alpha_to_one=False)
    pred = "epsilon" if prediction == "eps" else "v_prediction"
    scheduler = cls(**SD15, prediction_type=pred, **extra)
    ctx = torch.linspace(-1, 1, 2 * 3 * 5).view(2, 3, 5)
    ember_kwargs = dict(ember_kwargs)
    if ember_kwargs.get("final_sigma") == "ddim":
        ember_kwargs["final_sigma"] = ddim_final_sigma(cfg)
    ref = run_diffusers(scheduler, STEPS, 7, ctx, **step_kwargs)
    ours = run_ember(sampler, schedule, STEPS, 7, ctx, cfg, **ember_kwargs)
    assert ref.abs().max() > 0.1  # a non-trivial result
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_sigmas_match_diffusers_tables():
    cfg = ScheduleConfig()
    euler = EulerDiscreteScheduler(**SD15)
    euler.set_timesteps(STEPS)
    torch.testing.assert_close(get_sigmas("default", STEPS, cfg, sampler="euler"), euler.sigmas)
    dpm = DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True)
    dpm.set_timesteps(STEPS)
    torch.testing.assert_close(get_sigmas("karras", STEPS, cfg, sampler="dpmpp_2m"), dpm.sigmas)
    assert torch.equal(train_alphas_cumprod(cfg), euler.alphas_cumprod)
    for schedule, kind in (("cosine", "squaredcos_cap_v2"), ("linear", "linear")):
        ours = train_alphas_cumprod(
            ScheduleConfig(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
        )
        ref = DDIMScheduler(beta_schedule=kind, beta_start=1e-4, beta_end=0.02).alphas_cumprod
        torch.testing.assert_close(ours, ref)


def test_cfg_one_batched_call_matches_diffusers_formula():
    cfg = ScheduleConfig()
    calls = []

    def unet(x_in, t, context):
        calls.append(x_in.shape[0])
        return fake_unet(x_in, t, context)

    ctx, unctx = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    x, sigma = torch.randn(SHAPE), torch.tensor(3.0)
    den = CFGDenoiser(EpsDenoiser(unet, cfg), 7.5)
    got = den(x, sigma, Conditioning(ctx, unctx))
    assert calls == [4]
    c_in = 1 / math.sqrt(10.0)
    t = sigma_to_t(sigma.view(1), train_sigmas(cfg)).expand(2)
    e_u, e_c = fake_unet(x * c_in, t, unctx), fake_unet(x * c_in, t, ctx)
    torch.testing.assert_close(got, x - 3.0 * (e_u + 7.5 * (e_c - e_u)), atol=1e-5, rtol=1e-5)
    calls.clear()
    CFGDenoiser(EpsDenoiser(unet, cfg), 1.0)(x, sigma, Conditioning(ctx, unctx))
    assert calls == [2]


def test_inpainting_concat_goes_after_c_in():
    seen = {}

    def unet(x_in, t, context):
        seen["x_in"] = x_in
        return x_in[:, :4]

    x, extra = torch.randn(SHAPE), torch.randn(2, 5, 8, 8)
    EpsDenoiser(unet, ScheduleConfig())(
        x, torch.tensor(2.0), Conditioning(torch.zeros(2, 1, 1), None, extra)
    )
    torch.testing.assert_close(seen["x_in"], torch.cat([x / math.sqrt(5.0), extra], dim=1))


def test_per_image_generators_reproduce_single_image():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = draw_noise(SHAPE, gens)
    alone = draw_noise((1, *SHAPE[1:]), torch.Generator().manual_seed(4))
    torch.testing.assert_close(both[1:], alone)


# --- analytic: Gaussian data has a closed-form denoiser and probability-flow ODE -------------

MU, S = 0.3, 0.5


def gaussian_denoiser(x, sigma, cond):
    sigma = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def ode_error(sampler: str, steps: int) -> float:
    """Max error of one ODE solve from sigma_max to sigma_min against the exact flow map."""
    sigmas = get_sigmas("karras", steps, ScheduleConfig())[:-1].double()  # stop at sigma_min
    x_start = torch.linspace(-3, 3, 64, dtype=torch.float64).view(64, 1) * sigmas[0]
    x = SAMPLERS[sampler](gaussian_denoiser, x_start, sigmas, None)
    s0, s1 = float(sigmas[0]), float(sigmas[-1])
    exact = MU + math.sqrt(S**2 + s1**2) / math.sqrt(S**2 + s0**2) * (x_start - MU)
    return float((x - exact).abs().max())


@pytest.mark.parametrize(
    "sampler,order", [("euler", 1), ("heun", 2), ("dpm2", 2), ("dpmpp_2m", 2), ("unipc", 3)]
)
def test_ode_samplers_converge_at_their_order(sampler, order):
    errors = [ode_error(sampler, n) for n in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert errors[-1] < 0.05
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)


@pytest.mark.parametrize(
    "sampler",
    ["euler", "heun", "dpm2", "dpmpp_2m", "unipc", "euler_a", "dpmpp_2m_sde", "dpmpp_sde", "ddim"],
)
def test_samplers_reach_the_data_distribution(sampler):
    # Ancestral samplers are only weakly first order: 100 steps keep their bias < 0.02.
    sigmas = get_sigmas("karras", 100, ScheduleConfig()).double()
    gen = torch.Generator().manual_seed(0)
    x = draw_noise((20000, 1), gen, dtype=torch.float64) * sigmas[0]
    out = SAMPLERS[sampler](gaussian_denoiser, x, sigmas, None, generator=gen)
    assert abs(float(out.mean()) - MU) < 0.03
    assert abs(float(out.std()) - S) < 0.03


# --- schedules and names --------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
@pytest.mark.parametrize("sampler", [None, "euler", "dpmpp_2m", "ddim", "lcm"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_schedules_are_monotone_and_end_in_zero(schedule, sampler, beta_schedule):
    cfg = ScheduleConfig(beta_schedule=beta_schedule)
    for steps in (1, 4, 25):
        s = get_sigmas(schedule, steps, cfg, sampler=sampler)
        assert s.shape == (steps + 1,) and s.dtype == torch.float32
        assert s[-1] == 0 and bool((s[:-1] > 0).all())
        assert bool((s[1:] < s[:-1]).all())


def test_sigma_t_roundtrip_and_errors():
    table = train_sigmas(ScheduleConfig())
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, table), table), t, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="schedule 'linear'"):
        get_sigmas("linear", 10, ScheduleConfig())
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("default", 0, ScheduleConfig())


def test_truncate_for_strength_matches_diffusers_get_timesteps():
    sigmas = get_sigmas("default", 20, ScheduleConfig(), sampler="euler")
    out = truncate_for_strength(sigmas, 20, 0.75)  # init_timestep 15, t_start 5
    assert torch.equal(out, sigmas[5:])
    assert torch.equal(truncate_for_strength(sigmas, 20, 1.0), sigmas)
    with pytest.raises(ValueError, match="strength"):
        truncate_for_strength(sigmas, 20, 1.5)


def test_resolve_sampler():
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("Euler a") == ("euler_a", "default")
    assert resolve_sampler("dpm++ sde karras") == ("dpmpp_sde", "karras")
    assert resolve_sampler("DPM++ 2M SDE") == ("dpmpp_2m_sde", "default")
    assert resolve_sampler("DDIM") == ("ddim", "default")
    assert resolve_sampler("heun") == ("heun", "default")
    assert resolve_sampler("UniPC") == ("unipc", "default")
    with pytest.raises(ValueError, match="'Foo 3M'.*euler_a.*DPM\\+\\+ 2M Karras"):
        resolve_sampler("Foo 3M")


def test_losses_targets_and_min_snr():
    cfg = ScheduleConfig(prediction="v")
    a = train_alphas_cumprod(cfg)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    ref = DDIMScheduler(**SD15, prediction_type="v_prediction")
    torch.testing.assert_close(add_noise(x0, noise, t, a), ref.add_noise(x0, noise, t))
    v = ref.get_velocity(x0, noise, t)
    loss = DiffusionLoss(cfg)
    assert loss(v, x0, noise, t).abs().max() < 1e-10
    assert loss(v + 1, x0, noise, t).shape == (3,)
    w = min_snr_weights(t, a, 5.0, "eps")
    snr = a[t] / (1 - a[t])
    torch.testing.assert_close(w, (snr.clamp(max=5) / snr).float())
    assert w[0] < 1 and w[2] == 1  # high-SNR (small t) samples are down-weighted
    weighted = DiffusionLoss(cfg, min_snr_gamma=5.0)(v + 1, x0, noise, t)
    torch.testing.assert_close(weighted, min_snr_weights(t, a, 5.0, "v"))


def test_min_snr_floor_keeps_high_noise_steps():
    a = train_alphas_cumprod(ScheduleConfig(prediction="v"))
    snr = (a / (1 - a)).double()
    t = torch.arange(1000)
    plain = min_snr_weights(t, a, 5.0, "v")
    floored = min_snr_weights(t, a, 5.0, "v", floor=0.25)
    low = snr < 0.25  # the high-noise steps, where plain min-SNR's x0-space weight is SNR itself
    assert low[-1] and low.double().mean() > 0.4
    # x0-space weight: v weight * (SNR + 1); the floor sets it to 0.25 there and nowhere else
    torch.testing.assert_close((floored.double() * (snr + 1))[low], torch.full_like(snr[low], 0.25))
    torch.testing.assert_close(floored[~low], plain[~low])
    assert floored[999] > 40 * plain[999]  # t = 999 counted ~50x more than under plain min-SNR
    # eps target: the same x0-space weight, divided by SNR instead of SNR + 1
    eps = min_snr_weights(t, a, 5.0, "eps", floor=0.25)
    torch.testing.assert_close(eps.double() * snr, floored.double() * (snr + 1), rtol=1e-5, atol=0)
    loss = DiffusionLoss(ScheduleConfig(prediction="v"), min_snr_gamma=5.0, min_snr_floor=0.25)
    x0 = torch.zeros(1000, 1, 1, 1)
    torch.testing.assert_close(loss(torch.ones_like(x0), x0, x0, t), floored)
    # a mask puts the floor on some samples only
    mask = t % 2 == 0
    some = min_snr_weights(t, a, 5.0, "v", floor=0.25, floored=mask)
    torch.testing.assert_close(some[mask], floored[mask])
    torch.testing.assert_close(some[~mask], plain[~mask])
    torch.testing.assert_close(loss(torch.ones_like(x0), x0, x0, t, mask), some)
    with pytest.raises(ValueError, match="floor must be in"):
        min_snr_weights(t, a, 5.0, "v", floor=6.0)
    with pytest.raises(ValueError, match="needs min_snr_gamma"):
        DiffusionLoss(ScheduleConfig(), min_snr_floor=0.25)


# --- Brownian noise for SDE samplers ---------------------------------------------------------


def test_brownian_tree_is_a_function_of_seed_and_t_with_brownian_increments():
    points = [9.0, 2.0, 3.14159, 5.0, 10.0]
    a, b = BrownianTree(5, (200_000,), 10.0), BrownianTree(5, (200_000,), 10.0)
    wa = {t: a(t) for t in points}
    wb = {t: b(t) for t in reversed(points)}  # another order, another tree object
    for t in points:
        torch.testing.assert_close(wa[t], wb[t], rtol=0, atol=0)
    assert not BrownianTree(6, (200_000,), 10.0)(2.0).equal(wa[2.0])
    # Var W(t) = t, disjoint increments uncorrelated (also at t = 3.14, between tree nodes)
    for t in (2.0, 3.14159, 10.0):
        assert abs(float(wa[t].var()) / t - 1) < 0.02
    inc1, inc2 = wa[5.0] - wa[2.0], wa[9.0] - wa[5.0]
    assert abs(float(inc1.var()) / 3 - 1) < 0.02 and abs(float(inc2.var()) / 4 - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([inc1, inc2]))[0, 1])) < 0.01


def test_brownian_noise_per_image_generators_reproduce_single_image():
    x = torch.zeros(2, 4, 8, 8)
    both = BrownianNoise(x, 10.0, [torch.Generator().manual_seed(s) for s in (3, 4)])
    alone = BrownianNoise(x[:1], 10.0, [torch.Generator().manual_seed(4)])
    torch.testing.assert_close(both(3.0, 1.0)[1:], alone(3.0, 1.0))
    n = both(3.0, 1.0)
    assert n.shape == x.shape and 0.7 < float(n.std()) < 1.3


def test_dpmpp_sde_converges_as_steps_grow():
    # One Brownian path per seed: more steps refine the same sample instead of drawing a new
    # one. Independent per-step noise would leave a mean gap of ~0.56 (two draws of N(mu, S^2)).
    outs = {}
    for n in (25, 50, 200):
        sigmas = get_sigmas("karras", n, ScheduleConfig()).double()
        gen = torch.Generator().manual_seed(0)
        x = draw_noise((4000, 1), gen, dtype=torch.float64) * sigmas[0]
        outs[n] = SAMPLERS["dpmpp_sde"](gaussian_denoiser, x, sigmas, None, generator=gen)
    gap25, gap50 = (float((outs[n] - outs[200]).abs().mean()) for n in (25, 50))
    assert gap50 < gap25 < 0.1, (gap25, gap50)
