"""`ember serve`, `ember keys` and `ember db`: argparse subcommands wired into ember's parser by
`cli.py`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ember.errors import EmberError
from ember.provenance import add_provenance_args, provenance_from_args
from ember.settings import SERVER_LIMITS, add_addon_dirs


def default_data_dir() -> Path:
    return Path(os.environ.get("EMBER_DATA", Path.home() / ".local" / "share" / "ember" / "server"))


def add_queue_arg(p) -> None:
    p.add_argument(
        "--queue", default=os.environ.get("EMBER_QUEUE"),
        help="where jobs, images, keys and rate limits live: postgresql://USER@HOST:PORT/DB, "
        "shared by every worker started with the same URL, or sqlite:///DIR (default: SQLite in "
        "the data dir; also $EMBER_QUEUE)",
    )  # fmt: skip


def open_queue(args: argparse.Namespace):
    """The store of `--queue` / `--data-dir` (a data dir is made only for SQLite)."""
    from ember.server.jobs import open_store

    if args.queue is not None and args.data_dir and args.queue.startswith("sqlite:"):
        raise EmberError("give either --queue sqlite:///DIR or --data-dir, not both")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.queue is None:
        data_dir.mkdir(parents=True, exist_ok=True)
    return open_store(args.queue, data_dir)


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the A1111-compatible HTTP API, the job API and a web page",
        description="Run ember as an HTTP server (FastAPI on uvicorn). A non-loopback --host needs "
        "authentication: create a key with `ember keys create NAME` or pass --api-auth USER:PASS.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    p.add_argument("--model", help="model file/folder to load at start (default: bundled model)")
    p.add_argument("--models-dir", help="folder of further models offered by /sdapi/v1/sd-models")
    add_addon_dirs(p)
    p.add_argument("--vae", help="a replacement VAE for every model (a full SD VAE or TAESD)")
    p.add_argument(
        "--preview-vae", help="decode live previews with this VAE, e.g. TAESD (default: the "
        "model's own VAE)",
    )  # fmt: skip
    p.add_argument("--data-dir", help=f"queue database and gallery (default {default_data_dir()})")
    add_queue_arg(p)
    p.add_argument("--models", type=lambda v: tuple(n for n in v.split(",") if n), default=(),
                   metavar="NAME,...", help="on a shared queue, claim only jobs for these of this "
                   "worker's models (names, file names or hashes; default: every model it has)")  # fmt: skip
    p.add_argument("--lease", type=float, default=30.0,
                   help="seconds a worker holds a job on a shared queue without renewing it; a "
                   "dead worker's job runs elsewhere after this (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="fp32",
        help="weights' precision (default fp32: the server batches requests, and in fp32 an "
        "image is its solo run's to within 1/255 whatever it was batched with; bf16/auto is up to "
        "2x faster on large models)",
    )
    p.add_argument("--api-auth", help="USER:PASSWORD accepted as HTTP Basic (A1111's flag)")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="an origin (e.g. https://app.example) allowed to call the API from a browser; repeat",
    )
    p.add_argument("--max-queue", type=int, default=64, help="queued jobs before 503 (default 64)")
    p.add_argument("--rate-limit", type=float, default=0.0,
                   help="generation requests per minute per key (default 0: unlimited)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=SERVER_LIMITS.max_batch,
                   help="images per request and per U-Net batch (default %(default)s)")  # fmt: skip
    p.add_argument("--no-batching", action="store_true", help="one request per U-Net batch")
    add_provenance_args(p)
    p.add_argument("--max-steps", type=int, default=SERVER_LIMITS.max_steps,
                   help="per-request steps limit (default %(default)s)")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=SERVER_LIMITS.max_pixels,
                   help="per-image pixel limit (default %(default)s)")  # fmt: skip
    p.set_defaults(run=run_serve)


def build_settings(args: argparse.Namespace, data_dir: Path):
    """The server Settings of parsed `serve` arguments (separate so tests can use it)."""
    from ember.server.app import Settings
    from ember.server.auth import AuthConfig, is_loopback, parse_basic

    if not 1 <= args.port <= 65535:
        raise EmberError(f"port {args.port} is not allowed: use 1 to 65535")
    for name in ("max_queue", "max_batch", "max_steps", "max_pixels"):
        if getattr(args, name) < 1:
            raise EmberError(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.lease <= 3600:
        raise EmberError(f"--lease {args.lease} is not allowed: use 1 to 3600 seconds")
    basic = parse_basic(args.api_auth)
    from ember.server.jobs import open_store

    store = open_store(args.queue, data_dir)
    has_keys = store.has_keys()
    store.close()
    loopback = is_loopback(args.host)
    if not loopback and basic is None and not has_keys:
        raise EmberError(
            f"refusing to serve on {args.host} without authentication: create a key with "
            "`ember keys create NAME` or pass --api-auth USER:PASSWORD"
        )
    for origin in args.cors_origin:
        if origin == "null" or not origin.startswith(("http://", "https://")) and origin != "*":
            raise EmberError(f"--cors-origin {origin!r} must look like https://host[:port]")
    return Settings(
        data_dir=data_dir,
        auth=AuthConfig(basic=basic, required=not loopback),
        cors_origins=tuple(args.cors_origin),
        limits=dataclasses.replace(
            SERVER_LIMITS,
            max_steps=args.max_steps,
            max_pixels=args.max_pixels,
            max_batch=args.max_batch,
        ),  # fmt: skip
        max_queue=args.max_queue,
        rate_per_minute=args.rate_limit,
        batching=not args.no_batching,
        max_batch_images=args.max_batch,
        provenance=provenance_from_args(args),
        queue=args.queue,
        lease=args.lease,
        claim_models=args.models,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ember.catalog import models_dir, resolve_model_path
    from ember.server.app import create_app
    from ember.server.engine import ModelEngine
    from ember.server.ops import configure_logging

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.queue is not None and args.data_dir and args.queue.startswith("sqlite:"):
        raise EmberError("give either --queue sqlite:///DIR or --data-dir, not both")
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = build_settings(args, data_dir)
    configure_logging()
    extra = Path(args.models_dir) if args.models_dir else models_dir()
    engine = ModelEngine(
        [extra] if extra.exists() else [], resolve_model_path(args.model), dtype=args.dtype,
        lora_dir=_path(args.lora_dir), embeddings_dir=_path(args.embeddings_dir),
        vae=_path(args.vae), preview_vae=_path(args.preview_vae),
    )  # fmt: skip
    app = create_app(settings, engine)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def add_keys(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke the server's API keys")
    p.add_argument("--data-dir", help=f"the server's data dir (default {default_data_dir()})")
    add_queue_arg(p)
    actions = p.add_subparsers(dest="keys_action", metavar="ACTION", parser_class=type(p))
    c = actions.add_parser("create", help="create a key (shown once; only its hash is stored)")
    c.add_argument("name", help="who or what the key is for")
    actions.add_parser("list", help="list keys (ids, names, dates; never the keys)")
    r = actions.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    p.set_defaults(run=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    import time

    from ember.server.auth import create_key

    store = open_queue(args)
    try:
        action = getattr(args, "keys_action", None)
        if action == "create":
            key_id, secret = create_key(store, args.name)
            print(secret)
            print(f"key id {key_id}; send it as 'Authorization: Bearer <key>'. It is not shown "
                  "again.", file=__import__("sys").stderr)  # fmt: skip
        elif action == "list":
            for row in store.list_keys():
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"]))
                state = "revoked" if row["revoked"] else "active"
                print(f"{row['id']}  {state:7}  {when}  {row['name']}")
        elif action == "revoke":
            if not store.revoke_key(args.key_id):
                raise EmberError(f"no active key with id {args.key_id}")
            print(f"revoked {args.key_id}")
        else:
            raise EmberError("give an action: ember keys create NAME | list | revoke ID")
    finally:
        store.close()
    return 0


def add_db(sub) -> None:
    p = sub.add_parser("db", help="create or migrate a shared queue database")
    actions = p.add_subparsers(dest="db_action", metavar="ACTION", parser_class=type(p))
    u = actions.add_parser(
        "upgrade", help="create the schema or apply the migrations it lacks (idempotent)"
    )
    u.add_argument("url", help="postgresql://USER@HOST:PORT/DB or sqlite:///DIR")
    p.set_defaults(run=run_db)


def run_db(args: argparse.Namespace) -> int:
    if getattr(args, "db_action", None) != "upgrade":
        raise EmberError("give an action: ember db upgrade URL")
    url = args.url
    if url.startswith(("postgresql://", "postgres://")):
        from ember.server.pgstore import upgrade

        before, after = upgrade(url)
        print(f"schema version {after}" + (f" (was {before})" if before != after else ""))
        return 0
    if url.startswith("sqlite:///"):
        from ember.server.jobs import open_store

        Path(url.removeprefix("sqlite://")).mkdir(parents=True, exist_ok=True)
        open_store(url, Path()).close()  # SQLite's schema is brought up to date on opening
        print(f"schema up to date in {url}")
        return 0
    raise EmberError(
        f"{url!r} is not a queue URL: use postgresql://USER@HOST:PORT/DB or sqlite:///DIR"
    )
