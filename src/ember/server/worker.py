"""The generation worker: one thread that drains the durable queue in compatible batches.

The event loop never runs the model: HTTP handlers only write jobs to the store and wake this thread;
progress and completion come back through `Broker`, which hands events to asyncio subscribers and,
on a shared store, to every other worker (`Store.publish` / `Store.listen`).
Requests that share a batch key and arrive within `batch_window` seconds run as one U-Net batch.
While a batch runs, a heartbeat thread renews its lease and re-queues the jobs of dead workers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ember.errors import EmberError
from ember.images import format_infotext, image_array, marked_record, png_bytes
from ember.provenance import ON, Provenance
from ember.server.engine import Engine, WorkItem
from ember.server.jobs import ImageRow, Job, JobStore, StoreUnavailable, new_id
from ember.service import GeneratedImage
from ember.settings import GenerationParams, params_from_dict

log = logging.getLogger("ember.server")


class Aborted(Exception):
    """Raised from the step callback to stop sampling (interrupt, skip, or every job cancelled)."""


class Broker:
    """Fan-out of job events from the worker thread to asyncio subscribers (SSE, A1111 waits)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue]] = {}
        self.latest: dict[str, dict[str, Any]] = {}
        # Set on a shared store: sends each local event to the other workers.
        self.relay: Callable[[str, dict[str, Any]], None] | None = None

    def subscribe(self, job_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=32)
        self._subs.setdefault(job_id, set()).add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subs[job_id]

    def publish(self, job_id: str, event: dict[str, Any], *, relay: bool = True) -> None:
        """Thread-safe; progress events replace each other, the final event always arrives.
        `relay=False` for an event that came from another worker."""
        if relay and self.relay is not None:
            try:
                self.relay(job_id, event)
            except StoreUnavailable:
                pass  # the other workers re-read the job's row; a lost event only delays them
        if event["type"] == "progress":
            self.latest[job_id] = event
        elif event["type"] in FINAL_EVENTS:
            self.latest.pop(job_id, None)
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._deliver, job_id, event)
            except RuntimeError:
                pass  # loop shutting down

    def _deliver(self, job_id: str, event: dict[str, Any]) -> None:
        for q in list(self._subs.get(job_id, ())):
            if q.full():
                q.get_nowait()  # a slow reader loses old progress, never the final event
            q.put_nowait(event)


FINAL_EVENTS = ("done", "failed", "cancelled", "interrupted")


def job_batch_key(model: str, kind: str, params: GenerationParams) -> str:
    """The stored form of `WorkItem.batch_key`: jobs with equal digests may share a U-Net batch."""
    key = WorkItem("", params, kind, model=model).batch_key()
    return hashlib.sha256(repr(key).encode()).hexdigest()


def new_worker_id() -> str:
    """Names this worker in the queue, the logs and the metrics: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass
class Progress:
    """What A1111's /progress reports: the batch being sampled right now."""

    job_ids: list[str] = field(default_factory=list)
    step: int = 0
    total: int = 0
    started: float = 0.0
    preview: bytes | None = None
    interrupted: bool = False
    skipped: bool = False


def preview_data_url(pixels: np.ndarray, max_side: int = 256) -> str:
    img = Image.fromarray(pixels, "RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def work_item(job: Job) -> WorkItem:
    """Rebuild a WorkItem from its stored job (params as JSON, inputs as PNG bytes)."""
    params = params_from_dict(job.params)

    def pixels(data: bytes | None, mode: str) -> np.ndarray | None:
        return None if data is None else image_array(Image.open(io.BytesIO(data)), mode)

    mode = job.kind
    return WorkItem(job.id, params, mode, pixels(job.init, "RGB"), pixels(job.mask, "L"), job.model)


class Worker:
    """Owns the engine; runs in its own thread until `stop()`."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        broker: Broker,
        *,
        batching: bool = True,
        batch_window: float = 0.05,
        max_batch_images: int = 8,
        provenance: Provenance = ON,
        lease: float = 30.0,
        worker_id: str | None = None,
        metrics=None,
        claim_models: tuple[str, ...] = (),
    ) -> None:
        self.store, self.engine, self.broker = store, engine, broker
        self.id = worker_id or new_worker_id()
        self.lease = lease
        self.metrics = metrics
        self.claim_models = claim_models
        for name in claim_models:  # a typo must not leave a worker idle forever
            if not any(m.matches(name) for m in engine.models()):
                raise EmberError(f"--models {name!r} is none of this worker's models")
        self.provenance = provenance
        self.batching = batching
        self.batch_window = batch_window
        self.max_batch_images = max_batch_images
        self.progress = Progress()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ember-worker", daemon=True)
        self._beat = threading.Thread(target=self._heartbeat, name="ember-lease", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="ember-events", daemon=True)
        self.batches_run = 0
        self.images_made = 0
        self._renewed = time.monotonic()  # when the running batch's lease was last taken
        self._lease_lost = False  # set by the heartbeat: the batch is no longer surely ours

    def start(self) -> None:
        if self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ember-worker", daemon=True)
        self._beat = threading.Thread(target=self._heartbeat, name="ember-lease", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="ember-events", daemon=True)
        self._thread.start()
        self._beat.start()
        self._listener.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after handing the running batch back to the queue (SIGTERM: another worker, or
        this one after a restart, runs it from the start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._beat.join(timeout)
        self._listener.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The store already says cancelled; stop sampling if it was alone in its batch."""
        with self._lock:
            if job_id in self.progress.job_ids:  # any other job is none of this worker's
                self._cancelled.add(job_id)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def skip(self) -> None:
        self.progress.skipped = True

    def control(self, job_id: str, action: str) -> bool:
        """Interrupt or skip the batch running `job_id`, if it runs here -> whether it did."""
        if job_id not in self.progress.job_ids:
            return False
        self.skip() if action == "skip" else self.interrupt()
        return True

    def receive(self, job_id: str, event: dict[str, Any]) -> None:
        """An event from another worker: a cancel or interrupt for a job this worker runs, a new
        job to claim, or progress for the clients following the job here."""
        kind = event["type"]
        if kind == "cancelled":
            self.cancel(job_id)
        elif kind in ("interrupt", "skip"):
            self.control(job_id, kind)
            return
        elif kind == "queued":
            self.wake()
        self.broker.publish(job_id, event, relay=False)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self._run_next():
                    pass
            except StoreUnavailable as exc:
                log.warning("worker=%s queue database away: %s", self.id, exc)
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad batch
                log.error("worker error:\n%s", traceback.format_exc())
                time.sleep(0.5)

    def _heartbeat(self) -> None:
        """Renew the running batch's lease; re-queue (or fail) the jobs of workers that died."""
        while not self._stop.wait(self.lease / 3):
            ids = list(self.progress.job_ids)
            try:
                held = set(self.store.renew(self.id, ids, self.lease))
                self._renewed = time.monotonic()
                for job_id in ids:
                    if job_id not in held:  # cancelled, or reaped after a long outage
                        self.cancel(job_id)
                for job_id, status, error in self.store.reap():
                    log.warning("job=%s worker lease expired -> %s", job_id, status)
                    if status == "failed":
                        self.broker.publish(job_id, {"type": "failed", "error": error})
                    else:
                        self.broker.publish(job_id, {"type": "queued"})
                        self.wake()
            except StoreUnavailable:
                # The lease outlives a short outage. Past it, another worker may run the batch
                # (this one may be the one cut off): stop, so that no job runs twice at once.
                if ids and time.monotonic() - self._renewed > self.lease:
                    log.warning("worker=%s lease lost (database away): stopping jobs=%s",
                                self.id, ",".join(ids))  # fmt: skip
                    self._lease_lost = True
            except Exception:  # noqa: BLE001
                log.error("lease renewal error:\n%s", traceback.format_exc())

    def _listen(self) -> None:
        self.store.listen(self.receive, self._stop)

    def _models(self) -> list[str] | None:
        """On a shared queue a worker claims only the models it has (or those of them `--models`
        names); alone, it runs every job (and fails, clearly, one whose model has gone)."""
        if not self.store.shared:
            return None
        names = self.claim_models
        return [m.title for m in self.engine.models()
                if not names or any(m.matches(n) for n in names)]  # fmt: skip

    def _run_next(self) -> bool:
        """Claim and run one batch; False when the queue is empty."""
        if not self.store.has_queued():
            return False
        if self.batching and self.batch_window > 0:
            if self.store.counts().get("queued", 0) < self.max_batch_images:
                time.sleep(self.batch_window)  # let requests arriving together share the batch
        jobs = self.store.claim_next(
            self.id, models=self._models(), lease=self.lease,
            max_images=self.max_batch_images if self.batching else 0,
        )  # fmt: skip
        if not jobs:
            return False
        group = []
        for job in jobs:
            try:
                group.append(work_item(job))
            except Exception as exc:  # noqa: BLE001 - a corrupt stored job fails alone
                self.store.finish(job.id, "failed", f"unreadable job: {exc}", self.id)
                self.broker.publish(job.id, {"type": "failed", "error": str(exc)})
        if group:
            log.info("worker=%s claimed jobs=%s", self.id, ",".join(i.job_id for i in group))
            self._run(group)
        return True

    def _run(self, group: list[WorkItem]) -> None:
        ids = [i.job_id for i in group]
        self._renewed = time.monotonic()  # the claim took the lease
        self._lease_lost = False
        with self._lock:  # together, so that a cancel arriving now is not lost
            self._cancelled.clear()
            self.progress = Progress(job_ids=ids, total=group[0].params.steps, started=time.time())
        counts = [i.params.batch for i in group]

        last_step = [time.perf_counter()]

        def on_step(step: int, total: int, previews: list[np.ndarray] | None) -> None:
            pr = self.progress
            pr.step, pr.total = step, total
            if self.metrics is not None:
                now = time.perf_counter()
                self.metrics.step_seconds.observe(now - last_step[0])
                last_step[0] = now
            if pr.interrupted or pr.skipped or self._stop.is_set() or self._lease_lost:
                raise Aborted()
            with self._lock:
                if all(i in self._cancelled for i in ids):
                    raise Aborted()
            per_job: list[str | None] = [None] * len(group)
            if previews is not None and len(previews) == sum(counts):
                pr.preview = png_bytes(previews[0])
                start = 0
                for k, n in enumerate(counts):
                    per_job[k] = preview_data_url(previews[start])
                    start += n
            for k, item in enumerate(group):
                event = {"type": "progress", "step": step, "total": total}
                if per_job[k] is not None:
                    event["preview"] = per_job[k]
                self.broker.publish(item.job_id, event)

        try:
            outputs = self.engine.run(group, on_step)
        except Aborted:
            stopping = self._stop.is_set() or self._lease_lost
            if stopping and not (self.progress.interrupted or self.progress.skipped):
                self._hand_back(ids)  # to the queue, to run again from the start
                return
            why = "skipped" if self.progress.skipped else "interrupted"
            for job_id in ids:
                # a job that is no longer this worker's (cancelled, or re-queued after a lost
                # lease) is left as it is: whoever changed it told its followers
                if self.store.finish(job_id, "interrupted", why, self.id):
                    self.broker.publish(job_id, {"type": "interrupted", "error": why})
            return
        except EmberError as exc:
            if len(group) > 1:  # one bad request must not sink its batch-mates
                for item in group:
                    self._run([item])
                return
            self._fail(ids, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an engine bug fails these jobs, not the server
            log.error("generation failed:\n%s", traceback.format_exc())
            self._fail(ids, f"internal error: {type(exc).__name__}")
            return
        finally:
            self.progress.job_ids = []
        self.batches_run += 1
        if self.metrics is not None:
            self.metrics.batches.inc()
        for item, images in zip(group, outputs, strict=True):
            try:
                self._save(item, images)
            except StoreUnavailable:
                raise  # the job keeps its lease; another worker re-runs it if this one gives up
            except Exception as exc:  # noqa: BLE001 - a job whose images cannot be written fails
                log.error("job=%s cannot save:\n%s", item.job_id, traceback.format_exc())
                self._fail([item.job_id], f"cannot save the images: {exc}")

    def _hand_back(self, ids: list[str]) -> None:
        try:
            n = self.store.release(self.id, ids)
            log.info("worker=%s handed back jobs=%s (%d)", self.id, ",".join(ids), n)
        except StoreUnavailable:
            log.warning("worker=%s database away; jobs=%s re-queue when their lease expires",
                        self.id, ",".join(ids))  # fmt: skip

    def _fail(self, ids: list[str], message: str) -> None:
        for job_id in ids:
            log.warning("job=%s worker=%s failed: %s", job_id, self.id, message)
            if self.store.finish(job_id, "failed", message, self.id):
                self.broker.publish(job_id, {"type": "failed", "error": message})

    def _save(self, item: WorkItem, images: list[GeneratedImage]) -> None:
        rows = []
        now = time.time()
        for index, image in enumerate(images):
            record = marked_record(image.record, self.provenance)
            row = ImageRow(
                id=new_id(), job_id=item.job_id, idx=index, width=int(image.pixels.shape[1]),
                height=int(image.pixels.shape[0]), seed=record.params.seed,
                infotext=format_infotext(record), record=_record_dict(record), created=now,
            )  # fmt: skip
            rows.append((row, image.png(self.provenance)))
        if self._complete(item.job_id, rows):
            self.images_made += len(rows)
            if self.metrics is not None:
                self.metrics.images.inc(len(rows))
            log.info("job=%s worker=%s done images=%d", item.job_id, self.id, len(rows))
            self.broker.publish(item.job_id, {"type": "done", "images": [r.id for r, _ in rows]})
        # else it was cancelled, or re-queued after a lost lease: not this worker's to announce

    def _complete(self, job_id: str, rows: list[tuple[ImageRow, bytes]]) -> bool:
        """Record a finished job, waiting out a database outage while the lease would still hold
        (after that another worker may have re-run the job, and the late result is dropped)."""
        give_up = time.monotonic() + self.lease
        while True:
            try:
                return self.store.complete(job_id, rows, self.id)
            except StoreUnavailable:
                if time.monotonic() > give_up:
                    log.warning("job=%s database away too long; result dropped", job_id)
                    return False
                time.sleep(0.5)


def _record_dict(record) -> dict[str, Any]:
    import json

    return json.loads(record.to_json())
