"""How ember's processes run: the malloc they use, and the switches read from the environment.

glibc's malloc gives every buffer over 32 MB a fresh `mmap` and unmaps it when freed, so each
large activation (the VAE's maps, TAESD's, SDXL's) is zeroed by the kernel and page-faulted in
again on every call. tcmalloc keeps freed pages for the next buffer and hands them back gradually;
with it the SD VAE decodes 1.30x faster at 512x512 and 1.48x at 1024x1024, TAESD 0.135 -> 0.087 s
(bench/malloc.md, a 2-core Xeon). So the `ember` command runs under tcmalloc where it is installed (Debian and
Ubuntu: `libtcmalloc-minimal4`, which `scripts/setup.sh` installs when it can), as A1111's
launcher does: it starts itself again with the library in `LD_PRELOAD`, before torch is
imported. EMBER_TCMALLOC=0 keeps glibc's malloc. A Python program using ember as a library gets
the same by starting under `LD_PRELOAD=libtcmalloc_minimal.so.4`.

This module imports nothing heavy: the command line calls it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping

# The libraries tried, in order: the minimal one has no heap profiler (nothing to configure).
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
_RESTART = "_EMBER_PRELOAD_WAS"  # set across the restart: LD_PRELOAD as the user had it


def env_on(name: str, env: Mapping[str, str] | None = None) -> bool:
    """An on/off switch read from the environment (default: this process's): on unless set to 0,
    false, no or off."""
    value = (os.environ if env is None else env).get(name, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def find_tcmalloc() -> str | None:
    """tcmalloc's library name as the dynamic loader finds it (e.g. libtcmalloc_minimal.so.4),
    or None where it is not installed or the system is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    for name in TCMALLOC:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """True when this process's malloc is tcmalloc."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with tcmalloc added to LD_PRELOAD where it is installed and
    EMBER_TCMALLOC allows it: for starting a process that should run as `ember` does."""
    env = dict(os.environ if env is None else env)
    lib = find_tcmalloc()
    if (
        lib is None
        or not env_on("EMBER_TCMALLOC", env)
        or "libtcmalloc" in env.get("LD_PRELOAD", "")
    ):
        return env
    env["LD_PRELOAD"] = " ".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    return env


def restart_with_tcmalloc() -> None:
    """Start this process again, same arguments, with tcmalloc preloaded: called by the `ember`
    command before anything else. Returns at once where tcmalloc is already loaded, missing,
    switched off, or where this process is the restarted one (which puts LD_PRELOAD back as the
    user had it, so that the programs ember starts do not inherit tcmalloc)."""
    if _RESTART in os.environ:
        was = os.environ.pop(_RESTART)
        if was:
            os.environ["LD_PRELOAD"] = was
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    env = preload_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD") or tcmalloc_loaded():
        return
    env[_RESTART] = os.environ.get("LD_PRELOAD", "")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # no interpreter path to start again (embedded Python): run on as it is
        return


def release_freed_memory() -> None:
    """Hand the memory malloc keeps for reuse back to the system now (after a model is dropped
    for another): tcmalloc's free page heap, or glibc's free heap pages."""
    libc = ctypes.CDLL(None)  # the symbols the process has: tcmalloc's only where it is loaded
    if hasattr(libc, "MallocExtension_ReleaseFreeMemory"):
        libc.MallocExtension_ReleaseFreeMemory()
    elif hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
