"""What the benchmarks share: the machine line, the random SD 1.5 weights, the `ember generate`
command they time, one U-Net pass's inputs and FLOPs, a worker's peak RSS, launching workers,
OpenVINO's side (its venv, its export, its pipeline) and writing a markdown report.

Imported by sibling scripts (`python bench/X.py` puts bench/ on sys.path); torch is imported
lazily so that a driver process stays small, and nothing here imports ember at module level, so
that the OpenVINO venv (which has no ember) imports it too. `python bench/common.py ov-export`
is the OpenVINO export's worker, run in that venv.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def native_bf16() -> bool:
    """ember's `--dtype auto` rule (ember.device.native_bf16), readable without importing ember."""
    flags = set(cpu_info().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux keeps `ru_maxrss` across fork + exec, so a child of a big
    parent would report the parent's size; `VmHWM` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sd15_folder(cache: Path) -> Path:
    """A diffusers folder of the SD 1.5 architecture with random weights (every side loads it)."""
    folder = cache / "sd15-random"
    if not (folder / "model_index.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_diffusers_folder

        print("bench: building a random-weight SD 1.5 folder (once)", file=sys.stderr)
        build_diffusers_folder(folder, "sd15")
    return folder


def no_embeddings(cache: Path) -> Path:
    """An empty embeddings folder, so that ember loads none of the user's (no peer would)."""
    folder = cache / "no-embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def machine(*, with_malloc: bool = True) -> str:
    """CPU model, cores, the ISA flags that decide ember's dtype, RAM, versions, the malloc the
    workers run under and the load."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    # a virtual machine often names only the vendor ("Intel(R) Xeon(R) Processor"): the family and
    # model numbers still tell the generation
    cpu = (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, "
           f"model {info.get('model', '?')})")  # fmt: skip
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores ({' '.join(isa)}), {mem:.0f} GiB RAM; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        + (f"{malloc()} for ember and diffusers, " if with_malloc else "")
        + f"load average at start {os.getloadavg()[0]:.1f}"
    )


def malloc() -> str:
    """The malloc ember's and diffusers' workers and `ember generate` run under, as the `ember`
    command picks it: tcmalloc where it is installed, unless EMBER_TCMALLOC=0
    (src/ember/process.py)."""
    from ember.process import env_on, find_tcmalloc

    lib = find_tcmalloc()
    return f"malloc {lib}" if lib and env_on("EMBER_TCMALLOC") else "glibc malloc"


def generate_command(prompt: str, model: str, out: str | Path, *, dtype: str = "auto",
                     steps: int | None = None, **options) -> list[str]:  # fmt: skip
    """`python -m ember.cli generate ...`: what a user's first image runs, cold start included.
    `options` are more flags (`size="512x512"` -> `--size 512x512`; None leaves one out)."""
    cmd = [sys.executable, "-m", "ember.cli", "generate", prompt, "--model", str(model),
           "--dtype", dtype, "-q", "-o", str(out)]  # fmt: skip
    for k, v in {"steps": steps, **options}.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def timed_generate(
    cmd: list[str], out: Path, threads: int, extra_env: dict[str, str] | None = None
) -> dict:
    """Run an `ember generate` command from process start to exit (the PNG written) with
    `threads` threads: its seconds ("first") and the child's peak RSS as the kernel counts it
    (`ru_maxrss`, which can include the parent's size at the fork)."""
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    env = {**threads_env(threads), **(extra_env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or not out.exists():
        raise RuntimeError(f"ember generate failed ({proc.returncode}): {' '.join(cmd)}")
    return {"first": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024}


def threads_env(threads: int) -> dict[str, str]:
    """The environment for a CLI child limited to `threads` OpenMP threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": _pythonpath()}


def _pythonpath(*first: Path) -> str:
    """A child's PYTHONPATH: `first`, then this checkout's src/ (so that a benchmark measures the
    ember beside it, also from a git worktree whose venv installed another), then the caller's."""
    parts = [*map(str, first), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def unet_inputs(cfg, size: int, dtype=None):
    """(x, t, context) of one U-Net pass on a cond+uncond batch of 2, as sampling with cfg runs it."""
    import torch

    h = size // cfg.vae.downsample
    x = torch.randn(2, cfg.unet.in_channels, h, h, dtype=dtype)  # (2, C, h, h)
    length = 77 if cfg.text.kind == "clip" else cfg.text.max_length
    ctx = torch.randn(2, length, cfg.unet.context_dim, dtype=dtype)  # (2, L, D)
    return x, torch.full((2,), 500.0, dtype=dtype), ctx


DENSE_OPS = ("convolution", "mm", "addmm")  # the layers' weights; the rest is attention's products


def count_flops(cfg, size: int) -> dict[str, int]:
    """FLOPs of one U-Net pass on a cond+uncond batch (all, and "unet_dense": its convolutions and
    linear layers, without attention's query-key and value products) and one VAE decode, counted
    on the meta device (shapes only: no weights, no arithmetic, and the plain conv path the
    counter knows)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ember.models.unet import UNetModel
    from ember.models.vae import AutoencoderKL

    with torch.device("meta"), torch.no_grad():
        unet, vae = UNetModel(cfg.unet), AutoencoderKL(cfg.vae)
        x, t, ctx = unet_inputs(cfg, size)
        with FlopCounterMode(display=False) as fc:
            unet(x, t, ctx)
        unet_flops = fc.get_total_flops()
        by_op = fc.get_flop_counts()["Global"]
        dense = sum(n for op, n in by_op.items() if str(op).split(".")[-1] in DENSE_OPS)
        with FlopCounterMode(display=False) as fc:
            vae.decode(x[:1, : cfg.vae.embed_dim])
        return {"unet": unet_flops, "unet_dense": dense, "vae": fc.get_total_flops()}


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes: `VmRSS`, or `VmHWM`, the peak RSS of this process's
    own address space (`ru_maxrss` is carried across fork + exec, so a worker started by a large
    parent would report the parent's size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_report(text: str, out: Path | None) -> None:
    """Write the markdown to `out` (and name it), or print it."""
    if out:
        out.write_text(text)
        print(out)
    else:
        print(text)


def spawn_worker(
    python: str, script: str, *lead: str, extra_env: dict[str, str] | None = None, **kw
) -> dict:
    """Run `script` under `python` as a worker (`--name value` per keyword; True is a bare flag,
    a list several values, None and False nothing) with bench/ on its path; the JSON object on
    the last line of its stdout. Workers in ember's venv (ember's and diffusers') get the malloc
    the `ember` command would use (`malloc()`; `extra_env` can set EMBER_TCMALLOC=0); the
    OpenVINO venv's keep glibc's: OpenVINO aborts under a preloaded tcmalloc (`munmap_chunk():
    invalid pointer`, a pointer freed by the other malloc)."""
    from ember.process import preload_env

    cmd = [python, script, *lead]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        if v is True:
            cmd.append(flag)
        elif isinstance(v, list):
            cmd += [flag, *map(str, v)]
        elif v is not None and v is not False:
            cmd += [flag, str(v)]
    env = {**os.environ, **(extra_env or {})}
    if python == sys.executable:
        env = preload_env(env)
    env["PYTHONPATH"] = _pythonpath(ROOT / "bench")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"worker failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replace_block(path: Path, name: str, text: str, *, append: bool = False) -> None:
    """Put `text` between the marker comments `<!-- name -->` and `<!-- /name -->` in `path`,
    leaving the rest of the file as it is. Without the markers: add them and `text` at the end
    where `append`, else stop with an error that says which markers to add."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    i, j = old.find(start), old.find(end)
    if i >= 0 and j > i:
        new = old[:i] + block + old[j + len(end) :]
    elif append:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + block + "\n"
    else:
        raise SystemExit(f"{path} has no '{start}' ... '{end}' markers to write between")
    path.write_text(new)


# ---------------------------------------------------------------------------------------------
# OpenVINO through optimum-intel, in its own venv (never one of ember's dependencies)

# Marks an export folder as complete; holds the export's seconds and machine once they are known.
# (fewstep.py named it first; the name stays so that exports made then are found.)
OV_DONE = ".fewstep-export-done"


def ov_python(cache: Path) -> Path:
    """The OpenVINO venv's python, made on first use with pip. torch is installed first and named
    again with the rest so that pip keeps the CPU wheel; optimum-intel goes in without its deps
    because it requires torchvision, which would pull a CUDA torch and is not needed here."""
    venv = cache / "ov-venv"
    py = venv / "bin" / "python"
    if py.exists():
        return py
    tmp = cache / "ov-venv.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print("bench: making the OpenVINO venv (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_pin = "torch==" + _torch_version().split("+")[0]
    subprocess.run([*pip, torch_pin], check=True)
    subprocess.run([*pip, "--no-deps", "optimum-intel"], check=True)
    deps = ["optimum~=2.3.0", "transformers>=4.51,<5.6", "huggingface-hub>=0.23.2,<1.22",
            "nncf>=3.3.0", "openvino>=2026.0", "openvino-tokenizers>=2026.0", "requests>=2.33,<3",
            "setuptools", "diffusers", torch_pin]  # fmt: skip
    subprocess.run([*pip, *deps], check=True)
    tmp.rename(venv)  # a venv's scripts name their folder; python -m pip still works after it
    return py


def _torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def ov_export_once(python: Path, src: Path, out: Path, *, taesd: str | None = None,
                   base: Path | None = None, again: bool = False) -> dict:  # fmt: skip
    """Export the diffusers folder `src` to OpenVINO IR in `out`, unless done before (or `again`),
    through `python bench/common.py ov-export` in the OpenVINO venv; `base`: an export of the
    same folder whose files `out` starts from (hard links), for a copy with TAESD as its VAE
    decoder. -> the export's record (`ov_export_record`)."""
    if (out / OV_DONE).exists() and not again:
        return ov_export_record(out)
    print(f"bench: exporting {src.name} to OpenVINO", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if base is not None:
        skip = shutil.ignore_patterns("model_cache", "vae_encoder", OV_DONE)
        shutil.copytree(base, out, ignore=skip, copy_function=os.link)
    t = time.perf_counter()
    spawn_worker(str(python), __file__, "ov-export", model=src, save=out, taesd=taesd)
    seconds = time.perf_counter() - t
    record = {"seconds": round(seconds, 1), "cpu": cpu_info().get("model name", "?"),
              "made": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()[0]}  # fmt: skip
    (out / OV_DONE).write_text(json.dumps(record))
    print(f"bench: exported in {seconds:.0f} s", file=sys.stderr)
    return record


def ov_export_record(out: Path) -> dict:
    """What `ov_export_once` recorded: seconds (process start to exit), cpu, made, load_average;
    {} for an export made before records were kept."""
    try:
        return json.loads((out / OV_DONE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def ov_export(model: str, out: str, taesd: str | None = None) -> None:
    """(OpenVINO venv) Export a diffusers folder to OpenVINO IR; with `taesd`, make its VAE decoder
    TAESD, converted here (optimum-intel exports only AutoencoderKL)."""
    out = Path(out)
    if not (out / "model_index.json").exists():
        from optimum.intel import OVStableDiffusionPipeline

        pipe = OVStableDiffusionPipeline.from_pretrained(model, export=True, compile=False,
                                                         load_in_8bit=False)  # fmt: skip
        pipe.save_pretrained(out)
    if taesd:
        import diffusers
        import openvino as ov
        import torch

        class Decode(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.taesd = diffusers.AutoencoderTiny.from_pretrained(taesd)

            def forward(self, latent_sample):
                return self.taesd.decode(latent_sample).sample  # [-1, 1], as AutoencoderKL's

        dec = out / "vae_decoder"
        with torch.no_grad():
            module = Decode().eval().requires_grad_(False)
            m = ov.convert_model(module, example_input=torch.randn(1, 4, 64, 64))
        m.outputs[0].get_tensor().set_names({"sample"})
        config = json.loads((dec / "config.json").read_text())
        config["scaling_factor"] = 1.0  # TAESD decodes the unscaled latents
        shutil.rmtree(dec)  # its files may be hard links to the base export's: unlink, not write
        dec.mkdir()
        ov.save_model(m, dec / "openvino_model.xml", compress_to_fp16=False)
        (dec / "config.json").write_text(json.dumps(config, indent=2))
        shutil.rmtree(out / "vae_encoder", ignore_errors=True)  # unused by txt2img
        shutil.rmtree(out / "model_cache", ignore_errors=True)


def ov_cache_dir(folder: str | Path) -> Path:
    """Where OpenVINO keeps the compiled graphs of an export (its `CACHE_DIR`)."""
    return Path(folder) / "model_cache"


def ov_pipeline(folder: str | Path, threads: int, size: int, *, cond_only: bool = False):
    """(OpenVINO venv) optimum-intel's pipeline for an exported folder with static shapes: one
    size x size image, the U-Net on a cond+uncond batch of 2 (1 with `cond_only`, for cfg 1), bf16
    inference precision where the CPU has native bf16, else f32; compiled with `ov_cache_dir`.
    -> (pipeline, seconds of the compile)."""
    from optimum.intel import OVStableDiffusionPipeline

    config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if native_bf16() else "f32",
              "CACHE_DIR": str(ov_cache_dir(folder))}  # fmt: skip
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, ov_config=config, compile=False)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    if cond_only:  # reshape() assumes a cond+uncond U-Net batch
        shapes = {}
        for inp in pipe.unet.model.inputs:
            shapes[inp] = inp.get_partial_shape()
            if inp.get_any_name() != "timestep":
                shapes[inp][0] = 1
        pipe.unet.model.reshape(shapes)
    t = time.perf_counter()
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - t


if __name__ == "__main__":  # the OpenVINO export's worker: python bench/common.py ov-export ...
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("job", choices=["ov-export"])
    p.add_argument("--model", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--taesd")
    a = p.parse_args()
    ov_export(a.model, a.save, a.taesd)
    print("{}")
