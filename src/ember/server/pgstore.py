"""The shared queue: `SqliteStore`'s interface on PostgreSQL, for several `ember serve` workers.

Claims take the oldest queued job and its batch-mates with `FOR UPDATE SKIP LOCKED`, so two workers
never claim the same job and never wait for each other. A claimed job carries a lease (`lease_until`,
on the database's clock) that its worker renews while it runs; any worker re-queues a job whose
lease expired (`reap`), once, then fails it (`MAX_ATTEMPTS`). A late `complete` from a worker that
lost its lease changes nothing (`worker = %s` in its WHERE), so a job is done exactly once.

Events (progress, done, cancelled, interrupt requests) travel over LISTEN/NOTIFY on one channel; a
progress event's preview is too large for a notification (8000 bytes), so it waits in
`job_progress` and the notification only says there is one. Images are stored in the database as
PNG bytes, so every worker serves every image with no shared file system.

Any connection failure surfaces as `StoreUnavailable` (503 with Retry-After); the pool replaces
broken connections, so the workers reconnect on their own when the database is back.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ember.server.jobs import (
    LOST_TWICE,
    MAX_ATTEMPTS,
    IdempotencyConflict,
    ImageRow,
    Job,
    QueueFull,
    StoreUnavailable,
    _image,
    _job,
    batch_group,
    new_id,
    take_token,
)

log = logging.getLogger("ember.server")
CHANNEL = "ember_events"
NOW = (
    "extract(epoch from clock_timestamp())::float8"  # the database's clock, shared by every worker
)
MIGRATION_LOCK = 0x656D626572  # pg_advisory_xact_lock key: "ember"


def migrations() -> list[tuple[int, str]]:
    """The schema's versioned SQL files (`NNNN_name.sql`), in order."""
    folder = resources.files("ember.server") / "sql" / "postgresql"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(int(f.name.split("_", 1)[0]), f.read_text()) for f in files]


def upgrade(url: str) -> tuple[int, int]:
    """Apply the migrations the database lacks, each in its own transaction -> (from, to) version.

    Idempotent, and safe when several workers start at once: an advisory lock serialises them."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS ember_schema (version INTEGER PRIMARY KEY, "
                "applied DOUBLE PRECISION NOT NULL)"
            )
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                (before,) = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM ember_schema"
                ).fetchone()
            version = before
            for number, sql in migrations():
                if number <= version:
                    continue
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    (current,) = conn.execute(
                        "SELECT COALESCE(MAX(version), 0) FROM ember_schema"
                    ).fetchone()
                    if number > current:  # another worker may have applied it meanwhile
                        conn.execute(sql)
                        conn.execute(
                            "INSERT INTO ember_schema VALUES (%s, %s)", (number, time.time())
                        )
                version = number
            return before, version
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot reach the queue database: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _db(method):
    """Connection trouble -> StoreUnavailable, so a handler answers 503 and the worker retries.

    After a failure the store answers StoreUnavailable at once for `PgStore.backoff` seconds instead
    of making every request wait for the pool's timeout (the handlers run on the event loop)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kw):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("the queue database is unavailable; retrying")
        try:
            return method(self, *args, **kw)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            self._down_until = time.monotonic() + self.backoff
            raise StoreUnavailable(
                f"the queue database is unavailable: {_first_line(exc)}"
            ) from None

    return wrapped


class PgStore:
    """The queue, gallery, keys and rate limits in one PostgreSQL database shared by every worker."""

    shared = True
    backoff = 0.5  # seconds of fast 503s after a connection failure

    def __init__(self, url: str, *, pool_size: int = 8, timeout: float = 2.0) -> None:
        upgrade(url)
        self.url = url
        self._down_until = 0.0
        self.origin = new_id()  # tags this process's notifications so it skips its own
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=timeout, open=True,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 5},
            check=ConnectionPool.check_connection, reconnect_timeout=0,
        )  # fmt: skip

    def close(self) -> None:
        self._pool.close()

    def _one(self, sql: str, args: Any = ()) -> dict | None:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Any = ()) -> list[dict]:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def _count(self, sql: str, args: Any = ()) -> int:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).rowcount

    # -- jobs ---------------------------------------------------------------------------------

    def recover(self) -> int:
        """Other workers may be running jobs: an expired lease, not a restart, frees a job."""
        return 0

    @_db
    def submit(
        self, *, owner: str, kind: str, model: str, params: dict[str, Any], init: bytes | None,
        mask: bytes | None, idem_key: str | None, body_hash: str | None, max_queued: int,
        batch_key: str | None = None,
    ) -> tuple[Job, bool]:  # fmt: skip
        """As `SqliteStore.submit`; the unique (owner, idem_key) index settles a race between two
        workers that got the same Idempotency-Key at once."""
        with self._pool.connection() as conn:
            if idem_key is not None:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE owner=%s AND idem_key=%s", (owner, idem_key)
                ).fetchone()
                if row is not None:
                    return self._same_request(row, body_hash), False
            (queued,) = (
                conn.execute("SELECT COUNT(*) AS n FROM jobs WHERE status='queued'")
                .fetchone()
                .values()
            )
            if queued >= max_queued:
                raise QueueFull(queued)
            row = conn.execute(
                "INSERT INTO jobs (id, owner, idem_key, body_hash, kind, model, batch_key, params, "
                "init, mask, status, created) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'queued',%s) "
                "ON CONFLICT (owner, idem_key) WHERE idem_key IS NOT NULL DO NOTHING RETURNING *",
                (new_id(), owner, idem_key, body_hash, kind, model, batch_key, json.dumps(params),
                 init, mask, time.time()),
            ).fetchone()  # fmt: skip
            if row is None:  # another worker inserted the same key a moment ago
                row = conn.execute(
                    "SELECT * FROM jobs WHERE owner=%s AND idem_key=%s", (owner, idem_key)
                ).fetchone()
                return self._same_request(row, body_hash), False
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._payload(row["id"], "queued")))
            return _job(row), True

    @staticmethod
    def _same_request(row: dict, body_hash: str | None) -> Job:
        if row["body_hash"] != body_hash:
            raise IdempotencyConflict(row["idem_key"])
        return _job(row)

    @_db
    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id=%s", (job_id,))
        return _job(row) if row else None

    @_db
    def position(self, job: Job) -> int | None:
        if job.status != "queued":
            return None
        row = self._one(
            "SELECT COUNT(*) AS n FROM jobs WHERE status='queued' AND seq<%s", (job.seq,)
        )
        return int(row["n"])

    @_db
    def counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    @_db
    def has_queued(self) -> bool:
        return self._one("SELECT 1 AS x FROM jobs WHERE status='queued' LIMIT 1") is not None

    @_db
    def claim_next(
        self, worker: str, *, models: list[str] | None, max_images: int, lease: float
    ) -> list[Job]:
        """The oldest queued job this worker can run and its batch-mates, locked with SKIP LOCKED
        (rows another worker is claiming are passed over, never waited for), marked running under
        this worker's lease in the same transaction."""
        with self._pool.connection() as conn, conn.transaction():
            model_filter = "AND model = ANY(%s)" if models is not None else ""
            head = conn.execute(
                f"SELECT * FROM jobs WHERE status='queued' {model_filter} ORDER BY seq LIMIT 1 "
                "FOR UPDATE SKIP LOCKED",
                (models,) if models is not None else (),
            ).fetchone()
            if head is None:
                return []
            mates = []
            if head["batch_key"] is not None and max_images > 0:
                mates = conn.execute(
                    "SELECT * FROM jobs WHERE status='queued' AND batch_key=%s AND seq>%s "
                    "ORDER BY seq LIMIT 256 FOR UPDATE SKIP LOCKED",
                    (head["batch_key"], head["seq"]),
                ).fetchall()
            group = batch_group(_job(head), [_job(r) for r in mates], max_images)
            now = time.time()
            conn.execute(
                f"UPDATE jobs SET status='running', started=%s, worker=%s, "
                f"lease_until={NOW} + %s, attempts=attempts+1 WHERE id = ANY(%s)",
                (now, worker, lease, [j.id for j in group]),
            )
            for job in group:
                job.status, job.started, job.worker = "running", now, worker
                job.attempts += 1
            return group

    @_db
    def renew(self, worker: str, job_ids: list[str], lease: float) -> list[str]:
        """Extend this worker's leases -> the ids it still holds (not cancelled, not reaped)."""
        if not job_ids:
            return []
        rows = self._all(
            f"UPDATE jobs SET lease_until={NOW} + %s WHERE id = ANY(%s) AND status='running' "
            "AND worker=%s RETURNING id",
            (lease, job_ids, worker),
        )
        return [r["id"] for r in rows]

    @_db
    def release(self, worker: str, job_ids: list[str]) -> int:
        """A stopping worker hands its jobs back; they keep their place and lose no attempt."""
        n = self._count(
            "UPDATE jobs SET status='queued', started=NULL, worker=NULL, lease_until=NULL, "
            "attempts=GREATEST(attempts-1, 0) WHERE id = ANY(%s) AND status='running' "
            "AND worker=%s",
            (job_ids, worker),
        )
        if n:
            self.publish(job_ids[0], {"type": "queued"})  # wake an idle worker
        return n

    @_db
    def reap(self) -> list[tuple[str, str, str | None]]:
        """Jobs whose lease expired (their worker died): re-queued at their old place, or failed
        with `LOST_TWICE` after `MAX_ATTEMPTS` -> [(id, new status, error)]."""
        rows = self._all(
            "UPDATE jobs SET "
            "status = CASE WHEN attempts >= %(max)s THEN 'failed' ELSE 'queued' END, "
            "error = CASE WHEN attempts >= %(max)s THEN %(why)s ELSE NULL END, "
            f"finished = CASE WHEN attempts >= %(max)s THEN {NOW} ELSE NULL END, "
            "started = NULL, worker = NULL, lease_until = NULL "
            f"WHERE status='running' AND lease_until < {NOW} RETURNING id, status, error",
            {"max": MAX_ATTEMPTS, "why": LOST_TWICE},
        )
        return [(r["id"], r["status"], r["error"]) for r in rows]

    @_db
    def active_job(self, owner: str) -> Job | None:
        row = self._one(
            "SELECT * FROM jobs WHERE owner=%s AND status IN ('running','queued') "
            "ORDER BY status='queued', seq LIMIT 1",
            (owner,),
        )
        return _job(row) if row else None

    @_db
    def finish(
        self, job_id: str, status: str, error: str | None = None, worker: str | None = None
    ) -> bool:
        held = "status='running' AND worker=%s" if worker else "status IN ('queued','running')"
        with self._pool.connection() as conn:
            n = conn.execute(
                "UPDATE jobs SET status=%s, error=%s, finished=%s, lease_until=NULL WHERE id=%s "
                f"AND {held}",
                (status, error, time.time(), job_id, *([worker] if worker else [])),
            ).rowcount
            if n:
                conn.execute("DELETE FROM job_progress WHERE job_id=%s", (job_id,))
        return n > 0

    @_db
    def cancel(self, job_id: str) -> str | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE jobs AS j SET status='cancelled', error='cancelled', finished=%s, "
                "lease_until=NULL FROM (SELECT id, status FROM jobs WHERE id=%s FOR UPDATE) AS old "
                "WHERE j.id = old.id AND old.status IN ('queued','running') RETURNING old.status",
                (time.time(), job_id),
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM job_progress WHERE job_id=%s", (job_id,))
        return row["status"] if row else None

    @_db
    def retry(self, job_id: str) -> bool:
        """Re-queue an interrupted or failed job at the back of the queue (a new seq)."""
        n = self._count(
            "UPDATE jobs SET seq=nextval(pg_get_serial_sequence('jobs','seq')), status='queued', "
            "error=NULL, started=NULL, finished=NULL, worker=NULL, lease_until=NULL, attempts=0 "
            "WHERE id=%s AND status IN ('interrupted','failed')",
            (job_id,),
        )
        if n:
            self.publish(job_id, {"type": "queued"})
        return n > 0

    @_db
    def complete(
        self, job_id: str, images: list[tuple[ImageRow, bytes]], worker: str | None = None
    ) -> bool:
        """Record the images (PNG bytes) and mark the job done in one transaction; False if the job
        was cancelled or this worker lost its lease meanwhile (then nothing is written)."""
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                "UPDATE jobs SET status='done', images=%s, finished=%s, lease_until=NULL "
                "WHERE id=%s AND status='running' AND (worker=%s OR %s::text IS NULL)",
                (json.dumps([r.id for r, _ in images]), time.time(), job_id, worker, worker),
            )
            if not cur.rowcount:
                return False
            for row, data in images:
                conn.execute(
                    "INSERT INTO images (id, job_id, idx, width, height, seed, infotext, record, "
                    "created, png) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (row.id, row.job_id, row.idx, row.width, row.height, row.seed, row.infotext,
                     json.dumps(row.record), row.created, data),
                )  # fmt: skip
            conn.execute("DELETE FROM job_progress WHERE job_id=%s", (job_id,))
        return True

    # -- images -------------------------------------------------------------------------------

    @_db
    def image(self, image_id: str) -> ImageRow | None:
        row = self._one(
            "SELECT id, job_id, idx, width, height, seed, infotext, record, created FROM images "
            "WHERE id=%s",
            (image_id,),
        )
        return _image(row) if row else None

    @_db
    def image_bytes(self, image_id: str) -> bytes | None:
        row = self._one("SELECT png FROM images WHERE id=%s", (image_id,))
        return bytes(row["png"]) if row else None

    @_db
    def images(self, limit: int, before: int | None = None) -> tuple[list[ImageRow], int | None]:
        rows = self._all(
            "SELECT seq, id, job_id, idx, width, height, seed, infotext, record, created "
            "FROM images WHERE seq < %s ORDER BY seq DESC LIMIT %s",
            (before if before is not None else 2**62, limit + 1),
        )
        cursor = rows[limit - 1]["seq"] if len(rows) > limit else None
        return [_image(r) for r in rows[:limit]], cursor

    # -- API keys -----------------------------------------------------------------------------

    @_db
    def add_key(self, key_id: str, name: str, digest: str) -> None:
        self._count(
            "INSERT INTO api_keys (id, name, hash, created) VALUES (%s,%s,%s,%s)",
            (key_id, name, digest, time.time()),
        )

    @_db
    def key_by_hash(self, digest: str) -> dict | None:
        return self._one("SELECT * FROM api_keys WHERE hash=%s AND revoked IS NULL", (digest,))

    @_db
    def list_keys(self) -> list[dict]:
        return self._all("SELECT * FROM api_keys ORDER BY created")

    @_db
    def revoke_key(self, key_id: str) -> bool:
        return bool(
            self._count(
                "UPDATE api_keys SET revoked=%s WHERE id=%s AND revoked IS NULL",
                (time.time(), key_id),
            )
        )

    @_db
    def has_keys(self) -> bool:
        return self._one("SELECT 1 AS x FROM api_keys WHERE revoked IS NULL LIMIT 1") is not None

    # -- rate limits, events, health ----------------------------------------------------------

    @_db
    def take_token(self, who: str, rate: float, burst: float) -> float:
        """The same token bucket as SqliteStore's, one row per identity, locked while it is
        updated, so the limit holds across every worker."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                f"INSERT INTO rate_buckets VALUES (%s, %s, {NOW}) ON CONFLICT DO NOTHING",
                (who, burst),
            )
            row = conn.execute(
                f"SELECT tokens, updated, {NOW} AS now FROM rate_buckets WHERE who=%s FOR UPDATE",
                (who,),
            ).fetchone()
            (tokens, updated), wait = take_token(
                (row["tokens"], row["updated"]), row["now"], rate, burst
            )
            conn.execute(
                "UPDATE rate_buckets SET tokens=%s, updated=%s WHERE who=%s",
                (tokens, updated, who),
            )
            return wait

    def _payload(self, job_id: str, kind: str, **extra: Any) -> str:
        """A notification (under PostgreSQL's 8000 bytes: a long error is left to the job's row)."""
        payload = json.dumps({"job": job_id, "type": kind, "origin": self.origin, **extra})
        if len(payload) > 7000:
            payload = json.dumps({"job": job_id, "type": kind, "origin": self.origin})
        return payload

    @_db
    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Tell every worker about a job event (the preview of a progress event goes by table)."""
        small = {k: v for k, v in event.items() if k != "preview"}
        with self._pool.connection() as conn:
            if event["type"] == "progress":
                conn.execute(
                    "INSERT INTO job_progress VALUES (%s, %s) ON CONFLICT (job_id) DO UPDATE "
                    "SET event = EXCLUDED.event",
                    (job_id, json.dumps(event)),
                )
                small["has_preview"] = "preview" in event
            small.pop("type")
            conn.execute(
                "SELECT pg_notify(%s, %s)", (CHANNEL, self._payload(job_id, event["type"], **small))
            )

    def listen(self, deliver, stop: threading.Event) -> None:
        """Deliver other workers' events as `deliver(job_id, event)` until `stop` is set; runs in
        its own thread, on its own connection, and reconnects when the database comes back (events
        sent meanwhile are lost; readers re-read the job's row, which is never lost)."""
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._receive(note.payload, deliver)
            except psycopg.Error as exc:
                log.warning("event listener: %s; reconnecting", _first_line(exc))
                stop.wait(1.0)

    def _receive(self, payload: str, deliver) -> None:
        try:
            message = json.loads(payload)
            if message.pop("origin") == self.origin:
                return
            job_id = message.pop("job")
            if message.pop("has_preview", False):
                row = self._one("SELECT event FROM job_progress WHERE job_id=%s", (job_id,))
                if row is not None:
                    message = json.loads(row["event"])
            deliver(job_id, message)
        except Exception:  # noqa: BLE001 - one bad notification must not stop the listener
            log.exception("event listener: cannot deliver %r", payload[:200])

    @_db
    def ping(self) -> None:
        self._one("SELECT 1 AS x")
