"""The queue survives `kill -9`: queued jobs run after a restart, the running one is interrupted."""

from __future__ import annotations

import signal

import httpx

from server_support import start_server, wait_for


def test_queue_survives_sigkill(tmp_path):
    proc, url = start_server(tmp_path, step_delay=0.05)
    try:
        ids = [httpx.post(f"{url}/v1/jobs", json={"prompt": f"{i}", "steps": 20 + i, "seed": i,
                                                   "batch": 1 + i % 2}).json()["id"]
               for i in range(5)]  # fmt: skip
        # different step counts keep the jobs in separate batches, so exactly one is running
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{ids[0]}").json()["status"] == "running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    proc, url = start_server(tmp_path, step_delay=0.0)
    try:
        first = httpx.get(f"{url}/v1/jobs/{ids[0]}").json()
        assert first["status"] == "interrupted" and first["images"] == []
        final = [wait_for(lambda j=j: (v := httpx.get(f"{url}/v1/jobs/{j}").json())["status"]
                          not in ("queued", "running") and v) for j in ids[1:]]  # fmt: skip
        for i, view in enumerate(final, start=1):
            assert view["status"] == "done", view
            assert len(view["images"]) == 1 + i % 2
            for image_id in view["images"]:  # done always has its image
                r = httpx.get(f"{url}/v1/images/{image_id}")
                assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        # the interrupted job can be retried
        assert httpx.post(f"{url}/v1/jobs/{ids[0]}/retry").status_code == 200
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{ids[0]}").json()["status"] == "done")
    finally:
        proc.terminate()
        proc.wait(10)


def test_stopping_hands_the_running_job_back(tmp_path):
    """SIGTERM runs the app's shutdown: the running job goes back to the queue, not to
    `interrupted`, and runs from the start after a restart."""
    from fastapi.testclient import TestClient

    from ember.server.app import create_app
    from server_support import FakeEngine, make_settings

    with TestClient(create_app(make_settings(tmp_path), FakeEngine(step_delay=0.05))) as c:
        job = c.post("/v1/jobs", json={"prompt": "x", "steps": 100}).json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "running")
    engine = FakeEngine()
    with TestClient(create_app(make_settings(tmp_path), engine)) as c:
        assert c.get(f"/v1/jobs/{job}").json()["status"] in ("queued", "running", "done")
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "done")
        assert engine.batches == [[job]]
