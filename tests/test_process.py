"""The `ember` command runs under tcmalloc where it is installed: large activations then reuse freed
pages instead of being zeroed and faulted in again on every image, and a replaced model's memory
goes back to the system."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ember.process import find_tcmalloc

needs_tcmalloc = pytest.mark.skipif(
    find_tcmalloc() is None,
    reason="tcmalloc is not installed (bash scripts/setup.sh installs libtcmalloc-minimal4)",
)

MB64 = 64 * 2**20

# What a process started as the `ember` command sees after its first step; run apart from pytest,
# whose own malloc stays as it is.
PROBE = textwrap.dedent(
    f"""
    import json, os, resource, sys
    from ember.process import release_freed_memory, restart_with_tcmalloc, tcmalloc_loaded

    restart_with_tcmalloc()
    import torch

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def decode():  # a chain of VAE-sized activations, each written (touched)
        x = torch.ones({MB64} // 4)
        return (x * 2 + x).sum().item()

    decode()
    before = faults()
    decode()  # the next image's
    refaults = faults() - before
    y = torch.ones({MB64} // 4)
    del y
    kept = rss()
    release_freed_memory()
    print(json.dumps({{"tcmalloc": tcmalloc_loaded(), "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                      "refaults": refaults, "kept": kept, "released": rss()}}))
    """
)


def probe(**env: str | None) -> dict:
    environ = {**os.environ, **env}
    for k in [k for k, v in env.items() if v is None]:
        environ.pop(k)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_tcmalloc
def test_the_command_restarts_under_tcmalloc_and_reuses_freed_pages():
    r = probe(LD_PRELOAD=None, EMBER_TCMALLOC=None)
    assert r["tcmalloc"] is True
    # The programs ember starts (a compiler, a browser) do not inherit the preload.
    assert r["LD_PRELOAD"] is None
    pages = MB64 // os.sysconf("SC_PAGE_SIZE")
    # Under glibc every 64 MB buffer is mapped afresh: 3 x 16k faults per decode, one a page.
    assert r["refaults"] < pages / 20, r
    # What it keeps goes back when asked (after a model is replaced).
    assert r["kept"] - r["released"] > MB64 / 2, r


@needs_tcmalloc
def test_a_users_own_preload_is_kept_and_passed_on():
    libm = "libm.so.6"  # any library: the loader just loads it first
    r = probe(LD_PRELOAD=libm, EMBER_TCMALLOC=None)
    assert r["tcmalloc"] is True
    assert r["LD_PRELOAD"] == libm


def test_ember_tcmalloc_0_keeps_glibc_malloc():
    r = probe(LD_PRELOAD=None, EMBER_TCMALLOC="0")
    assert r["tcmalloc"] is False
    assert r["refaults"] > MB64 // os.sysconf("SC_PAGE_SIZE"), r  # each buffer faulted afresh


def test_without_tcmalloc_the_command_runs_as_it_is(monkeypatch):
    from ember import process

    monkeypatch.setattr(process, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted without tcmalloc"))
    process.restart_with_tcmalloc()  # returns: nothing to preload
    assert process.preload_env({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_replacing_the_model_hands_the_old_weights_back(monkeypatch, sd1_folder, tiny_model_file):
    from ember import process
    from ember.service import GenerationService

    released = []
    monkeypatch.setattr(process, "release_freed_memory", lambda: released.append(1))
    service = GenerationService("fp32")
    service.load(sd1_folder)
    service.load(sd1_folder)  # the same model: kept, nothing freed
    assert released == []
    service.load(tiny_model_file)
    assert released == [1]
