"""The FastAPI application: native job API, gallery, web page, and the A1111 routes (`a1111.py`).

`create_app(settings, engine)` builds everything around one shared engine. Every route passes through
`Guard` (origin check, authentication, body-size cap) before FastAPI sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model

from ember.catalog import lookup
from ember.errors import EmberError
from ember.images import image_array
from ember.provenance import Provenance
from ember.server import a1111, ops
from ember.server.auth import AuthConfig, RateLimiter, check_credentials, origin_allowed
from ember.server.engine import Engine
from ember.server.jobs import (
    FINAL,
    IdempotencyConflict,
    Job,
    QueueFull,
    StoreUnavailable,
    open_store,
)
from ember.server.uploads import decode_base64, decode_image
from ember.server.worker import Broker, Worker, job_batch_key, new_worker_id
from ember.settings import (
    FIELD_TYPES,
    FIELDS,
    SERVER_LIMITS,
    GenerationParams,
    Limits,
    LoraChoice,
    params_from_dict,
    resolve,
    validate,
)

STATIC = Path(__file__).parent / "static"


@dataclass
class Settings:
    data_dir: Path
    auth: AuthConfig = AuthConfig()
    cors_origins: tuple[str, ...] = ()
    limits: Limits = SERVER_LIMITS
    max_queue: int = 64
    rate_per_minute: float = 0.0  # 0 = unlimited
    rate_burst: int | None = None
    batching: bool = True
    batch_window: float = 0.05
    max_batch_images: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance = Provenance()  # what every image carries (`ember.provenance`)
    queue: str | None = (
        None  # None: SQLite in data_dir; postgresql://...: a queue shared by workers
    )
    lease: float = 30.0  # seconds a worker holds a job without renewing (shared queue)
    claim_models: tuple[str, ...] = ()  # the models whose jobs this worker claims (): all it has


class ServiceUnavailable(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRequests(ServiceUnavailable):
    pass


class Server:
    """Shared state of one running server."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.engine = engine
        self.store = open_store(settings.queue, settings.data_dir)
        self.store.recover()
        self.broker = Broker()
        if self.store.shared:
            self.broker.relay = self.store.publish
        worker_id = new_worker_id()
        self.metrics = ops.Metrics(self.store, worker_id)
        try:
            self.worker = Worker(
                self.store, engine, self.broker, batching=settings.batching,
                batch_window=settings.batch_window, max_batch_images=settings.max_batch_images,
                provenance=settings.provenance, lease=settings.lease, worker_id=worker_id,
                metrics=self.metrics, claim_models=settings.claim_models,
            )  # fmt: skip
        except EmberError:
            self.store.close()
            raise
        self.rate = RateLimiter(settings.rate_per_minute, settings.rate_burst, self.store)
        self.options: dict[str, Any] = dict(settings.options)
        self.lifespans = 0

    def params(self, params: GenerationParams) -> GenerationParams:
        """A request's settings with the current model's defaults, checked against this server's
        limits (EmberError, answered 422, for anything out of range)."""
        return validate(resolve(params, self.engine.config()), self.limits)

    async def submit(
        self,
        request: Request,
        *,
        kind: str,
        params: GenerationParams,
        init: Image.Image | None,
        mask: Image.Image | None,
        model: str | None,
        idem_key: str | None,
        body_hash: str | None,
    ) -> Job:
        who = request.state.who
        wait = await asyncio.to_thread(self.rate.take, who)
        if wait > 0:
            raise TooManyRequests(f"rate limit exceeded for {who}", int(wait) + 1)
        params = self.params(params)
        self.engine.check_loras(params)
        size = (params.width, params.height)
        init_png = mask_png = None
        if kind in ("img2img", "inpaint"):
            if init is None:
                raise EmberError(f"{kind} needs an init image")
            init_png = _png(image_array(init, "RGB", size))
            if kind == "inpaint":
                if mask is None:
                    raise EmberError("inpaint needs a mask (white = repaint)")
                mask_png = _png(image_array(mask, "L", size))
        title = self.engine.current().title
        if model:
            title = lookup(self.engine.models(), model).title
        record = dataclasses.asdict(params)
        try:
            job, created = await asyncio.to_thread(
                self.store.submit, owner=who, kind=kind, model=title, params=record, init=init_png, mask=mask_png,
                idem_key=idem_key, body_hash=body_hash, max_queued=self.settings.max_queue,
                batch_key=job_batch_key(title, kind, params),
            )  # fmt: skip
        except QueueFull:
            raise ServiceUnavailable("the queue is full; retry later", 5) from None
        if created:
            self.worker.wake()
        return job

    async def wait(self, job_id: str) -> Job:
        """Until the job reaches a final state, wherever it runs; a database outage only delays
        the answer (the job's row is durable)."""
        q = self.broker.subscribe(job_id)
        try:
            while True:
                try:
                    job = await asyncio.to_thread(self.store.get, job_id)
                except StoreUnavailable:
                    job = None
                if job is not None and job.status in FINAL:
                    return job
                try:
                    await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    pass
        finally:
            self.broker.unsubscribe(job_id, q)

    def job_view(self, job: Job) -> dict[str, Any]:
        view = {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "position": self.store.position(job),
            "error": job.error,
            "images": job.images,
            "params": job.params,
            "model": job.model,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
        }
        latest = self.broker.latest.get(job.id)
        if latest and job.status == "running":
            view["step"], view["total"] = latest["step"], latest["total"]
        return view


def _png(arr) -> bytes:
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the guard: origin, auth, body size (pure ASGI, so it covers every route and static file)


class Guard:
    def __init__(self, app, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        allowed = server.settings.cors_origins
        origin = headers.get("origin")
        if not origin_allowed(origin, headers.get("host"), allowed):
            await _reject(send, 403, f"origin {origin} is not allowed")
            return
        cors = []
        if origin is not None and (origin in allowed or "*" in allowed):
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin")]  # fmt: skip
            if scope["method"] == "OPTIONS":
                await _reject(send, 204, None, cors + [
                    (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type, idempotency-key"),
                    (b"access-control-max-age", b"600"),
                ])  # fmt: skip
                return
        try:  # off the event loop: the store may be a database across the network
            who = await asyncio.to_thread(
                check_credentials, headers.get("authorization"), server.store, server.settings.auth
            )
        except StoreUnavailable as exc:
            if scope["path"] != "/healthz":
                await _reject(send, 503, str(exc), cors + _retry_after(exc))
                return
            who = "unverified"  # liveness must not depend on the database; /readyz does
        if who is None:
            challenge = b'Basic realm="ember", charset="UTF-8"'
            await _reject(send, 401, "missing or invalid credentials",
                          cors + [(b"www-authenticate", challenge)])  # fmt: skip
            return
        scope.setdefault("state", {})["who"] = who
        limit = server.limits.max_body_bytes
        try:
            if int(headers.get("content-length", "0")) > limit:
                await _reject(send, 413, f"request body over {limit} bytes", cors)
                return
        except ValueError:
            await _reject(send, 400, "bad Content-Length", cors)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
            return message

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_cors)
        except BodyTooLarge:
            await _reject(send, 413, f"request body over {limit} bytes", cors)


class BodyTooLarge(Exception):
    pass


def _retry_after(exc: StoreUnavailable) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(exc.retry_after).encode())]


async def _reject(send, status: int, detail: str | None, headers: list | None = None) -> None:
    body = b"" if detail is None else json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json")] + list(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# native API models


class LoraItem(BaseModel):
    """A LoRA of a job: `weight` for both models, or `te_weight` / `unet_weight` for each."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1000, description="a name in the server's LoRA folder")
    weight: float = Field(1.0, allow_inf_nan=False)
    te_weight: float | None = Field(None, allow_inf_nan=False)
    unet_weight: float | None = Field(None, allow_inf_nan=False)

    def choice(self) -> LoraChoice:
        te = self.weight if self.te_weight is None else self.te_weight
        return LoraChoice(
            self.name, te, self.weight if self.unet_weight is None else self.unet_weight
        )


# Where the job API's default differs from the CLI's: a job without a seed gets a random one.
HTTP_DEFAULTS = {"seed": -1}


def _job_request_model() -> type[BaseModel]:
    """The job API's request body: every `GenerationParams` field, typed, ranged and documented from
    its metadata (`ember.settings`), beside the mode, the input images and the model."""
    fields: dict[str, Any] = {
        "mode": (Literal["txt2img", "img2img", "inpaint"], "txt2img"),
    }
    for name, f in FIELDS.items():
        meta, hint = f.metadata, FIELD_TYPES[name]
        if name == "loras":
            fields[name] = (list[LoraItem], Field([], description=meta["help"], max_length=64))
            continue
        kw: dict[str, Any] = {"description": meta["help"]}
        if meta["lo"] is not None:
            kw["ge"] = meta["lo"]
        if meta["hi"] is not None:
            kw["le"] = meta["hi"]
        if meta["max_length"] is not None:
            kw["max_length"] = meta["max_length"]
        if hint in (float, float | None):
            kw["allow_inf_nan"] = False
        fields[name] = (hint, Field(HTTP_DEFAULTS.get(name, f.default), **kw))
    fields["init_image"] = (str | None, Field(None, description="base64 PNG, JPEG or WebP"))
    fields["mask"] = (str | None, Field(None, description="base64 image; white = repaint"))
    fields["model"] = (str | None, Field(None, max_length=1000))
    return create_model(
        "JobRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="A generation job. Unknown fields are refused (422 naming them).",
        **fields,
    )


JobRequest = _job_request_model()


class JobView(BaseModel):
    id: str
    kind: str
    status: str
    position: int | None
    error: str | None
    images: list[str]
    params: dict[str, Any]
    model: str
    created: float
    started: float | None
    finished: float | None
    step: int | None = None
    total: int | None = None


class ImageView(BaseModel):
    id: str
    job_id: str
    index: int
    width: int
    height: int
    seed: int
    infotext: str
    params: dict[str, Any]
    url: str


class ImagePage(BaseModel):
    images: list[ImageView]
    next: int | None


ERRORS = {401: {"description": "not authorised"}, 403: {"description": "origin refused"},
          413: {"description": "body too large"}, 422: {"description": "bad input"}}  # fmt: skip


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    """The ASGI app; the worker thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    server = Server(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Test harnesses may nest lifespans: only the outermost starts and stops the worker.
        server.lifespans += 1
        if server.lifespans == 1:
            server.broker.loop = asyncio.get_running_loop()
            server.worker.start()
        try:
            yield
        finally:
            server.lifespans -= 1
            if server.lifespans == 0:
                server.worker.stop()
                server.store.close()  # a database pool's connections, the SQLite file

    app = FastAPI(title="ember", version="1", lifespan=lifespan, responses=ERRORS)
    app.state.server = server

    @app.exception_handler(EmberError)
    async def ember_error(request: Request, exc: EmberError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        status = 429 if isinstance(exc, TooManyRequests) else 503
        return JSONResponse({"detail": str(exc)}, status_code=status,
                            headers={"Retry-After": str(exc.retry_after)})  # fmt: skip

    @app.exception_handler(StoreUnavailable)
    async def store_away(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")}
                  for e in exc.errors()]  # fmt: skip
        return JSONResponse({"detail": errors}, status_code=422)

    app.include_router(a1111.router)
    app.include_router(ops.router)
    app.add_middleware(Guard, server=server)

    @app.post("/v1/jobs", response_model=JobView, status_code=202, tags=["jobs"],
              responses={429: {"description": "rate limited"}, 503: {"description": "queue full"}})  # fmt: skip
    async def create_job(
        request: Request,
        req: JobRequest,
        idempotency_key: str | None = Header(None, max_length=200),
    ) -> JSONResponse:
        body_hash = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
        init = mask = None
        if req.mode != "txt2img":
            if req.init_image is None:
                raise EmberError(f"mode {req.mode} needs init_image")
            init = decode_image(decode_base64(req.init_image, "init_image"), server.limits,
                                "init_image")  # fmt: skip
        if req.mode == "inpaint":
            if req.mask is None:
                raise EmberError("mode inpaint needs mask")
            mask = decode_image(decode_base64(req.mask, "mask"), server.limits, "mask")
        fields = req.model_dump(exclude={"mode", "init_image", "mask", "model", "loras"})
        params = params_from_dict(fields | {"loras": [item.choice() for item in req.loras]})
        try:
            job = await server.submit(
                request, kind=req.mode, params=params, init=init, mask=mask, model=req.model,
                idem_key=idempotency_key, body_hash=body_hash,
            )  # fmt: skip
        except IdempotencyConflict:
            raise HTTPException(
                422, "Idempotency-Key was already used with a different request body"
            ) from None
        return JSONResponse(await asyncio.to_thread(server.job_view, job), status_code=202)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        job = server.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return server.job_view(job)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        before = server.store.cancel(job_id)
        job = server.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if before is not None:
            server.worker.cancel(job_id)
            server.broker.publish(job_id, {"type": "cancelled"})
        elif job.status != "cancelled":
            raise HTTPException(409, f"job {job_id} is already {job.status}")
        return server.job_view(job)

    @app.post("/v1/jobs/{job_id}/retry", response_model=JobView, tags=["jobs"])
    def retry_job(job_id: str) -> dict[str, Any]:
        if not server.store.retry(job_id):
            job = server.store.get(job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            raise HTTPException(409, f"job {job_id} is {job.status}; only interrupted or failed "
                                "jobs can be retried")  # fmt: skip
        server.worker.wake()
        return server.job_view(server.store.get(job_id))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}}})  # fmt: skip
    async def job_events(job_id: str) -> StreamingResponse:
        if await asyncio.to_thread(server.store.get, job_id) is None:
            raise HTTPException(404, f"no job {job_id}")

        async def stream():
            q = server.broker.subscribe(job_id)
            try:
                while True:
                    job = await asyncio.to_thread(server.store.get, job_id)
                    if job is None or job.status in FINAL:
                        view = await asyncio.to_thread(server.job_view, job) if job else {}
                        yield f"event: {job.status if job else 'gone'}\ndata: {json.dumps(view)}\n\n"
                        return
                    latest = server.broker.latest.get(job_id)
                    if job.status == "queued":
                        pos = await asyncio.to_thread(server.store.position, job)
                        yield f"event: queued\ndata: {json.dumps({'position': pos})}\n\n"
                    elif latest is not None:
                        yield f"event: progress\ndata: {json.dumps(latest)}\n\n"
                    try:
                        await asyncio.wait_for(q.get(), timeout=2.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                server.broker.unsubscribe(job_id, q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/v1/images", response_model=ImagePage, tags=["gallery"])
    def list_images(
        limit: int = Query(20, ge=1, le=100), before: int | None = Query(None, ge=0, le=2**62)
    ) -> dict[str, Any]:
        rows, cursor = server.store.images(limit, before)
        return {"images": [_image_view(r) for r in rows], "next": cursor}

    @app.get("/v1/images/{image_id}", tags=["gallery"],
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "no image"}})  # fmt: skip
    def get_image(image_id: str) -> Response:
        if len(image_id) != 24 or any(c not in "0123456789abcdef" for c in image_id):
            raise HTTPException(404, "no such image")
        row = server.store.image(image_id)
        data = server.store.image_bytes(image_id) if row is not None else None
        if data is None:
            raise HTTPException(404, "no such image")
        return Response(data, media_type="image/png",
                        headers={"X-Ember-Infotext": _header_safe(row.infotext)})  # fmt: skip

    @app.get("/v1/images/{image_id}/info", response_model=ImageView, tags=["gallery"])
    def get_image_info(image_id: str) -> dict[str, Any]:
        row = server.store.image(image_id) if len(image_id) == 24 else None
        if row is None:
            raise HTTPException(404, "no such image")
        return _image_view(row)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / name, media_type=files[name])

    return app


def _image_view(row) -> dict[str, Any]:
    return {"id": row.id, "job_id": row.job_id, "index": row.idx, "width": row.width,
            "height": row.height, "seed": row.seed, "infotext": row.infotext,
            "params": row.record.get("params", {}), "url": f"/v1/images/{row.id}"}  # fmt: skip


def _header_safe(text: str) -> str:
    return json.dumps(text)[1:-1][:4000]
