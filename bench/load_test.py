"""Bounded load test of `ember serve` on loopback: N concurrent clients, a fixed number of requests.

Starts the server (tiny random model unless --model) with and without cross-request batching and
reports throughput, p50/p99 latency, 5xx count, lost jobs and the server's peak RSS.
Usage: .venv/bin/python bench/load_test.py [--clients 50] [--requests 200] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from server_support import free_port, make_tiny_model, wait_for  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_load(url: str, clients: int, total: int, steps: int, pid: int) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    jobs: set[str] = set()
    peak = [rss_mb(pid)]
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"prompt": f"shape {i % 7}", "seed": i, "steps": steps, "width": 64,
                    "height": 64, "sampler_name": "Euler a"}  # fmt: skip
            t0 = time.perf_counter()
            while True:
                r = await http.post(f"{url}/sdapi/v1/txt2img", json=body)
                if r.status_code not in (429, 503):
                    break
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                import json

                jobs.add(json.loads(r.json()["info"])["ember_job_id"])

    async def sample_rss() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample_rss())
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - t0
    sampler.cancel()
    latencies.sort()
    return {
        "requests": total,
        "ok": codes.get(200, 0),
        "5xx": sum(n for c, n in codes.items() if c >= 500),
        "lost": total - len(jobs),
        "throughput_img_s": total / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "peak_rss_mb": peak[0],
    }


SERVE = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import uvicorn
from server_support import make_settings
from ember.server.app import create_app
from ember.server.engine import ModelEngine
data, batching, max_batch, model, port = sys.argv[2:7]
s = make_settings(Path(data), batching=batching == "1", batch_window=0.02,
                  max_batch_images=int(max_batch), max_queue=256)
engine = ModelEngine([], Path(model), preview_every=0)
uvicorn.run(create_app(s, engine), host="127.0.0.1", port=int(port), log_level="warning")
"""


def serve(model: Path, data: Path, batching: bool, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [str(TESTS), str(data), str(int(batching)), str(max_batch), str(model), str(port)]
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *args])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=120, interval=0.2)
    return proc, url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ember-load-"))
    model = args.model or make_tiny_model(root / "tiny.safetensors")
    for batching in (False, True):
        proc, url = serve(model, root / f"data-{batching}", batching, args.max_batch)
        try:
            res = asyncio.run(run_load(url, args.clients, args.requests, args.steps, proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
        label = "batching" if batching else "no batching"
        print(f"{label:12} " + "  ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
