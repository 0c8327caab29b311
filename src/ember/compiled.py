"""U-Nets compiled ahead of time (torch's AOTInductor), cached on disk, used where they are faster.

Eager PyTorch pays a dispatch per op. ember's bundled model runs ~500 small ops per U-Net pass at
64x64, so most of its time is overhead (docs/speed.md); a compiled graph fuses the elementwise ops
and calls oneDNN with prepacked weights (inductor's `freezing`). Compiling takes tens of seconds to
minutes and needs a C++ compiler, so it never happens inside `ember generate`: `ember compile`
builds a package once per model, weights (LoRAs merged into the U-Net count) and latent size, and
keeps it only where it measured faster than eager on this machine. `ember generate` and
`ember serve` then use it whenever one matches and nothing hooks into the U-Net; anything else
(no package, another size, layout guidance, a package that will not load) runs eagerly, as before.

A package is keyed by everything that makes it valid: the model's sha256, the merged LoRAs, the
dtype, the latent size, torch's version, the CPU's vector features and this module's `FORMAT`.
The batch and the prompt length are dynamic, so one package serves every batch of a server.
EMBER_COMPILED=0 turns the lookup off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.catalog import cache_dir
from ember.device import cpu_flags, dtype_name
from ember.errors import EmberError
from ember.files import atomic_path, write_atomic
from ember.models import prepack
from ember.process import env_on

FORMAT = 1  # bump when what a package holds or how it is called changes
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
MAX_BATCH = 256  # U-Net batch (cfg doubles the images): above the engine's batch limit
MAX_TOKENS = 77 * 32  # prompt length of the text context, in tokens


def packages_dir() -> Path:
    return cache_dir() / "compiled"


def enabled() -> bool:
    return env_on("EMBER_COMPILED")


@dataclass(frozen=True)
class PackageKey:
    """What a compiled U-Net is valid for; `name` is its file name in `packages_dir()`."""

    model_sha256: str
    adapters: tuple[str, ...]  # the LoRAs merged into the U-Net ("sha256:weight")
    dtype: str
    latent: tuple[int, int]  # (h, w)
    torch: str
    cpu: tuple[str, ...]

    @property
    def name(self) -> str:
        text = json.dumps([FORMAT, *self.__dict__.values()], sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def package_key(loaded, latent: tuple[int, int]) -> PackageKey:
    return PackageKey(
        loaded.sha256, tuple(loaded.unet_adapters), dtype_name(loaded.dtype),
        (int(latent[0]), int(latent[1])), torch.__version__,
        tuple(f for f in FEATURES if f in cpu_flags()),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# using packages


class CompiledUNet:
    """A loaded package: `net(x, t, context, y=None)` as `UNetModel.forward` for its latent size."""

    def __init__(self, key: PackageKey, runner: Callable) -> None:
        self.key = key
        self._run = runner
        self.calls = 0  # passes run: tells the image record which path made it

    def accepts(self, x: torch.Tensor, context: torch.Tensor) -> bool:
        return (
            tuple(x.shape[-2:]) == self.key.latent
            and x.shape[0] <= MAX_BATCH
            and context.shape[1] <= MAX_TOKENS
            and x.dtype == context.dtype
            and dtype_name(x.dtype) == self.key.dtype
        )

    def __call__(self, x, t, context, y=None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        args = [x, t, context] if y is None else [x, t, context, y]
        self.calls += 1
        return self._run(args)[0]


def load_package(path: Path):
    """The package's runner, `run([tensors]) -> [tensors]`, through torch's C++ loader directly:
    `torch._inductor.aoti_load_package` would import inductor (~1 s) into every `ember generate`."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    return loader.boxed_run


_loaded: dict[str, CompiledUNet | None] = {}
_lock = threading.Lock()


def find(loaded, latent: tuple[int, int]) -> CompiledUNet | None:
    """The compiled U-Net for `loaded`'s current weights at this latent size, or None (run
    eagerly). A package that exists but will not load says so once on stderr."""
    if not enabled() or loaded.model.model.diffusion_model.training:
        return None
    key = package_key(loaded, latent)
    path = packages_dir() / f"{key.name}.pt2"
    with _lock:
        if str(path) in _loaded:
            return _loaded[str(path)]
        if not path.exists():  # looked up again next time: `ember compile` may run meanwhile
            return None
        try:
            net = CompiledUNet(key, load_package(path))
        except Exception as exc:  # a package of another build, truncated, unreadable
            print(
                f"ember: notice: compiled U-Net {path} does not load ({first_line(exc)}); "
                "running eagerly (`ember compile --force` rebuilds it)",
                file=sys.stderr,
            )
            net = None
        _loaded[str(path)] = net
        return net


def hooked(unet: torch.nn.Module) -> bool:
    """Whether anything hooks into the U-Net's modules (layout guidance's attention hooks, an
    add-on's forward hooks): a compiled graph would silently skip them."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_weights_hooks", None)
        for m in unet.modules()
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def forget() -> None:
    """Drop the loaded packages (tests; a server that loads another model keeps them cheaply)."""
    with _lock:
        _loaded.clear()


# ---------------------------------------------------------------------------------------------
# building packages


def cxx_compiler() -> str:
    """The C++ compiler inductor will call: $CXX, else g++, c++ or clang++ on the PATH."""
    named = os.environ.get("CXX")
    candidates = [named] if named else ["g++", "c++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise EmberError(
        f"no C++ compiler found ({'CXX=' + named if named else 'g++, c++ or clang++'}); "
        "compiling needs one (Debian: apt install g++); ember keeps running the U-Net eagerly"
    )


@dataclass
class CompileReport:
    key: PackageKey
    path: Path
    kept: bool
    cached: bool  # an existing package was found; nothing was compiled
    compile_seconds: float = 0.0
    eager_ms: float = 0.0
    compiled_ms: float = 0.0


def compile_unet(
    loaded,
    latent: tuple[int, int],
    *,
    keep_slower: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> CompileReport:
    """Build (or find) the package for `loaded`'s U-Net at latent size `latent`, time one batch-2
    pass eager against compiled, and keep it only where compiled is faster (or `keep_slower`)."""
    key = package_key(loaded, latent)
    path = packages_dir() / f"{key.name}.pt2"
    info = path.with_suffix(".json")
    if path.exists() and info.exists() and not force:
        data = json.loads(info.read_text())
        return CompileReport(key, path, True, True, data["compile_seconds"], data["eager_ms"],
                             data["compiled_ms"])  # fmt: skip
    compiler = cxx_compiler()
    unet = loaded.model.model.diffusion_model
    example = example_inputs(unet, latent, loaded.dtype)
    progress("exporting the U-Net graph")
    started = time.perf_counter()
    with torch.no_grad():
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
        dynamic = [{0: batch}, {0: batch}, {0: batch, 1: tokens}] + [{0: batch}] * (
            len(example) - 3
        )
        with prepack.unpacked():
            program = torch.export.export(unet, example, dynamic_shapes=tuple(dynamic))
        progress(f"compiling with {Path(compiler).name} (minutes for a full-size model)")
        packages_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=packages_dir()) as tmp:
            built = Path(tmp) / "unet.pt2"
            try:
                torch._inductor.aoti_compile_and_package(
                    program,
                    package_path=str(built),
                    inductor_configs={"freezing": True, "cpp.cxx": (compiler,)},
                )
            except Exception as exc:
                raise EmberError(
                    f"compiling the U-Net failed ({first_line(exc)}); ember keeps running it "
                    "eagerly"
                ) from None
            seconds = time.perf_counter() - started
            progress("timing eager against compiled")
            net = CompiledUNet(key, load_package(built))
            eager_ms, compiled_ms = _time_both(unet, net, example)
            kept = compiled_ms < eager_ms or keep_slower
            if kept:
                with atomic_path(path) as final:
                    shutil.copyfile(built, final)
    report = CompileReport(key, path, kept, False, seconds, eager_ms, compiled_ms)
    if kept:
        record = {"key": key.__dict__, "format": FORMAT, "model": str(loaded.path),
                  "compile_seconds": seconds, "eager_ms": eager_ms, "compiled_ms": compiled_ms}  # fmt: skip
        write_atomic(info, json.dumps(record, indent=1, default=list).encode())
    else:
        path.unlink(missing_ok=True)
        info.unlink(missing_ok=True)
    with _lock:
        _loaded.pop(str(path), None)
    return report


def example_inputs(unet, latent: tuple[int, int], dtype: torch.dtype) -> tuple:
    """A batch-2 (cond + uncond) call of `unet` at latent size `latent`, 77 tokens."""
    cfg = unet.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, *latent, generator=g).to(dtype)
    t = torch.tensor([999.0, 999.0], dtype=dtype)
    context = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    if cfg.adm_in_channels:
        return x, t, context, torch.randn(2, cfg.adm_in_channels, generator=g).to(dtype)
    return x, t, context


def _time_both(unet, net: CompiledUNet, example: tuple, reps: int = 5) -> tuple[float, float]:
    """Median ms of one pass, eager and compiled, interleaved after a warm-up of each."""
    eager, compiled = [], []
    with torch.no_grad():
        unet(*example), net(*example)
        for _ in range(reps):
            for fn, times in ((unet, eager), (net, compiled)):
                start = time.perf_counter()
                fn(*example)
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(eager), statistics.median(compiled)
