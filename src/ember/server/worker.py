"""The generation worker: one thread that drains the durable queue in compatible batches.

The event loop never runs the model: HTTP handlers only write jobs to the store and wake this thread;
progress and completion come back through `Broker`, which hands events to asyncio subscribers.
Requests that share a batch key and arrive within `batch_window` seconds run as one U-Net batch.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ember.errors import EmberError
from ember.images import format_infotext, image_array, marked_record, png_bytes
from ember.provenance import ON, Provenance
from ember.server.engine import Engine, WorkItem
from ember.server.jobs import ImageRow, Job, Store, new_id
from ember.service import GeneratedImage
from ember.settings import params_from_dict

log = logging.getLogger("ember.server")


class Aborted(Exception):
    """Raised from the step callback to stop sampling (interrupt, skip, or every job cancelled)."""


class Broker:
    """Fan-out of job events from the worker thread to asyncio subscribers (SSE, A1111 waits)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue]] = {}
        self.latest: dict[str, dict[str, Any]] = {}

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

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Thread-safe; progress events replace each other, the final event always arrives."""
        if event["type"] == "progress":
            self.latest[job_id] = event
        else:
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
        store: Store,
        engine: Engine,
        broker: Broker,
        *,
        batching: bool = True,
        batch_window: float = 0.05,
        max_batch_images: int = 8,
        provenance: Provenance = ON,
    ) -> None:
        self.store, self.engine, self.broker = store, engine, broker
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
        self.batches_run = 0
        self.images_made = 0

    def start(self) -> None:
        if self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ember-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self.interrupt()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The store already says cancelled; stop sampling if it was alone in its batch."""
        with self._lock:
            self._cancelled.add(job_id)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def skip(self) -> None:
        self.progress.skipped = True

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self._run_next():
                    pass
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad batch
                log.error("worker error:\n%s", traceback.format_exc())
                time.sleep(0.5)

    def _pick(self) -> list[WorkItem]:
        queued = self.store.queued()
        if not queued:
            return []
        head = self._item_or_fail(queued[0])
        if head is None:
            return []
        group = [head]
        if not self.batching:
            return group
        if self.batch_window > 0 and len(queued) < self.max_batch_images:
            time.sleep(self.batch_window)  # let requests arriving together share the batch
            queued = self.store.queued()
        images = head.params.batch
        for job in queued:
            if job.id == head.job_id or images >= self.max_batch_images:
                continue
            item = self._item_or_fail(job)
            if item is None or item.batch_key() != head.batch_key():
                continue
            if images + item.params.batch > self.max_batch_images:
                continue
            group.append(item)
            images += item.params.batch
        return group

    def _item_or_fail(self, job: Job) -> WorkItem | None:
        try:
            return work_item(job)
        except Exception as exc:  # noqa: BLE001 - a corrupt stored job fails alone
            self.store.claim([job.id])
            self.store.finish(job.id, "failed", f"unreadable job: {exc}")
            self.broker.publish(job.id, {"type": "failed", "error": str(exc)})
            return None

    def _run_next(self) -> bool:
        """Run one batch; False when the queue is empty."""
        if not self.store.queued(1):
            return False
        group = self._pick()
        if not group:
            return True
        claimed = set(self.store.claim([i.job_id for i in group]))
        group = [i for i in group if i.job_id in claimed]
        if not group:
            return True
        self._run(group)
        return True

    def _run(self, group: list[WorkItem]) -> None:
        ids = [i.job_id for i in group]
        self.progress = Progress(job_ids=ids, total=group[0].params.steps, started=time.time())
        with self._lock:
            self._cancelled -= set(ids)
        counts = [i.params.batch for i in group]

        def on_step(step: int, total: int, previews: list[np.ndarray] | None) -> None:
            pr = self.progress
            pr.step, pr.total = step, total
            if pr.interrupted or pr.skipped or self._stop.is_set():
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
            why = "skipped" if self.progress.skipped else "interrupted"
            for job_id in ids:
                if self.store.finish(job_id, "interrupted", why):
                    self.broker.publish(job_id, {"type": "interrupted", "error": why})
                else:
                    self.broker.publish(job_id, {"type": "cancelled"})
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
        for item, images in zip(group, outputs, strict=True):
            self._save(item, images)

    def _fail(self, ids: list[str], message: str) -> None:
        for job_id in ids:
            self.store.finish(job_id, "failed", message)
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
        if self.store.complete(item.job_id, rows):
            self.images_made += len(rows)
            self.broker.publish(item.job_id, {"type": "done", "images": [r.id for r, _ in rows]})
        else:
            self.broker.publish(item.job_id, {"type": "cancelled"})


def _record_dict(record) -> dict[str, Any]:
    import json

    return json.loads(record.to_json())
