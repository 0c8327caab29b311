-- ember's shared queue: jobs, the image gallery (PNG bytes in the database, so every worker serves
-- every image), API keys, rate-limit buckets and the latest progress of each running job.
-- Times are seconds since the epoch (double precision), as in the SQLite store; leases use the
-- database's clock so that workers with skewed clocks agree on when a lease expired.

CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    idem_key TEXT,
    body_hash TEXT,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    batch_key TEXT,
    params TEXT NOT NULL,
    init BYTEA,
    mask BYTEA,
    status TEXT NOT NULL,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_idem ON jobs (owner, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX jobs_queued ON jobs (seq) WHERE status = 'queued';
CREATE INDEX jobs_running ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_owner_active ON jobs (owner, seq) WHERE status IN ('queued', 'running');

CREATE TABLE images (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    infotext TEXT NOT NULL,
    record TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    png BYTEA NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT UNIQUE NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION
);

CREATE TABLE rate_buckets (
    who TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);

-- The newest progress event (with its preview) of each running job: NOTIFY payloads are capped
-- at 8000 bytes, so a preview travels through this row and the notification only names the job.
CREATE TABLE job_progress (
    job_id TEXT PRIMARY KEY,
    event TEXT NOT NULL
);
