"""ember, diffusers and OpenVINO on the same random SD 1.5 weights, side by side in one run (the
README's speed table), and two smaller tables; writes markdown.

    .venv/bin/python bench/speed.py --openvino --threads 2 --readme    # all tables, README's too
    .venv/bin/python bench/speed.py --cases sd15 --openvino --threads 2 --readme   # README's only
    .venv/bin/python bench/speed.py --cases sd15 --size 256 --steps 3 --rounds 1 --out /tmp/s.md

Cases (--cases, a comma list; all three by default):
  sd15   the SD 1.5 architecture, --size (512) square, --steps (20) DPM++ 2M, cfg 7, one image:
         ember (`--dtype auto`: bf16 where the CPU has AVX512-BF16 or AMX, else fp32), diffusers
         in its fastest CPU set-up (the same dtype, fused SDPA, once with contiguous and once with
         channels-last U-Net and VAE: the faster is compared) and, with --openvino, optimum-intel's
         OVStableDiffusionPipeline (static shapes, the same dtype as its inference precision)
  fp32   the same at --fp32-size (256) in fp32, ember against diffusers, and the PSNR of ember's
         bf16 image against its fp32 one where the CPU has bf16
  small  ember's default model (the ember-small architecture), 64x64, 20 steps, fp32 and bf16

The columns, measured the same way on every side:
  per cfg step    one sampling step with classifier-free guidance: (an N-step image - a 2-step
                  image) / (N - 2), both warm, in the same process, so that text encoding, the VAE
                  decode and fixed costs cancel; what is left is the U-Net pass on the cond+uncond
                  batch and the sampler's own work
  whole image     one N-step image, warm (text encoding, sampling, VAE decode, pixels)
  whole process   process start to the PNG written, cold: `ember generate` for ember, the worker's
                  first image for the peers (OpenVINO's with its compile cache warm, as a second run
                  finds it; its export and its compile from an empty cache are reported apart)
  peak RSS        the worker process's own high-water mark (VmHWM), loading included
  % of peak       the U-Net's dense FLOPs per cfg step (its convolutions and linear layers on a
                  batch of 2: 1.35 TFLOP at 512x512; attention's products are not counted) per
                  second, over the matmul peak measured in the same run with the same threads: the
                  best of torch.mm at 2048 and 4096 and a 2048-channel 1x1 oneDNN convolution, in
                  bf16 where the CPU has it, else fp32

Every measurement runs in its own process, the sides are interleaved round by round (ember,
diffusers, OpenVINO, the peak, ember, ...) so that a busy machine slows all alike, and medians are
reported. The random weights, the OpenVINO venv and its export are made once into --cache. Each
case's section is written between marker comments into --out, replacing that section of an
earlier run and leaving the others; --readme writes the sd15 summary into README.md's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    ROOT,
    count_flops,
    generate_command,
    machine,
    native_bf16,
    no_embeddings,
    ov_cache_dir,
    ov_export_once,
    ov_pipeline,
    ov_python,
    peak_rss_mb,
    replace_block,
    sd15_folder,
    spawn_worker,
    timed_generate,
)

PROMPT = "a photograph of an astronaut riding a horse"
CASES = ("sd15", "fp32", "small")
SHORT = 2  # steps of the image whose time is taken off the N-step image's
SMALL_SIZE, SMALL_STEPS = 64, 20


def small_file(cache: Path) -> Path:
    """ember-small with random weights as a single file (text encoder: the MiniLM package)."""
    path = cache / "ember-small-random.safetensors"
    if not path.exists():
        import torch

        from ember import checkpoints as K
        from ember.config import get_preset
        from ember.keymaps import TEXT
        from ember.models.ldm import LatentDiffusion
        from ember.models.text import build_text_encoder
        from ember.safetensors_io import save_safetensors

        cfg = get_preset("ember-small")
        torch.manual_seed(0)
        model = LatentDiffusion(cfg, build_text_encoder(cfg.text))
        sd = K.internal_to_ldm(model.state_dict(), cfg, {})
        sd = {k: v for k, v in sd.items() if not k.startswith(TEXT)}
        save_safetensors(sd, path, {K.CONFIG_KEY: cfg.to_json(), "format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------
# workers: one measurement per process, JSON on the last stdout line


def _image_series(a: argparse.Namespace, run: Callable[[int, str | None], None]) -> dict:
    """`run(steps, png)` makes one image (and writes it to `png` unless None). First an image of
    a.steps, cold, to a.save, timed from the process's start (a.t0, where given); then a.images
    warm pairs: SHORT steps, then a.steps."""
    run(a.steps, a.save)
    out = {"first": time.time() - a.t0 if a.t0 else None, "short": [], "image": []}
    for _ in range(a.images):
        for steps, key in ((SHORT, "short"), (a.steps, "image")):
            t = time.perf_counter()
            run(steps, None)
            out[key].append(time.perf_counter() - t)
    return out


def worker_ember(a: argparse.Namespace) -> dict:
    """ember's default path, `GenerationService` (what `ember generate` and `ember serve` run)."""
    import numpy as np

    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams

    t = time.perf_counter()
    service = GenerationService(a.dtype, embeddings_dir=a.embeddings and Path(a.embeddings))
    service.load(a.model)
    load = time.perf_counter() - t
    last = []

    def run(steps: int, png: str | None) -> None:
        params = GenerationParams(prompt=PROMPT, sampler="dpmpp_2m", steps=steps, cfg=7.0,
                                  width=a.size, height=a.size, batch=a.batch, seed=0)  # fmt: skip
        last[:] = service.generate([Request(params)])[0]
        if png:
            Path(png).write_bytes(last[0].png())

    out = {"load": load, **_image_series(a, run)}
    if a.pixels:
        np.save(a.pixels, np.stack([image.pixels for image in last]))
    return out


def _peer_run(a: argparse.Namespace, pipe) -> Callable[[int, str | None], None]:
    """`run(steps, png)` for a diffusers-style pipeline (diffusers' own or optimum-intel's)."""
    import torch

    def run(steps: int, png: str | None) -> None:
        gens = [torch.Generator().manual_seed(i) for i in range(a.batch)]
        with torch.inference_mode():
            images = pipe(
                [PROMPT] * a.batch, num_inference_steps=steps, guidance_scale=7.0, height=a.size,
                width=a.size, generator=gens if a.batch > 1 else gens[0],
            ).images  # fmt: skip
        if png:
            images[0].save(png)

    return run


def worker_diffusers(a: argparse.Namespace) -> dict:
    import diffusers
    import torch

    from ember.device import DTYPES

    t = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=DTYPES[a.dtype])
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    pipe.vae.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    if a.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return {"load": time.perf_counter() - t, **_image_series(a, _peer_run(a, pipe))}


def worker_openvino(a: argparse.Namespace) -> dict:
    """(OpenVINO venv) The exported IR, static shapes; --images -1: compile only."""
    import diffusers

    t = time.perf_counter()
    pipe, compile_s = ov_pipeline(a.model, a.threads, a.size)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = {"load": time.perf_counter() - t, "compile": compile_s}
    if a.images < 0:
        return out
    return {**out, **_image_series(a, _peer_run(a, pipe))}


def _best_rate(fn, args: tuple, flops: int, samples: int = 5) -> float:
    """The best FLOP/s of `fn(*args)` over `samples` timings of at least 0.25 s each."""
    fn(*args)
    best = 0.0
    for _ in range(samples):
        calls, t = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t < 0.25:
            fn(*args)
            calls += 1
        best = max(best, calls * flops / (time.perf_counter() - t))
    return best


def worker_peak(a: argparse.Namespace) -> dict:
    """The matmul peak per dtype (bf16 only where the CPU has it natively): the best of torch.mm
    (MKL/oneDNN GEMM) at two sizes and a 1x1 convolution through ember's prepacked oneDNN path
    (MKL's fp32 GEMM is not at its best on AMD)."""
    import torch

    from ember.models.prepack import Conv2d

    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native_bf16() else {})}
    peak = {}
    with torch.no_grad():
        for name, dtype in dtypes.items():
            kernels = []
            for n in (2048, 4096):
                x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
                kernels.append((torch.mm, (x, y), 2 * n**3))
            n = 2048
            conv = Conv2d(n, n, 1, bias=False).to(dtype).requires_grad_(False)
            z = torch.randn(1, n, 32, 32, dtype=dtype)
            kernels.append((conv, (z,), 2 * n * n * 32 * 32))
            peak[name] = max(_best_rate(*k) for k in kernels)
    return {"peak": peak}


def worker_flops(a: argparse.Namespace) -> dict:
    """FLOPs of one U-Net pass (cond + uncond batch) and one VAE decode per preset@size."""
    from ember.config import get_preset

    pairs = zip(a.flop_models, a.flop_sizes, strict=True)
    return {f"{m}@{s}": count_flops(get_preset(m), s) for m, s in pairs}


WORKERS = {
    "ember": worker_ember,
    "diffusers": worker_diffusers,
    "openvino": worker_openvino,
    "peak": worker_peak,
    "flops": worker_flops,
}


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = WORKERS[a.worker](a)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver: measuring


def spawn(python: str | Path, **kw) -> dict:
    """Run this file as a worker under `python`; its JSON result."""
    return spawn_worker(str(python), __file__, "--t0", repr(time.time()), **kw)


def interleave(jobs: dict[str, Callable[[], dict]], rounds: int, case: str) -> dict[str, dict]:
    """Each job once per round, in turn; their results pooled per job and key."""
    pooled: dict[str, dict[str, list]] = {name: {} for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            print(f"bench: {case} round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            for k, v in job().items():
                pooled[name].setdefault(k, []).extend(v if isinstance(v, list) else [v])
    return pooled


def measure_sd15(a: argparse.Namespace, files: dict, peak_job) -> dict:
    dtype = "bf16" if native_bf16() else "fp32"
    tmp = files["tmp"]
    base = {"model": files["sd15"], "size": a.size, "steps": a.steps, "threads": a.threads,
            "images": a.images}  # fmt: skip
    cli = generate_command(PROMPT, files["sd15"], tmp / "speed-ember.png", steps=a.steps,
                           size=f"{a.size}x{a.size}", sampler="dpmpp_2m", cfg=7,
                           embeddings_dir=files["embeddings"])  # fmt: skip
    jobs = {
        "ember": lambda: spawn(sys.executable, worker="ember", dtype="auto",
                               embeddings=files["embeddings"], **base),
        "ember generate": lambda: timed_generate(cli, tmp / "speed-ember.png", a.threads),
        f"diffusers {dtype}": lambda: spawn(sys.executable, worker="diffusers", dtype=dtype,
                                            save=tmp / "speed-diffusers.png", **base),
        f"diffusers {dtype} channels-last": lambda: spawn(
            sys.executable, worker="diffusers", dtype=dtype, channels_last=True,
            save=tmp / "speed-diffusers.png", **base),
    }  # fmt: skip
    out: dict = {"dtype": dtype}
    if a.openvino:
        py, folder = ov_python(a.cache), a.cache / "ov-sd15-random"
        out["ov_export"] = ov_export_once(py, Path(files["sd15"]), folder, again=a.reexport)
        shutil.rmtree(ov_cache_dir(folder), ignore_errors=True)  # to time a first compile
        print("bench: sd15: OpenVINO's compile from an empty cache", file=sys.stderr, flush=True)
        out["ov_cold"] = spawn(py, worker="openvino", model=folder, size=a.size,
                               threads=a.threads, images=-1)  # fmt: skip
        ov = {**base, "model": folder, "save": tmp / "speed-openvino.png"}
        jobs["OpenVINO"] = lambda: spawn(py, worker="openvino", **ov)
    jobs["peak"] = peak_job
    out["runs"] = interleave(jobs, a.rounds, "sd15")
    return out


def measure_fp32(a: argparse.Namespace, files: dict, peak_job) -> dict:
    tmp = files["tmp"]
    base = {"model": files["sd15"], "size": a.fp32_size, "steps": a.steps, "threads": a.threads,
            "images": a.images}  # fmt: skip
    jobs = {
        "ember fp32": lambda: spawn(sys.executable, worker="ember", dtype="fp32",
                                    embeddings=files["embeddings"], pixels=tmp / "fp32.npy", **base),
        "diffusers fp32": lambda: spawn(sys.executable, worker="diffusers", dtype="fp32", **base),
        "diffusers fp32 channels-last": lambda: spawn(sys.executable, worker="diffusers",
                                                      dtype="fp32", channels_last=True, **base),
    }  # fmt: skip
    if native_bf16():
        jobs["ember bf16"] = lambda: spawn(sys.executable, worker="ember", dtype="bf16",
                                           embeddings=files["embeddings"],
                                           pixels=tmp / "bf16.npy", **base)  # fmt: skip
    jobs["peak"] = peak_job
    out = {"runs": interleave(jobs, a.rounds, "fp32")}
    if native_bf16():
        out["psnr"] = psnr(tmp / "fp32.npy", tmp / "bf16.npy")
    return out


def measure_small(a: argparse.Namespace, files: dict, peak_job) -> dict:
    tmp, model = files["tmp"], files["small"]
    base = {"model": model, "size": SMALL_SIZE, "steps": SMALL_STEPS, "threads": a.threads,
            "images": max(3, a.images), "embeddings": files["embeddings"]}  # fmt: skip
    jobs: dict[str, Callable[[], dict]] = {}
    for d in ("fp32", "bf16"):
        cli = generate_command(PROMPT, model, tmp / "speed-small.png", dtype=d,
                               steps=SMALL_STEPS, embeddings_dir=files["embeddings"])  # fmt: skip
        jobs |= {
            d: lambda d=d: spawn(sys.executable, worker="ember", dtype=d,
                                 pixels=tmp / f"small-{d}.npy", **base),
            f"{d} batch 8": lambda d=d: spawn(sys.executable, worker="ember", dtype=d, batch=8,
                                              **base),
            f"{d} ember generate": lambda cli=cli: timed_generate(cli, tmp / "speed-small.png",
                                                                  a.threads),
        }  # fmt: skip
    jobs["peak"] = peak_job
    return {
        "runs": interleave(jobs, a.rounds, "small"),
        "psnr": psnr(tmp / "small-fp32.npy", tmp / "small-bf16.npy"),
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def psnr(a: Path, b: Path) -> float:
    """PSNR of two saved uint8 images (numpy), in dB."""
    import numpy as np

    mse = np.mean((np.load(a).astype(np.float64) - np.load(b).astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def per_step(r: dict, steps: int) -> list[float]:
    """Seconds per cfg step of each (short, long) pair of warm images in a worker's result."""
    return [(n - s) / (steps - SHORT) for s, n in zip(r["short"], r["image"], strict=True)]


# ---------------------------------------------------------------------------------------------
# driver: reporting


def side_stats(r: dict, steps: int, process: dict | None = None) -> dict:
    """Medians of one side: per cfg step, whole image, whole process (from `process` where that
    is another run, e.g. `ember generate`), load, peak RSS."""
    return {"step": med(per_step(r, steps)), "image": med(r["image"]),
            "process": med((process or r)["first"]), "load": med(r["load"]),
            "rss": med(r["peak_rss_mb"])}  # fmt: skip


def fmt_gib(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB"


def ratio(peer: float, ember: float) -> str:
    return f"{peer / ember:.2f}x"


def report_sd15(
    a: argparse.Namespace, data: dict, peak: dict, flops: dict, head: str
) -> tuple[str, str]:
    """(the summary that README.md carries, the whole section for --out)."""
    runs, dtype = data["runs"], data["dtype"]
    dense = flops[f"sd15@{a.size}"]["unet_dense"]
    ember = side_stats(runs["ember"], a.steps, runs["ember generate"])
    diffusers = {n: side_stats(r, a.steps) for n, r in runs.items() if n.startswith("diffusers")}
    best = min(diffusers, key=lambda n: diffusers[n]["image"])
    sides = {"ember": ember, "diffusers": diffusers[best]}
    if "OpenVINO" in runs:
        sides["OpenVINO"] = side_stats(runs["OpenVINO"], a.steps)
    peers = [s for s in sides if s != "ember"]

    def pct(s: dict) -> str:
        return f"{dense / s['step'] / peak[dtype]:.0%}"

    rows = [("per cfg step", lambda s: f"{s['step']:.2f} s", "step"),
            ("whole image, warm", lambda s: f"{s['image']:.1f} s", "image"),
            ("whole process, cold start to PNG", lambda s: f"{s['process']:.1f} s", "process"),
            ("peak RSS", lambda s: fmt_gib(s["rss"]), "rss"),
            (f"per cfg step, % of the {dtype} matmul peak", pct, None)]  # fmt: skip
    summary = [
        f"SD 1.5 architecture (random weights), {a.size}x{a.size}, {a.steps} steps DPM++ 2M, cfg 7, "
        f"one image; {dtype} on every side, {how_run(a)}:",
        "",
        "| | " + " | ".join(sides) + " | " + " | ".join(f"{p} / ember" for p in peers) + " |",
        "| --- |" + " ---: |" * (len(sides) + len(peers)),
    ]
    for label, show, key in rows:
        ratios = [ratio(sides[p][key], ember[key]) if key else "" for p in peers]
        summary.append(f"| {label} | " + " | ".join(show(s) for s in sides.values()) + " | "
                       + " | ".join(ratios) + " |")  # fmt: skip
    notes = (
        f"Ratios: the peer's number over ember's (above 1: ember is faster or smaller). diffusers "
        f"is its fastest set-up by whole image here ({best.removeprefix('diffusers ')}, fused "
        f"SDPA). Per cfg step = (the {a.steps}-step image - a {SHORT}-step image) / "
        f"{a.steps - SHORT}, both warm, on every side; % of peak = the U-Net's "
        f"{dense / 1e12:.2f} TFLOP of convolutions and linear layers per cfg step over the {dtype} "
        f"matmul peak measured in the same run ({peak[dtype] / 1e9:.0f} GFLOP/s)."
    )
    if "OpenVINO" in runs:
        notes += " " + ov_note(data, runs["OpenVINO"])
    summary += ["", notes, "", head]

    detail = [
        "| side | per cfg step (s) | whole image (s) | whole process (s) | load (s) "
        "| peak RSS (MiB) | per cfg step, % of peak (GFLOP/s) | vs ember: step / image / process / RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, s in {"ember": ember, **diffusers, **{p: sides[p] for p in peers[1:]}}.items():
        vs = " / ".join(ratio(s[k], ember[k]) for k in ("step", "image", "process", "rss"))
        detail.append(
            f"| {name} | {s['step']:.3f} | {s['image']:.2f} | {s['process']:.2f} | "
            f"{s['load']:.1f} | {s['rss']:.0f} | {pct(s)} ({dense / s['step'] / 1e9:.0f}) | {vs} |"
        )
    f = flops[f"sd15@{a.size}"]
    section = [
        f"## SD 1.5, {a.size}x{a.size}, {a.steps} steps DPM++ 2M, cfg 7: ember, diffusers"
        + (", OpenVINO" if "OpenVINO" in runs else ""),
        "",
        *summary,
        "",
        "Every configuration run (ember's whole process is `ember generate`, the others' their "
        "worker's first image; load = reading the weights, and OpenVINO's compile):",
        "",
        *detail,
        "",
        f"FLOPs per U-Net pass on the cond+uncond batch: {f['unet'] / 1e9:.0f} G in all, "
        f"{f['unet_dense'] / 1e9:.0f} G dense (convolutions and linear layers); a VAE decode "
        f"{f['vae'] / 1e9:.0f} G. {peak_line(peak, a.threads)}",
    ]
    return "\n".join(summary), "\n".join(section)


def ov_note(data: dict, r: dict) -> str:
    """OpenVINO's one-off costs: the export (as recorded when it was made) and the compile."""
    rec = data["ov_export"]
    if rec.get("seconds"):
        export = (f"its export took {rec['seconds']:.0f} s once ({rec['made']}, on "
                  f"{rec['cpu']}, load average {rec['load_average']:.1f})")  # fmt: skip
    else:
        export = "its export's time was not recorded (made before; `--reexport` times it)"
    return (
        f"OpenVINO: {export}; compiling took {data['ov_cold']['compile']:.1f} s from an empty "
        f"cache and {med(r['compile']):.1f} s from its cache (in its whole process)."
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("s" if n != 1 else "")


def how_run(a: argparse.Namespace) -> str:
    return (f"{plural(a.threads, 'thread')}, medians of {plural(a.rounds, 'interleaved round')}"
            + (f" of {plural(a.images, 'image pair')} per process" if a.images > 1 else ""))  # fmt: skip


def peak_line(peak: dict, threads: int) -> str:
    return (
        "Matmul peak (the best of torch.mm at 2048 and 4096 and a 2048-channel 1x1 oneDNN "
        f"convolution, {plural(threads, 'thread')}, over the run's rounds): "
        + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peak.items())
        + "."
    )


def report_fp32(a: argparse.Namespace, data: dict, peak: dict, flops: dict, head: str) -> str:
    runs = data["runs"]
    dense = flops[f"sd15@{a.fp32_size}"]["unet_dense"]
    stats = {n: side_stats(r, a.steps) for n, r in runs.items() if n != "peak"}
    ember = stats["ember fp32"]
    rows = [
        f"## SD 1.5, {a.fp32_size}x{a.fp32_size}, {a.steps} steps DPM++ 2M, cfg 7, fp32",
        "",
        f"{how_run(a)}. Per cfg step and % of peak as in the SD 1.5 table; the % is of the "
        f"configuration's own dtype's peak. {head}",
        "",
        "| configuration | per cfg step (s) | whole image (s) | peak RSS (MiB) "
        "| per cfg step, % of peak | vs ember fp32: step / image / RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in stats.items():
        d = "bf16" if "bf16" in name else "fp32"
        vs = " / ".join(ratio(s[k], ember[k]) for k in ("step", "image", "rss"))
        rows.append(f"| {name} | {s['step']:.3f} | {s['image']:.2f} | {s['rss']:.0f} | "
                    f"{dense / s['step'] / peak[d]:.0%} | {vs} |")  # fmt: skip
    best = min((n for n in stats if n.startswith("diffusers")), key=lambda n: stats[n]["image"])
    rows += [
        "",
        f"ember fp32 against diffusers' fastest fp32 set-up ({best}): "
        f"{ratio(stats[best]['image'], ember['image'])} per image, "
        f"{ratio(stats[best]['step'], ember['step'])} per cfg step."
        + (
            f" PSNR of ember's bf16 image against its fp32 one: {data['psnr']:.1f} dB."
            if "psnr" in data
            else ""
        ),  # fmt: skip
    ]
    return "\n".join(rows)


def report_small(a: argparse.Namespace, data: dict, peak: dict, flops: dict, head: str) -> str:
    runs = data["runs"]
    dense = flops[f"ember-small@{SMALL_SIZE}"]["unet_dense"]
    rows = [
        f"## ember's default model (ember-small architecture), {SMALL_SIZE}x{SMALL_SIZE}, "
        f"{SMALL_STEPS} steps DPM++ 2M, cfg 7",
        "",
        f"{how_run(a)}. {head}",
        "",
        "| dtype | per cfg step (ms) | whole image, warm (s) | images/s at batch 8 "
        "| whole process, `ember generate` to PNG (s) | peak RSS (MiB) | per cfg step, % of peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for d in ("fp32", "bf16"):
        s = side_stats(runs[d], SMALL_STEPS, runs[f"{d} ember generate"])
        batch8 = 8 / med(runs[f"{d} batch 8"]["image"])
        rows.append(
            f"| {d} | {1000 * s['step']:.1f} | {s['image']:.3f} | {batch8:.1f} | "
            f"{s['process']:.2f} | {s['rss']:.0f} | "
            + (f"{dense / s['step'] / peak[d]:.0%} |" if d in peak else "- |")
        )
    rows += ["", f"PSNR of the bf16 image against the fp32 one: {data['psnr']:.1f} dB."]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    p.add_argument("--openvino", action="store_true",
                   help="sd15: also OpenVINO (its own venv and export, made once into --cache)")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads, every side")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--images", type=int, default=1,
                   help="warm (2-step, N-step) image pairs per process (default 1)")  # fmt: skip
    p.add_argument("--size", type=int, default=512, help="sd15: image side (default 512)")
    p.add_argument("--steps", type=int, default=20, help="sd15, fp32: steps (default 20)")
    p.add_argument("--fp32-size", type=int, default=256, help="fp32: image side (default 256)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md",
                   help="the markdown file whose sections this run replaces (bench/results.md)")  # fmt: skip
    p.add_argument("--readme", nargs="?", type=Path, const=ROOT / "README.md",
                   help="also write the sd15 summary between the speed-table markers of this "
                   "file (default README.md)")  # fmt: skip
    p.add_argument("--reexport", action="store_true",
                   help="export the OpenVINO model again, timing it on this machine")  # fmt: skip
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    # worker arguments (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "save", "pixels", "embeddings"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--flop-models", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--flop-sizes", nargs="*", type=int, default=[], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path,
                   help="measure nothing: write the tables from the measurements of an earlier "
                   "run (each run saves them in --cache/out/speed-data.json)")  # fmt: skip
    a = p.parse_args()
    if a.worker:
        run_worker(a)
        return
    if a.data:
        record = json.loads(a.data.read_text())
    else:
        cases = a.cases.split(",")
        if set(cases) - set(CASES):
            p.error(
                f"unknown cases {sorted(set(cases) - set(CASES))}: choose from {', '.join(CASES)}"
            )
        if a.steps <= SHORT:
            p.error(
                f"--steps must be above {SHORT}: a cfg step is timed against a {SHORT}-step image"
            )
        if a.readme and "sd15" not in cases:
            p.error("--readme writes the sd15 table: add sd15 to --cases")
        record = measure_all(a, cases, a.cache / "out" / "speed-data.json")
    write_tables(record, a.out, a.readme)


def measure_all(a: argparse.Namespace, cases: list[str], saved: Path) -> dict:
    """Every case's measurements, with what the tables need to say how they were made; saved as
    JSON in `saved` after each case, so that a failure later in a long run keeps the cases done
    (`--data` writes their tables)."""
    a.cache.mkdir(parents=True, exist_ok=True)
    head = (f"Machine: {machine()}. Command: `.venv/bin/python bench/speed.py "
            f"{' '.join(sys.argv[1:])}`.")  # fmt: skip
    files = {"tmp": a.cache / "out", "embeddings": str(no_embeddings(a.cache))}
    files["tmp"].mkdir(exist_ok=True)
    if "sd15" in cases or "fp32" in cases:
        files["sd15"] = str(sd15_folder(a.cache))
    if "small" in cases:
        files["small"] = str(small_file(a.cache))
    flop_keys = {"sd15": ("sd15", a.size), "fp32": ("sd15", a.fp32_size),
                 "small": ("ember-small", SMALL_SIZE)}  # fmt: skip
    models, sizes = zip(*(flop_keys[c] for c in cases), strict=True)
    flops = spawn(sys.executable, worker="flops", threads=1, flop_models=list(models),
                  flop_sizes=list(sizes))  # fmt: skip
    peaks: list[dict] = []

    def peak_job() -> dict:  # one per round of every case; the best is the run's peak
        peaks.append(spawn(sys.executable, worker="peak", threads=a.threads)["peak"])
        return {}

    measure = {"sd15": measure_sd15, "fp32": measure_fp32, "small": measure_small}
    settings = {k: getattr(a, k) for k in ("size", "steps", "fp32_size", "threads", "rounds",
                                           "images")}  # fmt: skip
    record = {"cases": [], "settings": settings, "head": head, "flops": flops, "data": {}}
    for case in cases:
        t = time.time()
        record["data"][case] = measure[case](a, files, peak_job)
        record["data"][case]["minutes"] = (time.time() - t) / 60
        record["cases"].append(case)
        record["peak"] = {d: max(p[d] for p in peaks) for d in peaks[0]}
        saved.write_text(json.dumps(record))
        print(f"bench: {case} measured; saved in {saved}", file=sys.stderr, flush=True)
    return record


def write_tables(record: dict, out: Path, readme: Path | None) -> None:
    """Each case's section into `out` (between its markers), the sd15 summary into `readme`'s, and
    that summary on stdout, to paste elsewhere."""
    a = argparse.Namespace(**record["settings"])
    peak, flops, head = record["peak"], record["flops"], record["head"]
    if not out.exists():
        out.write_text("# ember speed benchmarks\n\nWritten by `bench/speed.py`: each section "
                       "names its machine and command, and a run replaces its own sections.\n")  # fmt: skip
    summary = None
    for case in record["cases"]:
        data = record["data"][case]
        if case == "sd15":
            summary, text = report_sd15(a, data, peak, flops, head)
        elif case == "fp32":
            text = report_fp32(a, data, peak, flops, head) + f"\n\n{peak_line(peak, a.threads)}"
        else:
            text = report_small(a, data, peak, flops, head) + f"\n\n{peak_line(peak, a.threads)}"
        text += f"\n\n(This case took {data['minutes']:.1f} min.)"
        replace_block(out, f"speed.py:{case}", text, append=True)
    print(f"bench: wrote {out}", file=sys.stderr)
    if summary is None:
        if readme:
            raise SystemExit("--readme: these measurements have no sd15 case")
        return
    summary += ("\n\nEvery configuration, and the FLOPs and peaks: `bench/results.md`; "
                "`bench/speed.py --readme` rewrites this table.")  # fmt: skip
    if readme:
        replace_block(readme, "speed.py:sd15", summary)
        print(f"bench: wrote the table in {readme}", file=sys.stderr)
    print(summary)


if __name__ == "__main__":
    main()
