"""Bounded load test of `ember serve` on loopback: N concurrent clients, a fixed number of requests.

Starts the server (tiny random model unless --model) with and without cross-request batching and
reports throughput, p50/p99 latency, 5xx count, lost jobs and the servers' peak RSS (summed).
With --postgres it instead compares 1 and 2 workers (batching on) sharing one PostgreSQL queue (a
throwaway server from tests/pg_support.py, or --postgres-url); the clients take turns between the
workers, as a round-robin load balancer would, and each A1111 request waits for its job wherever it
runs. On one machine the workers share its cores: real scaling is across machines.
Usage: .venv/bin/python bench/load_test.py [--clients 50] [--requests 200] [--steps 4] [--postgres]
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


async def run_load(urls: list[str], clients: int, total: int, steps: int, pids: list[int]) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    jobs: set[str] = set()
    peak = [sum(rss_mb(pid) for pid in pids)]
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient, url: str) -> None:
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
            peak[0] = max(peak[0], sum(rss_mb(pid) for pid in pids))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample_rss())
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http, urls[k % len(urls)]) for k in range(clients)))
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
data, batching, max_batch, model, port, queue = sys.argv[2:8]
s = make_settings(Path(data), batching=batching == "1", batch_window=0.02,
                  max_batch_images=int(max_batch), max_queue=256, queue=queue or None)
engine = ModelEngine([], Path(model), preview_every=0)
uvicorn.run(create_app(s, engine), host="127.0.0.1", port=int(port), log_level="warning")
"""


def serve(
    model: Path, data: Path, batching: bool, max_batch: int, queue: str | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [str(TESTS), str(data), str(int(batching)), str(max_batch), str(model), str(port),
            queue or ""]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *args])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=120, interval=0.2)
    return proc, url


def report(label: str, res: dict) -> None:
    print(f"{label:12} " + "  ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))  # fmt: skip


def measure(args, model: Path, datas: list[Path], batching: bool, queue: str | None) -> dict:
    procs, urls = [], []
    try:
        for data in datas:
            proc, url = serve(model, data, batching, args.max_batch, queue)
            procs.append(proc)
            urls.append(url)
        pids = [p.pid for p in procs]
        return asyncio.run(run_load(urls, args.clients, args.requests, args.steps, pids))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--postgres", action="store_true", help="1 vs 2 workers on one PostgreSQL")
    ap.add_argument("--postgres-url", help="use this (empty) database instead of a throwaway one")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ember-load-"))
    model = args.model or make_tiny_model(root / "tiny.safetensors")
    if not (args.postgres or args.postgres_url):
        for batching in (False, True):
            res = measure(args, model, [root / f"data-{batching}"], batching, None)
            report("batching" if batching else "no batching", res)
        return 0
    from pg_support import PgServer, find_bindir

    pg = None if args.postgres_url else PgServer(find_bindir())
    try:
        for workers in (1, 2):
            queue = args.postgres_url or pg.new_database()
            datas = [root / f"pg{workers}-{k}" for k in range(workers)]
            res = measure(args, model, datas, True, queue)
            report(f"{workers} worker{'s' if workers > 1 else ''}", res)
    finally:
        if pg is not None:
            pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
