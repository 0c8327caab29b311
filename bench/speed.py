"""ember vs diffusers on the same weights, side by side in one run; writes a markdown table.

    .venv/bin/python bench/speed.py --out bench/results.md            # full run (long on a CPU)
    .venv/bin/python bench/speed.py --out bench/results.md --quick    # fewer steps and rounds

Every measurement runs in its own subprocess (so its peak RSS is its own), and the two sides are
interleaved (ember, diffusers, ember, diffusers, ...) so that a busy machine slows both alike.
Weights are random, of the exact architecture (SD 1.5, ember-small), made once into --cache.
Per-step U-Net time is taken with a forward hook on each side's U-Net; image time is the whole call
(text encoding, sampling, VAE decode); peak RSS is the child's own high-water mark (VmHWM, loading included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    count_flops,
    generate_command,
    machine,
    spawn_worker,
    threads_env,
    write_report,
)

PROMPT = "a photograph of an astronaut riding a horse"


# ---------------------------------------------------------------------------------------------
# model files (random weights, made once)


def sd15_folder(cache: Path) -> Path:
    """A diffusers folder of the SD 1.5 architecture with random weights (shared by both sides)."""
    folder = cache / "sd15-random"
    if not (folder / "model_index.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_diffusers_folder

        print("bench: building a random-weight SD 1.5 folder (once)", file=sys.stderr)
        build_diffusers_folder(folder, "sd15")
    return folder


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


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Linux keeps `ru_maxrss` across fork + exec, so a child of a big
    parent would report the parent's size; `VmHWM` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed_hook(module, times: list[float]):
    start = []
    module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: times.append(time.perf_counter() - start.pop()))


def worker_ember(a: argparse.Namespace) -> dict:
    import torch

    from ember.checkpoints import load_model
    from ember.device import DTYPES
    from ember.pipeline import generate
    from ember.settings import GenerationParams

    dtype = DTYPES[a.dtype]
    loaded = load_model(a.model, dtype=dtype)
    unet_times: list[float] = []
    _timed_hook(loaded.model.model.diffusion_model, unet_times)
    params = GenerationParams(
        prompt=PROMPT, sampler="dpmpp_2m", steps=a.steps, cfg=7.0, width=a.size, height=a.size,
        batch=a.batch, seed=0,
    )  # fmt: skip
    generate(loaded, params)  # warm-up
    unet_times.clear()
    image_times = []
    for _ in range(a.images):
        t = time.perf_counter()
        pixels = generate(loaded, params)
        image_times.append(time.perf_counter() - t)
    if a.save:
        torch.save(pixels, a.save)
    return {"unet": unet_times, "image": image_times}


def worker_diffusers(a: argparse.Namespace) -> dict:
    import diffusers
    import torch

    from ember.device import DTYPES

    dtype = DTYPES[a.dtype]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    pipe.vae.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    if a.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    unet_times: list[float] = []
    _timed_hook(pipe.unet, unet_times)

    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(a.batch)]
        return pipe(
            [PROMPT] * a.batch, num_inference_steps=a.steps, guidance_scale=7.0, height=a.size,
            width=a.size, generator=gens, output_type="pt",
        ).images  # fmt: skip

    with torch.no_grad():
        run()
        unet_times.clear()
        image_times = []
        for _ in range(a.images):
            t = time.perf_counter()
            run()
            image_times.append(time.perf_counter() - t)
    return {"unet": unet_times, "image": image_times}


def worker_flops(a: argparse.Namespace) -> dict:
    """FLOPs of one U-Net pass (cond + uncond batch) and one VAE decode, and matmul peaks."""
    import torch

    from ember.config import get_preset
    from ember.models.prepack import Conv2d

    out: dict = {"peak": {}}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Two dense kernels, best of both: torch.mm (MKL/oneDNN GEMM) and a 1x1 convolution
        # through ember's prepacked oneDNN path (MKL's fp32 GEMM is not at its best on AMD).
        x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        conv = Conv2d(n, n, 1, bias=False).to(dtype).requires_grad_(False)
        z = torch.randn(1, n, 32, 32, dtype=dtype)
        kernels = [(torch.mm, (x, y), 2 * n**3), (conv, (z,), 2 * n * n * 1024)]
        best = 0.0
        with torch.no_grad():
            for fn, args, flops in kernels:
                fn(*args)
                for _ in range(a.images + 4):
                    t = time.perf_counter()
                    for _ in range(4):
                        fn(*args)
                    best = max(best, 4 * flops / (time.perf_counter() - t))
        out["peak"][name] = best
    for preset, size in zip(a.flop_models, a.flop_sizes, strict=True):
        out[f"{preset}@{size}"] = count_flops(get_preset(preset), size)
    return out


def worker_cold(a: argparse.Namespace) -> dict:
    """Process start to PNG written, through the `ember generate` CLI."""
    png = Path(a.save)
    png.unlink(missing_ok=True)
    cmd = generate_command(PROMPT, a.model, png, dtype=a.dtype, steps=a.steps)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=threads_env(a.threads), stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    assert png.exists()
    return {"cold": [elapsed]}


WORKERS = {
    "ember": worker_ember,
    "diffusers": worker_diffusers,
    "flops": worker_flops,
    "cold": worker_cold,
}


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = WORKERS[a.worker](a)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["end_rss_mb"] = _current_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


def spawn(common: list[str], **kw) -> dict:
    return spawn_worker(sys.executable, __file__, *common, **kw)


def interleave(runs: dict[str, dict], rounds: int, common: list[str]) -> dict[str, dict]:
    """Run each named configuration once per round, in turn; pool their samples."""
    pooled: dict[str, dict] = {name: {} for name in runs}
    for r in range(rounds):
        for name, kw in runs.items():
            print(f"bench: round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            res = spawn(common, **kw)
            for k, v in res.items():
                pooled[name].setdefault(k, []).extend(v if isinstance(v, list) else [v])
    return pooled


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def psnr(a, b) -> float:
    import torch

    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * __import__("math").log10(1.0 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the markdown table here (else stdout)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for SD 1.5 (default 20)")
    p.add_argument("--steps-512", type=int, help="steps at 512x512 (default: --steps)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    p.add_argument("--images", type=int, default=1, help="timed images per process (after warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--cases", default="sd15-256,sd15-512,small,roofline",
                   help="comma list of sd15-256, sd15-512, small, roofline")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="--steps 4 --steps-512 2 --rounds 2")
    p.add_argument("--full", action="store_true", help="also fp32 at 512x512")
    # worker arguments (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--flop-models", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--flop-sizes", nargs="*", type=int, default=[], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        run_worker(a)
        return
    if a.quick:
        a.steps, a.steps_512, a.rounds = 4, 2, 2
    steps_512 = a.steps_512 or a.steps
    cases = a.cases.split(",")
    a.cache.mkdir(parents=True, exist_ok=True)
    common = ["--threads", str(a.threads), "--images", str(a.images)]
    started = time.time()
    sections = [
        "# ember speed benchmark",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/speed.py {' '.join(sys.argv[1:])}` "
        f"({a.threads} torch threads both sides, {a.rounds} interleaved rounds, "
        f"{a.images} timed image(s) per process after one warm-up; medians).",
        "",
    ]

    if "sd15-256" in cases or "sd15-512" in cases:
        sd15 = str(sd15_folder(a.cache))
    small = str(small_file(a.cache))
    tmp = a.cache / "out"
    tmp.mkdir(exist_ok=True)
    unet_time: dict[str, float] = {}

    for case, size, steps in (("sd15-256", 256, a.steps), ("sd15-512", 512, steps_512)):
        if case not in cases:
            continue
        base = {"model": sd15, "size": size, "steps": steps}
        runs = {
            "ember fp32": {**base, "worker": "ember", "dtype": "fp32",
                           "save": tmp / f"{case}-fp32.pt"},
            "diffusers fp32": {**base, "worker": "diffusers", "dtype": "fp32"},
            "ember bf16": {**base, "worker": "ember", "dtype": "bf16",
                           "save": tmp / f"{case}-bf16.pt"},
            "diffusers bf16": {**base, "worker": "diffusers", "dtype": "bf16"},
            "diffusers bf16 channels-last": {**base, "worker": "diffusers", "dtype": "bf16",
                                             "channels_last": True},
        }  # fmt: skip
        if size == 512 and not a.full:
            # fp32 at 512 doubles the run time; the fp32 comparison is made at 256.
            runs = {k: v for k, v in runs.items() if "bf16" in k}
        res = interleave(runs, a.rounds, common)
        import torch

        q = (
            float("nan")
            if "ember fp32" not in res
            else psnr(torch.load(tmp / f"{case}-fp32.pt"), torch.load(tmp / f"{case}-bf16.pt"))
        )
        rows = [
            f"## SD 1.5 architecture, {size}x{size}, {steps} steps DPM++ 2M, cfg 7, batch 1",
            "",
            "| configuration | U-Net pass (s) | image (s) | peak RSS (MiB) | RSS after (MiB) "
            "| speed vs diffusers bf16 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        ref = med(res["diffusers bf16"]["image"])
        for name, r in res.items():
            unet_time[f"{case} {name}"] = med(r["unet"])
            rows.append(
                f"| {name} | {med(r['unet']):.3f} | {med(r['image']):.2f} | "
                f"{med(r['peak_rss_mb']):.0f} | {med(r['end_rss_mb']):.0f} | "
                f"{ref / med(r['image']):.2f}x |"
            )
        best = min(
            (n for n in res if n.startswith("diffusers")), key=lambda n: med(res[n]["image"])
        )
        rows += [
            "",
            f"Fastest diffusers configuration: **{best}**. ember bf16 vs it: "
            f"**{med(res[best]['image']) / med(res['ember bf16']['image']):.2f}x** per image, "
            f"U-Net pass {med(res[best]['unet']) / med(res['ember bf16']['unet']):.2f}x. "
            + (
                f"ember fp32 vs diffusers fp32: "
                f"{med(res['diffusers fp32']['image']) / med(res['ember fp32']['image']):.2f}x "
                f"per image, U-Net pass "
                f"{med(res['diffusers fp32']['unet']) / med(res['ember fp32']['unet']):.2f}x. "
                f"PSNR of ember bf16 vs ember fp32 (decoded image): {q:.1f} dB."
                if "ember fp32" in res
                else ""
            ),
            "",
        ]
        sections += rows

    if "small" in cases:
        base = {"model": small, "size": 64, "steps": 20}
        runs = {
            "fp32": {**base, "worker": "ember", "dtype": "fp32", "save": tmp / "small-fp32.pt"},
            "bf16": {**base, "worker": "ember", "dtype": "bf16", "save": tmp / "small-bf16.pt"},
            "fp32 batch 8": {**base, "worker": "ember", "dtype": "fp32", "batch": 8},
            "bf16 batch 8": {**base, "worker": "ember", "dtype": "bf16", "batch": 8},
            "cold fp32": {**base, "worker": "cold", "dtype": "fp32", "save": tmp / "cold.png"},
            "cold bf16": {**base, "worker": "cold", "dtype": "bf16", "save": tmp / "cold.png"},
        }
        common_small = [*common[:2], "--images", str(max(3, a.images))]
        res = interleave(runs, a.rounds, common_small)
        import torch

        q = psnr(torch.load(tmp / "small-fp32.pt"), torch.load(tmp / "small-bf16.pt"))
        sections += [
            "## ember default model (ember-small architecture), 64x64, 20 steps DPM++ 2M, cfg 7",
            "",
            "| dtype | U-Net pass (ms) | image, warm (s) | images/s at batch 8 | cold start to PNG (s) | peak RSS (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]  # fmt: skip
        for d in ("fp32", "bf16"):
            r, r8 = res[d], res[f"{d} batch 8"]
            unet_time[f"small ember {d}"] = med(r["unet"])
            sections.append(
                f"| {d} | {1000 * med(r['unet']):.1f} | {med(r['image']):.3f} | "
                f"{8 / med(r8['image']):.1f} | {med(res[f'cold {d}']['cold']):.2f} | "
                f"{med(r['peak_rss_mb']):.0f} |"
            )
        sections += [
            "",
            f"PSNR of bf16 vs fp32 (decoded image): {q:.1f} dB. Cold start = `python -m ember.cli "
            "generate PROMPT --model FILE -q -o OUT.png` from process start to exit, PNG written.",
            "",
        ]

    if "roofline" in cases:
        models, sizes = ["sd15", "sd15", "ember-small"], [256, 512, 64]
        r = spawn(common, worker="flops", flop_models=models, flop_sizes=sizes)
        peak = r["peak"]
        sections += [
            "## Roofline",
            "",
            f"Measured dense peak (best of a 2048^3 matmul and a 2048->2048 1x1 conv, "
            f"{a.threads} threads): fp32 "
            f"{peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s.",
            "",
            "| model | FLOPs per U-Net pass (cond+uncond) | FLOPs per VAE decode | ember U-Net pass | fraction of peak |",
            "| --- | ---: | ---: | --- | --- |",
        ]  # fmt: skip
        for key, f in r.items():
            if "@" not in key:  # the peaks and the worker's own RSS
                continue
            name, size = key.split("@")
            case = {"256": "sd15-256", "512": "sd15-512"}.get(size, "small")
            times, fracs = [], []
            for d in ("fp32", "bf16"):
                t = unet_time.get(f"{case} ember {d}")
                if t:
                    times.append(f"{d} {t:.3f} s")
                    fracs.append(f"{d} {f['unet'] / t / peak[d]:.0%}")
            sections.append(
                f"| {name} {size}x{size} | {f['unet'] / 1e9:.1f} G | {f['vae'] / 1e9:.1f} G | "
                f"{', '.join(times) or 'see above'} | {', '.join(fracs) or '-'} |"
            )
        sections.append("")

    sections.append(f"Total benchmark time: {(time.time() - started) / 60:.1f} min.")
    write_report("\n".join(sections) + "\n", a.out)


if __name__ == "__main__":
    main()
