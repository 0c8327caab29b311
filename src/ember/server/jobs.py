"""The durable job queue and image gallery: the storage interface and its embedded backend.

`open_store(queue, data_dir)` picks the backend: `SqliteStore`, one SQLite database (WAL) in the data
dir (the default, for one machine), or `ember.server.pgstore.PgStore`, a PostgreSQL database that
several `ember serve` workers share. Both have the same methods; the server above them does not
know which it has (`shared` only tells the worker to claim the models it has and to renew leases).

Invariants a crash cannot break:
- a job is `done` only in the same transaction that records its images, and an image row is written
  only after its PNG is on disk (written, fsynced, renamed), so "done" always has its pictures;
- on start-up, jobs left `running` by a killed process become `interrupted` (retry re-queues them);
  `queued` jobs simply stay queued and run.
Ids are random hex strings; image files are named by id, never by anything a user sent.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember.errors import EmberError
from ember.files import write_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    idem_key TEXT,
    body_hash TEXT,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    init BLOB,
    mask BLOB,
    status TEXT NOT NULL,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    batch_key TEXT,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    infotext TEXT NOT NULL,
    record TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT UNIQUE NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""

FINAL = ("done", "failed", "cancelled", "interrupted")


@dataclass
class Job:
    id: str
    seq: int
    owner: str
    kind: str
    model: str
    params: dict[str, Any]
    init: bytes | None
    mask: bytes | None
    status: str
    error: str | None
    images: list[str]
    created: float
    started: float | None
    finished: float | None
    idem_key: str | None = None
    body_hash: str | None = None
    batch_key: str | None = None
    worker: str | None = None
    attempts: int = 0


@dataclass
class ImageRow:
    id: str
    job_id: str
    idx: int
    width: int
    height: int
    seed: int
    infotext: str
    record: dict[str, Any]
    created: float


def new_id() -> str:
    return secrets.token_hex(12)


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was sent before with a different request body."""


class StoreUnavailable(EmberError):
    """The queue database cannot be reached right now (answered 503 with Retry-After)."""

    retry_after = 2


# A worker that lost its lease twice on the same job (killed, machine lost) fails it for good.
MAX_ATTEMPTS = 2
LOST_TWICE = "its worker stopped responding twice (lease expired); not retried again"


class JobStore(Protocol):
    """The storage interface the server is written against (`SqliteStore`, `PgStore`). Every
    method is one short transaction; a backend that cannot reach its database raises
    StoreUnavailable. `shared`: other workers use the same store (claim by model, renew leases)."""

    shared: bool

    def close(self) -> None: ...
    def recover(self) -> int: ...
    def submit(self, *, owner: str, kind: str, model: str, params: dict[str, Any],
               init: bytes | None, mask: bytes | None, idem_key: str | None,
               body_hash: str | None, max_queued: int,
               batch_key: str | None = None) -> tuple[Job, bool]: ...  # fmt: skip
    def get(self, job_id: str) -> Job | None: ...
    def position(self, job: Job) -> int | None: ...
    def counts(self) -> dict[str, int]: ...
    def has_queued(self) -> bool: ...
    def claim_next(self, worker: str, *, models: list[str] | None, max_images: int,
                   lease: float) -> list[Job]: ...  # fmt: skip
    def renew(self, worker: str, job_ids: list[str], lease: float) -> list[str]: ...
    def release(self, worker: str, job_ids: list[str]) -> int: ...
    def reap(self) -> list[tuple[str, str, str | None]]: ...
    def active_job(self, owner: str) -> Job | None: ...
    def finish(self, job_id: str, status: str, error: str | None = None,
               worker: str | None = None) -> bool: ...  # fmt: skip
    def cancel(self, job_id: str) -> str | None: ...
    def retry(self, job_id: str) -> bool: ...
    def complete(self, job_id: str, images: list[tuple[ImageRow, bytes]],
                 worker: str | None = None) -> bool: ...  # fmt: skip
    def image(self, image_id: str) -> ImageRow | None: ...
    def image_bytes(self, image_id: str) -> bytes | None: ...
    def images(
        self, limit: int, before: int | None = None
    ) -> tuple[list[ImageRow], int | None]: ...
    def add_key(self, key_id: str, name: str, digest: str) -> None: ...
    def key_by_hash(self, digest: str) -> Any: ...  # a row: ["id"], ["name"], ...
    def list_keys(self) -> list[Any]: ...
    def revoke_key(self, key_id: str) -> bool: ...
    def has_keys(self) -> bool: ...
    def take_token(self, who: str, rate: float, burst: float) -> float: ...
    def publish(self, job_id: str, event: dict[str, Any]) -> None: ...
    def listen(self, deliver: Callable[[str, dict[str, Any]], None],
               stop: threading.Event) -> None: ...  # fmt: skip
    def ping(self) -> None: ...


def open_store(queue: str | None, data_dir: Path) -> JobStore:
    """The store a `--queue` URL names: None or sqlite:///DIR -> SqliteStore, postgresql://... ->
    PgStore (the schema is brought up to date first, under a lock, so workers may start together)."""
    if queue is None:
        return SqliteStore(data_dir)
    if queue.startswith("sqlite:///"):
        return SqliteStore(Path(queue.removeprefix("sqlite://")))
    if queue.startswith(("postgresql://", "postgres://")):
        from ember.server.pgstore import PgStore

        return PgStore(queue)
    raise EmberError(
        f"--queue {queue!r} is not a queue URL: use postgresql://USER@HOST:PORT/DB or sqlite:///DIR"
    )


def take_token(bucket: tuple[float, float] | None, now: float, rate: float, burst: float):
    """One token bucket step -> (new (tokens, time), seconds to wait; 0 = allowed).

    `rate` tokens per second refill up to `burst`; a new bucket starts full."""
    tokens, last = bucket if bucket is not None else (burst, now)
    tokens = min(burst, tokens + max(0.0, now - last) * rate)
    if tokens >= 1:
        return (tokens - 1, now), 0.0
    return (tokens, now), (1 - tokens) / rate


class SqliteStore:
    """Thread-safe access to the database; every method is one short transaction."""

    shared = False  # one process owns the file: no leases to renew, every model is this worker's

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.image_dir = self.data_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.data_dir / "ember.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for column in ("batch_key TEXT", "worker TEXT", "attempts INTEGER NOT NULL DEFAULT 0"):
            if column.split()[0] not in have:  # a data dir from before these columns
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        self._buckets: dict[str, tuple[float, float]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # -- jobs ---------------------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: jobs that were running when the process died are interrupted."""
        cur = self._tx(
            "UPDATE jobs SET status='interrupted', error='server stopped while running', "
            "finished=? WHERE status='running'",
            (time.time(),),
        )
        return cur.rowcount

    def submit(
        self,
        *,
        owner: str,
        kind: str,
        model: str,
        params: dict[str, Any],
        init: bytes | None,
        mask: bytes | None,
        idem_key: str | None,
        body_hash: str | None,
        max_queued: int,
        batch_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job -> (job, created). An idempotent retry returns the first job, not a new one.

        Raises IdempotencyConflict, or QueueFull when `max_queued` jobs are already waiting.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idem_key is not None:
                    row = self._db.execute(
                        "SELECT * FROM jobs WHERE owner=? AND idem_key=?", (owner, idem_key)
                    ).fetchone()
                    if row is not None:
                        self._db.execute("COMMIT")
                        if row["body_hash"] != body_hash:
                            raise IdempotencyConflict(idem_key)
                        return _job(row), False
                (queued,) = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status='queued'"
                ).fetchone()
                if queued >= max_queued:
                    self._db.execute("COMMIT")
                    raise QueueFull(queued)
                job_id = new_id()
                self._db.execute(
                    "INSERT INTO jobs (id, owner, idem_key, body_hash, kind, model, params, init, "
                    "mask, status, created, batch_key) VALUES (?,?,?,?,?,?,?,?,?,'queued',?,?)",
                    (job_id, owner, idem_key, body_hash, kind, model, json.dumps(params), init,
                     mask, time.time(), batch_key),
                )  # fmt: skip
                row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
                self._db.execute("COMMIT")
                return _job(row), True
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def get(self, job_id: str) -> Job | None:
        row = self._tx("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def position(self, job: Job) -> int | None:
        """Jobs ahead of a queued job (0 = next to run)."""
        if job.status != "queued":
            return None
        (n,) = self._tx(
            "SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq<?", (job.seq,)
        ).fetchone()
        return int(n)

    def counts(self) -> dict[str, int]:
        rows = self._tx("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    def has_queued(self) -> bool:
        return self._tx("SELECT 1 FROM jobs WHERE status='queued' LIMIT 1").fetchone() is not None

    def claim_next(
        self, worker: str, *, models: list[str] | None, max_images: int, lease: float
    ) -> list[Job]:
        """Claim the oldest queued job and the queued jobs that may share its U-Net batch (same
        batch key) while their images fit in `max_images` -> the claimed jobs, marked running."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                where, args = "status='queued'", ()
                if models is not None:
                    where += f" AND model IN ({','.join('?' * len(models))})"
                    args = tuple(models)
                head = self._db.execute(
                    f"SELECT * FROM jobs WHERE {where} ORDER BY seq LIMIT 1", args
                ).fetchone()
                if head is None:
                    self._db.execute("COMMIT")
                    return []
                mates = []
                if head["batch_key"] is not None and max_images > 0:
                    mates = self._db.execute(
                        "SELECT * FROM jobs WHERE status='queued' AND batch_key=? AND seq>? "
                        "ORDER BY seq LIMIT 256",
                        (head["batch_key"], head["seq"]),
                    ).fetchall()
                group = batch_group(_job(head), [_job(r) for r in mates], max_images)
                now = time.time()
                for job in group:
                    self._db.execute(
                        "UPDATE jobs SET status='running', started=?, worker=?, "
                        "attempts=attempts+1 WHERE id=?",
                        (now, worker, job.id),
                    )
                    job.status, job.started, job.worker = "running", now, worker
                self._db.execute("COMMIT")
                return group
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def renew(self, worker: str, job_ids: list[str], lease: float) -> list[str]:
        """-> the ids this worker still holds (a cancelled job is no longer held)."""
        if not job_ids:
            return []
        rows = self._tx(
            f"SELECT id FROM jobs WHERE status='running' AND worker=? AND id IN "
            f"({','.join('?' * len(job_ids))})",
            (worker, *job_ids),
        ).fetchall()
        return [r["id"] for r in rows]

    def release(self, worker: str, job_ids: list[str]) -> int:
        """Hand running jobs back to the queue (a stopping worker), keeping their place."""
        n = 0
        for job_id in job_ids:
            n += self._tx(
                "UPDATE jobs SET status='queued', started=NULL, worker=NULL, "
                "attempts=MAX(attempts-1, 0) WHERE id=? AND status='running' AND worker=?",
                (job_id, worker),
            ).rowcount
        return n

    def reap(self) -> list[tuple[str, str, str | None]]:
        """Jobs whose worker's lease expired; one process owns a SQLite file, so none (`recover`
        handles the jobs a killed process left running)."""
        return []

    def active_job(self, owner: str) -> Job | None:
        """The caller's oldest running (else queued) job, for A1111's /progress."""
        row = self._tx(
            "SELECT * FROM jobs WHERE owner=? AND status IN ('running','queued') "
            "ORDER BY status='queued', seq LIMIT 1",
            (owner,),
        ).fetchone()
        return _job(row) if row else None

    def finish(
        self, job_id: str, status: str, error: str | None = None, worker: str | None = None
    ) -> bool:
        """Set a final status on an unfinished job; False if it had already finished. With
        `worker`, only while that worker holds it running (not after it lost its lease)."""
        assert status in FINAL and status != "done"
        held = "status='running' AND worker=?" if worker else "status IN ('queued','running')"
        cur = self._tx(
            f"UPDATE jobs SET status=?, error=?, finished=? WHERE id=? AND {held}",
            (status, error, time.time(), job_id, *([worker] if worker else [])),
        )
        return cur.rowcount > 0

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job -> its previous status (None if it was not active)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] not in ("queued", "running"):
                self._db.execute("COMMIT")
                return None
            self._db.execute(
                "UPDATE jobs SET status='cancelled', error='cancelled', finished=? WHERE id=?",
                (time.time(), job_id),
            )
            self._db.execute("COMMIT")
            return row["status"]

    def retry(self, job_id: str) -> bool:
        """Re-queue an interrupted or failed job (at the back of the queue)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] not in ("interrupted", "failed"):
                self._db.execute("COMMIT")
                return False
            # A new seq puts it at the back; the id stays the same for the client.
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            cols = [k for k in row.keys() if k != "seq"]
            values = {**dict(row), "status": "queued", "error": None, "started": None,
                      "finished": None, "worker": None, "attempts": 0}  # fmt: skip
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(values[c] for c in cols),
            )
            self._db.execute("COMMIT")
            return True

    def complete(
        self, job_id: str, images: list[tuple[ImageRow, bytes]], worker: str | None = None
    ) -> bool:
        """Write the PNGs durably, then record them and mark the job done in one transaction.

        Returns False (and removes the files) if the job was cancelled meanwhile.
        """
        paths = []
        for row, data in images:
            paths.append(write_atomic(self.image_path(row.id), data))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE jobs SET status='done', images=?, finished=? WHERE id=? AND "
                "status='running'",
                (json.dumps([r.id for r, _ in images]), time.time(), job_id),
            )
            if not cur.rowcount:
                self._db.execute("COMMIT")
                for path in paths:
                    path.unlink(missing_ok=True)
                return False
            for row, _ in images:
                self._db.execute(
                    "INSERT INTO images (id, job_id, idx, width, height, seed, infotext, record, "
                    "created) VALUES (?,?,?,?,?,?,?,?,?)",
                    (row.id, row.job_id, row.idx, row.width, row.height, row.seed, row.infotext,
                     json.dumps(row.record), row.created),
                )  # fmt: skip
            self._db.execute("COMMIT")
        return True

    # -- images -------------------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        assert all(c in "0123456789abcdef" for c in image_id)
        return self.image_dir / f"{image_id}.png"

    def image(self, image_id: str) -> ImageRow | None:
        row = self._tx("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        return _image(row) if row else None

    def image_bytes(self, image_id: str) -> bytes | None:
        """The PNG file of a recorded image."""
        try:
            return self.image_path(image_id).read_bytes()
        except FileNotFoundError:
            return None

    def images(self, limit: int, before: int | None = None) -> tuple[list[ImageRow], int | None]:
        """Newest first; `before` is the cursor returned by the previous page."""
        rows = self._tx(
            "SELECT * FROM images WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (before if before is not None else 2**62, limit + 1),
        ).fetchall()
        cursor = rows[limit - 1]["seq"] if len(rows) > limit else None
        return [_image(r) for r in rows[:limit]], cursor

    # -- API keys -----------------------------------------------------------------------------

    def add_key(self, key_id: str, name: str, digest: str) -> None:
        self._tx(
            "INSERT INTO api_keys (id, name, hash, created) VALUES (?,?,?,?)",
            (key_id, name, digest, time.time()),
        )

    def key_by_hash(self, digest: str) -> sqlite3.Row | None:
        return self._tx(
            "SELECT * FROM api_keys WHERE hash=? AND revoked IS NULL", (digest,)
        ).fetchone()

    def list_keys(self) -> list[sqlite3.Row]:
        return self._tx("SELECT * FROM api_keys ORDER BY created").fetchall()

    def revoke_key(self, key_id: str) -> bool:
        cur = self._tx(
            "UPDATE api_keys SET revoked=? WHERE id=? AND revoked IS NULL", (time.time(), key_id)
        )
        return cur.rowcount > 0

    def has_keys(self) -> bool:
        return (
            self._tx("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1").fetchone() is not None
        )

    # -- rate limits, events, health -------------------------------------------------------------

    def take_token(self, who: str, rate: float, burst: float) -> float:
        """The per-identity token bucket (`take_token`) -> seconds to wait (0 = allowed). One
        process owns a SQLite store, so the buckets live in memory and restart full."""
        now = time.monotonic()
        with self._lock:
            self._buckets[who], wait = take_token(self._buckets.get(who), now, rate, burst)
            if len(self._buckets) > 10_000:  # bound memory: forget idle identities
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}
        return wait

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Send a job event to the other workers: there are none."""

    def listen(self, deliver, stop: threading.Event) -> None:
        """Events from other workers: none, so return at once."""

    def ping(self) -> None:
        self._tx("SELECT 1").fetchone()


class QueueFull(Exception):
    """The bounded queue is full; the client should retry later."""


def batch_group(head: Job, candidates: list[Job], max_images: int) -> list[Job]:
    """`head` and, in order, the candidates whose images still fit in `max_images`."""
    group, images = [head], head.params.get("batch", 1)
    for job in candidates:
        n = job.params.get("batch", 1)
        if images + n <= max_images:
            group.append(job)
            images += n
    return group


Store = SqliteStore  # the embedded default, under its historical name


def _job(row) -> Job:
    return Job(
        id=row["id"], seq=row["seq"], owner=row["owner"], kind=row["kind"], model=row["model"],
        params=json.loads(row["params"]), init=row["init"], mask=row["mask"],
        status=row["status"], error=row["error"], images=json.loads(row["images"]),
        created=row["created"], started=row["started"], finished=row["finished"],
        idem_key=row["idem_key"], body_hash=row["body_hash"], batch_key=row["batch_key"],
        worker=row["worker"], attempts=row["attempts"],
    )  # fmt: skip


def _image(row) -> ImageRow:
    return ImageRow(
        id=row["id"], job_id=row["job_id"], idx=row["idx"], width=row["width"],
        height=row["height"], seed=row["seed"], infotext=row["infotext"],
        record=json.loads(row["record"]), created=row["created"],
    )  # fmt: skip
