"""SDXL on the CPU: ember against diffusers on the SDXL 1.0 base architecture with random weights.

    .venv/bin/python bench/sdxl_speed.py [--recipes turbo1,dpm20] [--threads 2] [--out FILE]

Two recipes, the same work on both sides (one image, batch 1):
  turbo1  512x512, 1 step Euler, trailing timestep spacing, cfg 1, a TAESD-shaped tiny VAE (the
          SDXL-Turbo recipe; TAESDXL has TAESD's architecture, and these weights are random anyway)
  dpm20   1024x1024, DPM++ 2M, cfg 7, SDXL's full VAE (the usual SDXL image; `--steps-dpm`
          shrinks it on a slow machine: the report says how many steps ran)

"generate" is one image with the model loaded and warm (after one image in the same process):
ember through `GenerationService`, diffusers through `StableDiffusionXLPipeline` in its fastest
CPU set-up (bf16 weights where the CPU has native bf16, else fp32; channels-last U-Net and VAE;
`torch.inference_mode`). Each image is also split into its stages (text encoders, U-Net calls,
VAE decode, the rest), timed around the same calls on both sides (`fewstep.StageClock`). Peak RSS
is each worker process's own, loading included. The sides run in their own processes, interleaved
round by round. The random weights (a diffusers folder, bf16, about 7 GB) are made once into
--cache. OpenVINO is not part of this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import machine, native_bf16, no_embeddings, peak_rss_mb, spawn_worker, write_report
from fewstep import STAGES, StageClock, _timed, med, taesd_folder

PROMPT = "a photograph of an astronaut riding a horse"
RECIPES = {
    "turbo1": {"title": "512x512, 1 step Euler, trailing, cfg 1, tiny VAE (SDXL-Turbo recipe)",
               "size": 512, "sampler": "euler", "steps": 1, "cfg": 1.0, "spacing": "trailing",
               "taesd": True},
    "dpm20": {"title": "1024x1024, DPM++ 2M, cfg 7, full VAE", "size": 1024,
              "sampler": "dpmpp_2m", "steps": 20, "cfg": 7.0, "spacing": None, "taesd": False},
}  # fmt: skip


def sdxl_folder(cache: Path) -> Path:
    """A diffusers folder of the SDXL 1.0 base architecture (ember's `sdxl` preset, which matches
    SDXL's published configs), random bf16 weights, built and saved by diffusers."""
    folder = cache / "sdxl-random"
    if (folder / "model_index.json").exists():
        return folder
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ember import keymaps
    from ember.config import get_preset
    from ember.models.text import text_config_to_hf
    from ember.models.tokenizer import build_tokenizer

    print("bench: building a random-weight SDXL folder (once)", file=sys.stderr, flush=True)
    cfg = get_preset("sdxl")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 2.6B + 0.8B parameters: build them in bf16
    unet_conf = keymaps.unet_config_to_diffusers(cfg.unet)
    unet_conf["sample_size"] = cfg.size // cfg.vae.downsample
    unet_conf.pop("_class_name", None)
    vae_conf = keymaps.vae_config_to_diffusers(cfg.vae)
    vae_conf.pop("_class_name", None)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**vae_conf),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config_to_hf(cfg.text))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config_to_hf(cfg.text_2))),
        tokenizer=build_tokenizer(cfg.text).to_transformers(),
        tokenizer_2=build_tokenizer(cfg.text_2).to_transformers(),
        unet=diffusers.UNet2DConditionModel(**unet_conf),
        scheduler=diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading"),
    )  # fmt: skip
    torch.set_default_dtype(torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------
# workers: one measurement per process, JSON on the last stdout line


def worker_ember(a: argparse.Namespace) -> dict:
    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams

    r = RECIPES[a.recipe]
    t = time.perf_counter()
    service = GenerationService("auto", embeddings_dir=Path(a.embeddings))
    service.load(a.model, vae=a.taesd if r["taesd"] else None)
    load = time.perf_counter() - t
    params = GenerationParams(
        prompt=PROMPT, sampler=r["sampler"], steps=a.steps, cfg=r["cfg"], seed=0,
        timestep_spacing=r["spacing"], width=r["size"], height=r["size"],
    )  # fmt: skip
    service.generate([Request(params)])
    loaded, vae = service._loaded, service._vae
    import ember.conditioning  # the pipeline looks its SDXL text encoding up here at each call

    clock = StageClock([("text", ember.conditioning, "encode_sdxl_prompts"),
                        ("unet", loaded.model.model.diffusion_model, "forward"),
                        ("vae", vae.module if vae else loaded.model.first_stage_model, "decode")])  # fmt: skip
    return {"load": load, **_timed(a.images, lambda: service.generate([Request(params)]), clock)}


def worker_diffusers(a: argparse.Namespace) -> dict:
    import diffusers
    import torch

    r = RECIPES[a.recipe]
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    t = time.perf_counter()
    extra = {"vae": diffusers.AutoencoderTiny.from_pretrained(a.taesd, torch_dtype=dtype)}
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        a.model, torch_dtype=dtype, **(extra if r["taesd"] else {})
    )
    config = pipe.scheduler.config
    if r["sampler"] == "dpmpp_2m":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    else:
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
            config, timestep_spacing=r["spacing"]
        )
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t

    def run():
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=r["cfg"],
                    height=r["size"], width=r["size"], generator=gen).images[0]  # fmt: skip

    with torch.inference_mode():
        run()
        clock = StageClock([("text", pipe.text_encoder, "forward"),
                            ("text", pipe.text_encoder_2, "forward"),
                            ("unet", pipe.unet, "forward"), ("vae", pipe.vae, "decode")])  # fmt: skip
        return {"load": load, **_timed(a.images, run, clock)}


WORKERS = {"ember": worker_ember, "diffusers": worker_diffusers}


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = WORKERS[a.worker](a)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the markdown table here (else stdout)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    p.add_argument("--recipes", default="turbo1,dpm20", help="comma list of turbo1, dpm20")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--images", type=int, default=2, help="timed warm images per process, turbo1")
    p.add_argument("--steps-dpm", type=int, default=20, help="steps of dpm20 (default 20)")
    p.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    for name in ("worker", "recipe", "model", "taesd", "embeddings"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        run_worker(a)
        return
    recipes = a.recipes.split(",")
    if set(recipes) - set(RECIPES):
        p.error(f"unknown recipes {sorted(set(recipes) - set(RECIPES))}: choose from turbo1, dpm20")
    a.cache.mkdir(parents=True, exist_ok=True)
    started, machine_line = time.time(), machine()
    model, taesd = sdxl_folder(a.cache), taesd_folder(a.cache)
    empty = no_embeddings(a.cache)
    dtype = "bf16" if native_bf16() else "fp32"
    lines = [
        "# SDXL on the CPU: ember and diffusers",
        "",
        f"Machine: {machine_line}.",
        f"Command: `.venv/bin/python bench/sdxl_speed.py {' '.join(sys.argv[1:])}` ({a.threads} "
        f"threads on both sides; SDXL 1.0 base architecture, random weights, one image; {dtype} "
        "weights on both sides; medians over interleaved rounds).",
        "",
    ]
    for name in recipes:
        r = RECIPES[name]
        steps = a.steps_dpm if name == "dpm20" else r["steps"]
        images = 1 if name == "dpm20" else a.images
        res: dict[str, dict[str, list[float]]] = {}
        for rnd in range(a.rounds):
            for side in WORKERS:
                print(f"bench: {name} round {rnd + 1}/{a.rounds}: {side}", file=sys.stderr,
                      flush=True)  # fmt: skip
                out = spawn_worker(sys.executable, __file__, worker=side, recipe=name, model=model, taesd=taesd, embeddings=empty,
                            threads=a.threads, images=images, steps=steps)  # fmt: skip
                for k, v in out.items():
                    res.setdefault(side, {}).setdefault(k, []).extend(
                        v if isinstance(v, list) else [v])  # fmt: skip
        lines += report(name, r, steps, res, a.rounds, images)
    lines.append(f"Total benchmark time: {(time.time() - started) / 60:.1f} min.")
    write_report("\n".join(lines) + "\n", a.out)


def report(name: str, r: dict, steps: int, res: dict, rounds: int, images: int) -> list[str]:
    e = med(res["ember"]["image"])
    rows = [
        f"## {name}: {r['title']}" + (f" ({steps} steps)" if name == "dpm20" else ""),
        "",
        f"{rounds} rounds; generate = median of {images} warm image(s) per process. Ratio: "
        "diffusers' time / ember's (above 1: ember faster).",
        "",
        "| side | generate, warm (s) | load (s) | peak RSS (MiB) | text (s) | U-Net (s) "
        "| U-Net calls | per call (s) | VAE decode (s) | rest (s) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, x in res.items():
        rest = [
            i - sum(parts) for i, *parts in zip(x["image"], *(x[s] for s in STAGES), strict=True)
        ]
        unet, calls = med(x["unet"]), med(x["unet_calls"])
        rows.append(
            f"| {side} | {med(x['image']):.2f} | {med(x['load']):.1f} | "
            f"{med(x['peak_rss_mb']):.0f} | {med(x['text']):.3f} | {unet:.2f} | {calls:.0f} | "
            f"{unet / calls:.3f} | {med(x['vae']):.2f} | {med(rest):.3f} | "
            f"{med(x['image']) / e:.2f}x |"
        )
    return [*rows, ""]


if __name__ == "__main__":
    main()
