"""Few-step recipes on the CPU: ember against diffusers (and, with --openvino, OpenVINO through
optimum-intel) on the SD 1.5 architecture with random weights, 512x512, one image.

    .venv/bin/python bench/fewstep.py [--openvino] [--threads 2] [--out bench/fewstep.md]

Three recipes, the same work on every side:
  dpm20   20 steps DPM++ 2M, cfg 7, the full VAE (the usual SD 1.5 image)
  lcm4    LCM, 4 steps, cfg 1, an LCM-LoRA-shaped LoRA (random kohya LoRA, rank 64, on the U-Net's
          attention and feed-forward layers) merged, TAESD as the VAE
  turbo1  1 step Euler, trailing timestep spacing, cfg 1, TAESD (the SD-Turbo recipe)

Two times per side. "generate" is one image with the model loaded and warm (after one image in the
same process): ember through `GenerationService`, diffusers through `StableDiffusionPipeline` in
its fastest CPU set-up (bf16 weights where the CPU has native bf16, else fp32; channels-last U-Net
and VAE; `torch.inference_mode`), OpenVINO through `OVStableDiffusionPipeline` (static shapes,
bf16 inference precision where the CPU has native bf16). "whole process" is process start to the
PNG written: `ember generate ...` for ember, the same script's first image for the peers. Each
recipe's second table splits the warm image into its stages (text encoder, U-Net calls, VAE
decode, the rest), timed around the same calls on every side, to show where a gap lies.

Every measurement runs in its own process and the sides are interleaved round by round. Weights,
TAESD, the LoRA and the OpenVINO exports are made once into --cache. OpenVINO lives in its own venv
(--cache/ov-venv, made with pip by `common.ov_python`, which `speed.py --openvino` shares: torch
first, so that the CPU wheel is kept, and optimum-intel without torchvision, which it lists but
this pipeline does not use). Its exports are made once: for lcm4 from a diffusers folder with the
LoRA fused in (it cannot merge a LoRA itself), and for the TAESD recipes with the exported VAE
decoder replaced by TAESD converted with `openvino.convert_model` (optimum-intel exports only
AutoencoderKL). Its compile cache is warmed before the timed rounds, as a user's second run would
find it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    generate_command,
    machine,
    native_bf16,
    no_embeddings,
    ov_export_once,
    ov_pipeline,
    ov_python,
    peak_rss_mb,
    sd15_folder,
    spawn_worker,
    timed_generate,
    write_report,
)

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 512


@dataclass(frozen=True)
class Recipe:
    title: str
    sampler: str  # ember's name
    steps: int
    cfg: float
    spacing: str | None = None  # timestep spacing, None = the sampler's customary one
    taesd: bool = False
    lora: bool = False


RECIPES = {
    "dpm20": Recipe("20 steps DPM++ 2M, cfg 7, full VAE", "dpmpp_2m", 20, 7.0),
    "lcm4": Recipe("LCM 4 steps, cfg 1, LCM-LoRA-shaped LoRA (rank 64) merged, TAESD", "lcm", 4,
                   1.0, taesd=True, lora=True),
    "turbo1": Recipe("1 step Euler, trailing spacing, cfg 1, TAESD (SD-Turbo recipe)", "euler", 1,
                     1.0, spacing="trailing", taesd=True),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# files made once into --cache


def taesd_folder(cache: Path) -> Path:
    """A diffusers `AutoencoderTiny` with random weights (its default config is TAESD's)."""
    folder = cache / "taesd-random"
    if not (folder / "config.json").exists():
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.AutoencoderTiny().save_pretrained(folder)
    return folder


def lcm_lora_file(cache: Path, sd15: Path) -> Path:
    """A kohya LoRA of rank 64 on the U-Net's attention and feed-forward layers only, the shape of
    LCM-LoRA for SD 1.5 (the text-encoder part of `kohya_lora` is dropped)."""
    out = cache / "lcm-lora-shaped-r64.safetensors"
    if not out.exists():
        from lora_merge import kohya_lora
        from safetensors.torch import load_file, save_file

        full = kohya_lora(sd15, 64, cache / "lora-r64-unet-te.safetensors", seed=3)
        tensors = {k: v for k, v in load_file(full).items() if k.startswith("lora_unet_")}
        save_file(tensors, str(out))
        full.unlink()
    return out


def fused_folder(cache: Path, sd15: Path, lora: Path) -> Path:
    """The SD 1.5 folder with the LoRA fused into its U-Net (fp32), for OpenVINO's export."""
    folder = cache / "sd15-random-lcm-lora-fused"
    if not (folder / "model_index.json").exists():
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd15)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(folder)
    return folder


def prepare(a: argparse.Namespace, recipes: list[str]) -> dict[str, str]:
    """Every file the recipes need, made once; OpenVINO's exports through its venv."""
    sd15 = sd15_folder(a.cache)
    files = {"sd15": str(sd15), "taesd": str(taesd_folder(a.cache)),
             "lora": str(lcm_lora_file(a.cache, sd15)),
             "embeddings": str(no_embeddings(a.cache))}  # fmt: skip
    if not a.openvino:
        return files
    files["ov_python"] = str(ov_python(a.cache))
    base = a.cache / "ov-sd15-random"
    jobs = {"dpm20": (sd15, base, False)}
    if "turbo1" in recipes:
        jobs["turbo1"] = (sd15, a.cache / "ov-sd15-random-taesd", True)
    if "lcm4" in recipes:
        fused = fused_folder(a.cache, sd15, Path(files["lora"]))
        jobs["lcm4"] = (fused, a.cache / "ov-sd15-random-lcm-lora-fused-taesd", True)
    for name, (src, out, taesd) in jobs.items():  # dpm20's (the base) first
        files[f"ov_{name}"] = str(out)
        ov_export_once(files["ov_python"], src, out, taesd=files["taesd"] if taesd else None,
                       base=base if taesd and src == sd15 else None)  # fmt: skip
    for name in recipes:  # OpenVINO's compile cache, as a user's second run finds it
        spawn(files["ov_python"], worker="openvino", recipe=name, model=files[f"ov_{name}"],
              threads=a.threads, images=-1)  # fmt: skip
    return files


# ---------------------------------------------------------------------------------------------
# workers: one measurement per process, JSON on the last stdout line


def _since_start(a: argparse.Namespace) -> float:
    return time.time() - a.t0


def worker_ember(a: argparse.Namespace) -> dict:
    """In-process through `GenerationService`: load, one image (LoRA merged there), timed images."""
    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams, LoraChoice

    r = RECIPES[a.recipe]
    t = time.perf_counter()
    service = GenerationService("auto", embeddings_dir=Path(a.embeddings))
    service.load(a.model, vae=a.taesd if r.taesd else None)
    load = time.perf_counter() - t
    params = GenerationParams(
        prompt=PROMPT, sampler=r.sampler, steps=r.steps, cfg=r.cfg, timestep_spacing=r.spacing,
        width=SIZE, height=SIZE, seed=0, loras=(LoraChoice(a.lora),) if r.lora else (),
    )  # fmt: skip
    service.generate([Request(params)])
    first = _since_start(a)
    loaded, vae = service._loaded, service._vae
    clock = StageClock([("text", loaded.model.cond_stage_model, "forward"),
                        ("unet", loaded.model.model.diffusion_model, "forward"),
                        ("vae", vae.module if vae else loaded.model.first_stage_model, "decode")])  # fmt: skip
    return {"load": load, "first": first,
            **_timed(a.images, lambda: service.generate([Request(params)]), clock)}  # fmt: skip


STAGES = ("text", "unet", "vae")


class StageClock:
    """Seconds spent in each stage's calls (text encoder, U-Net, VAE decode) on any side: each
    stage's callable is replaced on its instance by a timed wrapper."""

    def __init__(self, parts: list[tuple[str, object, str]]):
        """`parts`: (stage, object, method name); several objects may share a stage."""
        self.spent = dict.fromkeys(STAGES, 0.0)
        self.unet_calls = 0
        for stage, obj, attr in parts:
            setattr(obj, attr, self._wrap(stage, getattr(obj, attr)))

    def _wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.spent[stage] += time.perf_counter() - t
            self.unet_calls += stage == "unet"
            return out

        return timed


def _timed(n: int, fn, clock: StageClock) -> dict:
    """`n` timed calls of `fn`: the wall time of each and the seconds in each stage."""
    out = {"image": [], "unet_calls": [], **{s: [] for s in STAGES}}
    for _ in range(n):
        clock.spent, clock.unet_calls = dict.fromkeys(STAGES, 0.0), 0
        t = time.perf_counter()
        fn()
        out["image"].append(time.perf_counter() - t)
        out["unet_calls"].append(clock.unet_calls)
        for stage in STAGES:
            out[stage].append(clock.spent[stage])
    return out


def _schedulers(diffusers, r: Recipe, config):
    if r.sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config)
    if r.sampler == "lcm":
        return diffusers.LCMScheduler.from_config(config)
    return diffusers.EulerDiscreteScheduler.from_config(config, timestep_spacing=r.spacing)


def _run_peer(a: argparse.Namespace, pipe, r: Recipe, load: float, vae) -> dict:
    """Load, one image saved, then the timed images; `vae` is the object whose `decode` (or
    OpenVINO's `forward`) is the VAE decode stage."""
    import torch

    def run():
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPT, num_inference_steps=r.steps, guidance_scale=r.cfg, height=SIZE,
                    width=SIZE, generator=gen).images[0]  # fmt: skip

    with torch.inference_mode():
        run().save(a.save)
        first = _since_start(a)
        vae_call = "decode" if hasattr(vae, "decode") else "forward"
        clock = StageClock([("text", pipe.text_encoder, "forward"), ("unet", pipe.unet, "forward"),
                            ("vae", vae, vae_call)])  # fmt: skip
        return {"load": load, "first": first, **_timed(a.images, run, clock)}


def worker_diffusers(a: argparse.Namespace) -> dict:
    import diffusers
    import torch

    r = RECIPES[a.recipe]
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    t = time.perf_counter()
    extra = {"vae": diffusers.AutoencoderTiny.from_pretrained(a.taesd, torch_dtype=dtype)}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        a.model, torch_dtype=dtype, **(extra if r.taesd else {})
    )
    if r.lora:
        pipe.load_lora_weights(a.lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.scheduler = _schedulers(diffusers, r, pipe.scheduler.config)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return _run_peer(a, pipe, r, time.perf_counter() - t, pipe.vae)


def worker_openvino(a: argparse.Namespace) -> dict:
    """(OpenVINO venv) The exported IR, static 512x512 batch 1, compiled with OpenVINO's cache."""
    import diffusers

    r = RECIPES[a.recipe]
    t = time.perf_counter()
    pipe, _ = ov_pipeline(a.model, a.threads, SIZE, cond_only=r.cfg <= 1)  # cfg 1: cond half only
    pipe.scheduler = _schedulers(diffusers, r, pipe.scheduler.config)
    if a.images < 0:  # compile only: fills the cache
        return {}
    return _run_peer(a, pipe, r, time.perf_counter() - t, pipe.vae_decoder)


WORKERS = {
    "ember": worker_ember,
    "diffusers": worker_diffusers,
    "openvino": worker_openvino,
}


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = WORKERS[a.worker](a)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


def spawn(python: str, **kw) -> dict:
    """Run this file as a worker under `python`; its JSON result."""
    return spawn_worker(python, __file__, "--t0", repr(time.time()), **kw)


def run_cli(
    r: Recipe, files: dict[str, str], out: Path, threads: int, extra_env: dict | None = None
) -> dict:
    """`ember generate` from process start to exit (PNG written), and the child's peak RSS;
    `extra_env` on top of this process's environment (bench/malloc.py: EMBER_TCMALLOC)."""
    cmd = generate_command(
        PROMPT, files["sd15"], out, steps=r.steps, size=f"{SIZE}x{SIZE}", sampler=r.sampler,
        cfg=r.cfg, embeddings_dir=files["embeddings"], timestep_spacing=r.spacing,
        vae=files["taesd"] if r.taesd else None, lora=f"{files['lora']}:1" if r.lora else None,
    )  # fmt: skip
    return timed_generate(cmd, out, threads, extra_env)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the markdown table here (else stdout)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument(
        "--recipes", default="turbo1,lcm4,dpm20", help="comma list of " + ", ".join(RECIPES)
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, lcm4 and turbo1")
    p.add_argument("--rounds-dpm", type=int, default=2, help="interleaved rounds, dpm20")
    p.add_argument("--images", type=int, default=3, help="timed warm images per process (dpm20: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads on every side (default 2)")
    p.add_argument("--openvino", action="store_true", help="also OpenVINO (own venv, export once)")
    # worker arguments (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    for name in ("recipe", "model", "taesd", "lora", "embeddings", "save"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        run_worker(a)
        return
    recipes = a.recipes.split(",")
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        p.error(f"unknown recipes {sorted(unknown)}: choose from {', '.join(RECIPES)}")
    a.cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine_line = machine()
    files = prepare(a, recipes)
    tmp = a.cache / "out"
    tmp.mkdir(exist_ok=True)
    dtype = "bf16" if native_bf16() else "fp32"
    peers = ["diffusers", "openvino"] if a.openvino else ["diffusers"]
    sections = [
        "# Few-step recipes on the CPU: ember, diffusers" + (", OpenVINO" if a.openvino else ""),
        "",
        f"Machine: {machine_line}.",
        f"Command: `.venv/bin/python bench/fewstep.py {' '.join(sys.argv[1:])}` ({a.threads} "
        f"threads every side; SD 1.5 architecture, random weights, {SIZE}x{SIZE}, one image; "
        f"{dtype} weights or inference precision on every side; medians over interleaved rounds).",
        "",
    ]
    for name in recipes:
        r = RECIPES[name]
        rounds = a.rounds_dpm if name == "dpm20" else a.rounds
        images = 1 if name == "dpm20" else a.images
        common = {"recipe": name, "threads": a.threads, "images": images, "taesd": files["taesd"],
                  "lora": files["lora"]}  # fmt: skip
        pooled: dict[str, dict[str, list[float]]] = {}
        for rnd in range(rounds):
            for side in ["ember", *peers]:
                print(
                    f"bench: {name} round {rnd + 1}/{rounds}: {side}", file=sys.stderr, flush=True
                )
                if side == "ember":
                    res = {"cli": run_cli(r, files, tmp / "fewstep-cli.png", a.threads),
                           "ember": spawn(sys.executable, worker="ember", model=files["sd15"],
                                          embeddings=files["embeddings"], **common)}  # fmt: skip
                elif side == "diffusers":
                    res = {side: spawn(sys.executable, worker="diffusers", model=files["sd15"],
                                       save=tmp / "fewstep-diffusers.png", **common)}  # fmt: skip
                else:
                    res = {side: spawn(files["ov_python"], worker="openvino",
                                       model=files[f"ov_{name}"],
                                       save=tmp / "fewstep-openvino.png", **common)}  # fmt: skip
                for key, values in res.items():
                    for k, v in values.items():
                        pooled.setdefault(key, {}).setdefault(k, []).extend(
                            v if isinstance(v, list) else [v])  # fmt: skip
        sections += report(name, r, pooled, peers, rounds, images)
    sections.append(f"Total benchmark time: {(time.time() - started) / 60:.1f} min.")
    write_report("\n".join(sections) + "\n", a.out)


def report(
    name: str, r: Recipe, res: dict, peers: list[str], rounds: int, images: int
) -> list[str]:
    e_gen, e_whole = med(res["ember"]["image"]), med(res["cli"]["first"])
    rows = [
        f"## {name}: {r.title}",
        "",
        f"{rounds} rounds; generate = median of {images} warm image(s) per process. "
        "Ratios: peer time / ember time (above 1: ember faster).",
        "",
        "| side | generate, warm (s) | whole process to PNG (s) | load (s) | peak RSS (MiB) "
        "| generate ratio | whole-process ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| ember | {e_gen:.2f} | {e_whole:.2f} | {med(res['ember']['load']):.1f} | "
        f"{med(res['ember']['peak_rss_mb']):.0f} (CLI {med(res['cli']['peak_rss_mb']):.0f}) "
        "| 1.00x | 1.00x |",
        f"| ember in-process (first image, no PNG) | - | {med(res['ember']['first']):.2f} | - | - "
        "| - | - |",
    ]
    for peer in peers:
        g, w = med(res[peer]["image"]), med(res[peer]["first"])
        rows.append(
            f"| {peer} | {g:.2f} | {w:.2f} | {med(res[peer]['load']):.1f} | "
            f"{med(res[peer]['peak_rss_mb']):.0f} | {g / e_gen:.2f}x | {w / e_whole:.2f}x |"
        )
    rows += [
        "",
        "Where a warm image's time goes (medians of the same timed images; U-Net = all its calls "
        "in one image; rest = sampler, latents, casts and pixels outside the three models):",
        "",
        "| side | text encoder (s) | U-Net (s) | U-Net calls | per call (s) | VAE decode (s) "
        "| rest (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in ["ember", *peers]:
        x = res[side]
        rest = [
            i - sum(parts) for i, *parts in zip(x["image"], *(x[s] for s in STAGES), strict=True)
        ]
        unet, calls = med(x["unet"]), med(x["unet_calls"])
        rows.append(f"| {side} | {med(x['text']):.3f} | {unet:.3f} | {calls:.0f} | "
                    f"{unet / calls:.3f} | {med(x['vae']):.3f} | {med(rest):.3f} |")  # fmt: skip
    return [*rows, ""]


if __name__ == "__main__":
    main()
