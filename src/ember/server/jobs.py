"""The durable job queue and image gallery: one SQLite database (WAL) in the data dir.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    finished REAL
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


class Store:
    """Thread-safe access to the database; every method is one short transaction."""

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
                    "mask, status, created) VALUES (?,?,?,?,?,?,?,?,?,'queued',?)",
                    (job_id, owner, idem_key, body_hash, kind, model, json.dumps(params), init,
                     mask, time.time()),
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

    def queued(self, limit: int = 256) -> list[Job]:
        rows = self._tx(
            "SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [_job(r) for r in rows]

    def claim(self, job_ids: list[str]) -> list[str]:
        """Mark queued jobs running; returns the ids actually claimed (a cancel may have won)."""
        claimed = []
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for job_id in job_ids:
                cur = self._db.execute(
                    "UPDATE jobs SET status='running', started=? WHERE id=? AND status='queued'",
                    (now, job_id),
                )
                if cur.rowcount:
                    claimed.append(job_id)
            self._db.execute("COMMIT")
        return claimed

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Set a final status on an unfinished job; False if it had already finished."""
        assert status in FINAL and status != "done"
        cur = self._tx(
            "UPDATE jobs SET status=?, error=?, finished=? WHERE id=? AND status IN "
            "('queued','running')",
            (status, error, time.time(), job_id),
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
                      "finished": None}  # fmt: skip
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(values[c] for c in cols),
            )
            self._db.execute("COMMIT")
            return True

    def complete(self, job_id: str, images: list[tuple[ImageRow, bytes]]) -> bool:
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


class QueueFull(Exception):
    """The bounded queue is full; the client should retry later."""


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], seq=row["seq"], owner=row["owner"], kind=row["kind"], model=row["model"],
        params=json.loads(row["params"]), init=row["init"], mask=row["mask"],
        status=row["status"], error=row["error"], images=json.loads(row["images"]),
        created=row["created"], started=row["started"], finished=row["finished"],
        idem_key=row["idem_key"], body_hash=row["body_hash"],
    )  # fmt: skip


def _image(row: sqlite3.Row) -> ImageRow:
    return ImageRow(
        id=row["id"], job_id=row["job_id"], idx=row["idx"], width=row["width"],
        height=row["height"], seed=row["seed"], infotext=row["infotext"],
        record=json.loads(row["record"]), created=row["created"],
    )  # fmt: skip
