"""Several `ember serve` workers on one PostgreSQL queue (a real server, started by `conftest.py`).

Workers are in-process apps (each its own store, pool, worker thread and event listener, as in its
own process) on the fast FakeEngine; the kill -9 and SIGTERM tests run a worker as a real
`ember serve`-style subprocess so that it can die.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from ember.cli import main
from ember.errors import EmberError
from ember.server.app import create_app
from ember.server.auth import AuthConfig
from ember.server.jobs import LOST_TWICE
from ember.server.pgstore import PgStore
from server_support import FakeEngine, make_settings, start_server, wait_for


def worker(url: str, data_dir, engine: FakeEngine, **kw) -> TestClient:
    kw.setdefault("lease", 2.0)
    return TestClient(create_app(make_settings(data_dir, queue=url, **kw), engine))


def final(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    """The job's view once it is final, read through `client` (503s while the database is away
    are retried, as a client following Retry-After would)."""

    def check():
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 503:
            return None
        assert r.status_code == 200, r.text
        view = r.json()
        return view if view["status"] not in ("queued", "running") else None

    return wait_for(check, timeout=timeout, interval=0.05)


def test_two_workers_share_40_jobs_each_done_once(pg_url, tmp_path):
    ea, eb = FakeEngine(step_delay=0.01), FakeEngine(step_delay=0.01)
    with (
        worker(pg_url, tmp_path / "a", ea, max_batch_images=2) as a,
        worker(pg_url, tmp_path / "b", eb, max_batch_images=2) as b,
    ):
        ids = []
        for i in range(40):  # submitted across both workers
            body = {"prompt": f"p{i}", "seed": i, "steps": 3 + i % 3, "batch": 1 + i % 2}
            r = (a, b)[i % 2].post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        views = [final((b, a)[i % 2], job_id) for i, job_id in enumerate(ids)]
        assert [v["status"] for v in views] == ["done"] * 40
        ran = [job_id for batch in ea.batches + eb.batches for job_id in batch]
        assert sorted(ran) == sorted(ids)  # every job ran exactly once
        assert ea.batches and eb.batches  # and both workers did some of them
        image_ids = [image_id for v in views for image_id in v["images"]]
        assert [len(v["images"]) for v in views] == [1 + i % 2 for i in range(40)]
        gallery = a.get("/v1/images", params={"limit": 100}).json()["images"]
        assert sorted(x["id"] for x in gallery) == sorted(image_ids)  # each image stored once
        for image_id in image_ids:
            ra, rb = a.get(f"/v1/images/{image_id}"), b.get(f"/v1/images/{image_id}")
            assert ra.status_code == rb.status_code == 200 and ra.content[:4] == b"\x89PNG"
            assert ra.content == rb.content
        metrics = b.get("/metrics").text
        assert 'ember_jobs{state="done"} 40.0' in metrics and "ember_queue_depth 0.0" in metrics
        done_a = float(a.get("/metrics").text.split("ember_images_total{")[1].split()[1])
        assert done_a == sum(len(v["images"]) for v in views if v["id"] in sum(ea.batches, []))


def test_any_worker_follows_cancels_and_reports_a_job(pg_url, tmp_path):
    ea, eb = FakeEngine(step_delay=0.03), FakeEngine(step_delay=0.03)
    with worker(pg_url, tmp_path / "a", ea) as a, worker(pg_url, tmp_path / "b", eb) as b:
        job = a.post("/v1/jobs", json={"prompt": "x", "steps": 30}).json()["id"]
        seen: dict[str, list[str]] = {}

        def follow(name: str, client: TestClient) -> None:
            with client.stream("GET", f"/v1/jobs/{job}/events") as r:
                seen[name] = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]

        threads = [threading.Thread(target=follow, args=p) for p in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        # A1111's /progress through either worker reports the caller's job
        p = wait_for(lambda: (p := b.get("/sdapi/v1/progress").json())["state"]["sampling_step"]
                     and p)  # fmt: skip
        assert p["current_task"] == job and p["state"]["sampling_steps"] == 30
        for t in threads:
            t.join(30)
        other = "b" if ea.batches else "a"  # the worker that did not run the job
        assert "progress" in seen[other] and seen[other][-1] == "done", seen
        assert final(b, job)["status"] == "done"

        # a running job cancelled through the worker that is not running it stops at once
        long = b.post("/v1/jobs", json={"prompt": "y", "steps": 150}).json()["id"]
        wait_for(lambda: any(long in x for x in ea.batches + eb.batches))  # sampling started
        runner, bystander = (a, b) if any(long in x for x in ea.batches) else (b, a)
        assert bystander.delete(f"/v1/jobs/{long}").json()["status"] == "cancelled"
        start = time.monotonic()
        quick = bystander.post("/v1/jobs", json={"prompt": "z", "steps": 2}).json()["id"]
        assert final(runner, quick)["status"] == "done"
        assert time.monotonic() - start < 3  # not the 4.5 s the cancelled job would have taken
        assert runner.get(f"/v1/jobs/{long}").json()["status"] == "cancelled"

        # A1111's /interrupt through the bystander stops the caller's job on the runner
        long = a.post("/v1/jobs", json={"prompt": "w", "steps": 150}).json()["id"]
        wait_for(lambda: any(long in x for x in ea.batches + eb.batches))
        runner, bystander = (a, b) if any(long in x for x in ea.batches) else (b, a)
        assert bystander.post("/sdapi/v1/interrupt").json() == {}
        assert final(runner, long, timeout=3)["status"] == "interrupted"


def test_each_worker_claims_only_the_models_it_advertises(pg_url, tmp_path):
    ea, eb = FakeEngine(), FakeEngine()
    with (
        worker(pg_url, tmp_path / "a", ea, claim_models=("fake-a",)) as a,
        worker(pg_url, tmp_path / "b", eb, claim_models=("fake-b",)) as b,
    ):
        ids = {model: [(a, b)[i].post("/v1/jobs", json={"prompt": "x", "steps": 1 + i,
                                                         "model": model}).json()["id"]
                       for i in range(2)]
               for model in ("fake-a", "fake-b")}  # fmt: skip
        for job_id in ids["fake-a"] + ids["fake-b"]:
            assert final(a, job_id)["status"] == "done"
        assert sorted(sum(ea.batches, [])) == sorted(ids["fake-a"])
        assert sorted(sum(eb.batches, [])) == sorted(ids["fake-b"])
    with pytest.raises(EmberError, match="none of this worker's models"):
        create_app(make_settings(tmp_path / "c", queue=pg_url, claim_models=("nope",)), ea)


def test_killed_workers_job_runs_on_the_other_after_its_lease(pg_url, tmp_path):
    proc, url = start_server(tmp_path / "a", step_delay=0.05, queue=pg_url, lease=1.0)
    try:
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "x", "steps": 40, "seed": 5}).json()
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] == "running")
        proc.kill()  # kill -9: no hand-back, the lease just stops being renewed
        proc.wait(10)
    finally:
        proc.kill()
    engine = FakeEngine()
    with worker(pg_url, tmp_path / "b", engine, lease=1.0) as b:
        view = final(b, job["id"], timeout=30)
        assert view["status"] == "done" and engine.batches == [[job["id"]]]
        assert b.get(f"/v1/images/{view['images'][0]}").content[:4] == b"\x89PNG"


def test_a_job_whose_worker_dies_twice_fails_with_a_reason(pg_url):
    store = PgStore(pg_url)
    job, _ = store.submit(owner="o", kind="txt2img", model="m", params={"batch": 1}, init=None,
                          mask=None, idem_key=None, body_hash=None, max_queued=8)  # fmt: skip
    for worker_id, after in (("w1", "queued"), ("w2", "failed")):
        assert [j.id for j in store.claim_next(worker_id, models=None, max_images=8, lease=0.05)]
        time.sleep(0.1)
        assert [(j, s) for j, s, _ in store.reap()] == [(job.id, after)]
    assert store.get(job.id).error == LOST_TWICE
    assert not store.complete(job.id, [], "w2")  # a late result from a lost worker is dropped
    store.close()


def test_sigterm_hands_the_running_job_back(pg_url, tmp_path):
    proc, url = start_server(tmp_path / "a", step_delay=0.05, queue=pg_url, lease=5.0)
    try:
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "x", "steps": 150}).json()["id"]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job}").json()["status"] == "running")
        proc.terminate()  # uvicorn's graceful shutdown, then the signal's own exit status
        proc.wait(20)
    finally:
        proc.kill()
    store = PgStore(pg_url)
    handed_back = store.get(job)
    store.close()
    assert (handed_back.status, handed_back.worker, handed_back.attempts) == ("queued", None, 0)
    engine = FakeEngine()
    with worker(pg_url, tmp_path / "b", engine) as b:
        # handed back, so it runs at once here (no lease to wait out) and from the start
        view = final(b, job, timeout=10)
        assert view["status"] == "done" and engine.batches == [[job]]


def test_keys_idempotency_and_rate_limit_hold_across_workers(pg_url, tmp_path, capsys):
    assert main(["keys", "--queue", pg_url, "create", "team"]) == 0
    out = capsys.readouterr()
    secret, key_id = out.out.strip(), out.err.split()[2].rstrip(";")
    settings = {"auth": AuthConfig(required=True), "rate_per_minute": 5}
    with (
        worker(pg_url, tmp_path / "a", FakeEngine(), **settings) as a,
        worker(pg_url, tmp_path / "b", FakeEngine(), **settings) as b,
    ):
        key = {"Authorization": f"Bearer {secret}"}
        assert a.get("/sdapi/v1/sd-models").status_code == 401
        assert a.get("/sdapi/v1/sd-models", headers=key).status_code == 200
        assert b.get("/sdapi/v1/sd-models", headers=key).status_code == 200
        body = {"prompt": "x", "steps": 1, "seed": 1}
        first = a.post("/v1/jobs", json=body, headers={**key, "Idempotency-Key": "k1"})
        again = b.post("/v1/jobs", json=body, headers={**key, "Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        r = b.post("/v1/jobs", json={**body, "seed": 2}, headers={**key, "Idempotency-Key": "k1"})
        assert r.status_code == 422 and "Idempotency-Key" in r.text
        # 5 a minute for the key, whichever worker gets them: 3 taken above, 2 left
        codes = [c.post("/v1/jobs", json=body, headers=key).status_code for c in (a, b, a)]
        assert codes == [202, 202, 429]
        r = b.post("/v1/jobs", json=body, headers=key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert main(["keys", "--queue", pg_url, "revoke", key_id]) == 0
        assert a.get("/sdapi/v1/sd-models", headers=key).status_code == 401
        assert b.get("/sdapi/v1/sd-models", headers=key).status_code == 401


def test_database_restart_while_workers_run(postgres, pg_url, tmp_path):
    ea, eb = FakeEngine(step_delay=0.02), FakeEngine(step_delay=0.02)
    with worker(pg_url, tmp_path / "a", ea) as a, worker(pg_url, tmp_path / "b", eb) as b:
        ids = [(a, b)[i % 2].post("/v1/jobs", json={"prompt": f"{i}", "seed": i,
                                                   "steps": 10 + i}).json()["id"]
               for i in range(12)]  # fmt: skip
        wait_for(lambda: a.get(f"/v1/jobs/{ids[0]}").json()["status"] != "queued")
        postgres.stop()
        try:
            for r in (a.get(f"/v1/jobs/{ids[0]}"), b.post("/v1/jobs", json={"prompt": "x"}),
                      a.get("/readyz"), b.get("/sdapi/v1/progress")):  # fmt: skip
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            assert a.get("/healthz").status_code == 200  # alive, only not ready
        finally:
            postgres.start()
        wait_for(
            lambda: a.get("/readyz").status_code == 200 and b.get("/readyz").status_code == 200
        )
        views = [final(a, job_id) for job_id in ids]
        assert [v["status"] for v in views] == ["done"] * 12  # nothing lost
        images = [image_id for v in views for image_id in v["images"]]
        gallery = b.get("/v1/images", params={"limit": 100}).json()["images"]
        assert len(images) == 12 and sorted(x["id"] for x in gallery) == sorted(images)


def test_a_worker_cut_off_past_its_lease_stops_its_batch(postgres, pg_url, tmp_path):
    engine = FakeEngine(step_delay=0.05)
    with worker(pg_url, tmp_path / "a", engine, lease=1.0) as a:
        job = a.post("/v1/jobs", json={"prompt": "x", "steps": 60}).json()["id"]
        wait_for(lambda: a.get(f"/v1/jobs/{job}").json()["status"] == "running")
        postgres.stop()
        try:  # the lease expires meanwhile: another worker may take the job, so this one stops
            wait_for(lambda: not a.app.state.server.worker.progress.job_ids, timeout=5)
        finally:
            postgres.start()
        assert final(a, job)["status"] == "done"  # re-queued once its lease expired, then run
        assert engine.batches == [[job], [job]]


def test_db_upgrade_is_idempotent_and_refuses_bad_urls(pg_url, capsys):
    assert main(["db", "upgrade", pg_url]) == 0
    assert main(["db", "upgrade", pg_url]) == 0
    assert capsys.readouterr().out.splitlines() == ["schema version 1 (was 0)", "schema version 1"]
    assert main(["db", "upgrade", "mysql://x/y"]) == 2
    assert main(["db", "upgrade", "postgresql://ember@/none?host=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a queue URL" in err[0] and "cannot reach" in err[1]
