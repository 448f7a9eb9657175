"""The ASGI app: thin routes over ``clipfast.serve.service.Service`` (parse the body, call the
Service, render its answer), the guard middleware, health, readiness and Prometheus metrics.

Errors are OpenAI-shaped (``clipfast.serve.errors``). Nothing sized by the client runs on the
event loop: the body is read with a byte cap and a deadline (``GuardMiddleware``), its JSON
values are counted before it is parsed, and parsing, validation, template filling and
tokenization run in the decode pool (small bodies excepted), as image decoding does. Routes
read the raw body for that reason; ``openapi_extra`` declares their request models so that the
OpenAPI schema shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from clipfast.serve.config import ServeConfig
from clipfast.serve.errors import ApiError, dumps, internal_error, to_api_error
from clipfast.serve.inputs import check_items
from clipfast.serve.metrics import CONTENT_TYPE
from clipfast.serve.schemas import (
    ClassifyRequest,
    EmbeddingRequest,
    ImageEmbeddingRequest,
    parse,
    request_body,
)
from clipfast.serve.service import Service
from clipfast.types import Failure

__all__ = ["ApiError", "GuardMiddleware", "Service", "create_app"]

log = logging.getLogger("clipfast.serve")

_OPEN_PATHS = ("/health", "/ready", "/")  # "/": the search page, whose calls carry the key
# Bodies up to this size are parsed (and their texts tokenized) on the event loop: about a
# millisecond of work (2000 characters tokenize in under 1 ms on one core, long words and
# CJK included), less than a trip to a worker thread costs under load, when the loop must win
# the GIL back from it. Larger bodies go to the decode pool.
_INLINE_BODY_BYTES = 2048


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json")


# -- middleware -------------------------------------------------------------------------------
class GuardMiddleware:
    """Before any route: the connection limit (API routes only: the probes still answer), the
    API key (constant-time compare), and the body's limits: at most ``max_body_bytes`` (the
    declared Content-Length is checked first), all of it within ``body_timeout_s`` (else 408
    and the connection is closed), and all bodies held at once within ``max_buffered_bytes``
    (else 503); the body is read here, then replayed to the route, and its bytes count
    against the budget until the route has answered."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service
        key = service.config.api_key
        self._key = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        if self._key is None or scope["path"] in _OPEN_PATHS:
            return True
        headers = dict(scope.get("headers") or ())
        got = headers.get(b"authorization", b"")
        if got[:7].lower() == b"bearer ":
            got = got[7:].strip()
        else:
            got = headers.get(b"x-api-key", b"").strip()
        # Compare digests of equal length so neither the key nor its length leaks through time.
        return hmac.compare_digest(hashlib.sha256(got).digest(), self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        # Metric labels: the known routes, everything else as one (bounded cardinality).
        endpoint = service.endpoint(scope["path"])
        if service.connections.over_limit and scope["path"] not in _OPEN_PATHS:
            service.metrics.errors.labels(endpoint, "overloaded").inc()
            service.metrics.requests.labels(endpoint, "503").inc()
            resp = ApiError(503, f"more than {service.config.max_connections} connections are "
                            "open (--max-connections); retry later", code="max_connections",
                            kind="overloaded", headers={"Retry-After": "1"}).response()
            return await resp(scope, receive, send)
        if not self._authorized(scope):
            service.metrics.errors.labels(endpoint, "unauthorized").inc()
            service.metrics.requests.labels(endpoint, "401").inc()
            resp = ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                            code="invalid_api_key", kind="unauthorized",
                            headers={"WWW-Authenticate": "Bearer"}).response()
            return await resp(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = service.config.max_body_bytes
        headers = dict(scope.get("headers") or ())
        too_big = ApiError(413, f"request body larger than the limit of {limit} bytes "
                           "(--max-body-bytes)", code="max_body_bytes", kind="limit",
                           headers={"Connection": "close"})  # the rest is never read
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > limit:
            service.metrics.errors.labels(endpoint, "limit").inc()
            service.metrics.requests.labels(endpoint, "413").inc()
            return await too_big.response()(scope, receive, send)
        chunks: list[bytes] = []  # what counts against --max-buffered-bytes
        try:
            return await self._read_and_call(scope, receive, send, endpoint, chunks, too_big)
        finally:
            service.buffered -= sum(len(c) for c in chunks)

    async def _read_and_call(self, scope, receive, send, endpoint, chunks, too_big):
        service = self.service
        limit = service.config.max_body_bytes
        budget = service.config.max_buffered_bytes
        total = 0
        try:
            async with asyncio.timeout(service.config.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body = message.get("body", b"")
                    total += len(body)
                    if total > limit:
                        service.metrics.errors.labels(endpoint, "limit").inc()
                        service.metrics.requests.labels(endpoint, "413").inc()
                        return await too_big.response()(scope, receive, send)
                    if service.buffered + len(body) > budget:
                        service.metrics.errors.labels(endpoint, "overloaded").inc()
                        service.metrics.requests.labels(endpoint, "503").inc()
                        resp = ApiError(503, f"the server holds {service.buffered} bytes of "
                                        f"request bodies, at its limit of {budget} "
                                        "(--max-buffered-bytes); retry later",
                                        code="max_buffered_bytes", kind="overloaded",
                                        headers={"Retry-After": "1", "Connection": "close"})
                        return await resp.response()(scope, receive, send)
                    service.buffered += len(body)
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            service.connections.refused["body_timeout"] += 1
            service.metrics.errors.labels(endpoint, "timeout").inc()
            service.metrics.requests.labels(endpoint, "408").inc()
            # "connection: close": the rest of the body is never read, so the connection ends.
            resp = ApiError(408, f"the request body did not arrive within "
                            f"{service.config.body_timeout_s:g} s (--body-timeout-s)",
                            code="body_timeout", kind="timeout",
                            headers={"Connection": "close"}).response()
            return await resp(scope, receive, send)
        joined = b"".join(chunks)  # one buffer, of the bytes counted; the chunks are dropped
        chunks[:] = [joined]
        replay = [{"type": "http.request", "body": joined, "more_body": False}]

        async def replayed():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replayed, send)


# -- the app ------------------------------------------------------------------------------------
def create_app(engine: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (a clipfast.Engine) with ``config``."""
    config = config or ServeConfig()
    service = Service(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.started = True
        log.info("clipfast serve: %s ready (%s)", service.model_name, config.as_dict())
        try:
            yield
        finally:
            service.draining = True
            await service.close()

    app = FastAPI(title="clipfast", version=_version(), lifespan=lifespan)
    app.state.service = service

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Routing's own errors (unknown path 404, wrong method 405) in the OpenAI shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
        message = {404: f"no route {request.url.path!r}: the routes are " + ", ".join(
            service.route_names()), 405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, code=code, kind="invalid",
                        headers=getattr(exc, "headers", None)).response()

    app.add_exception_handler(HTTPException, http_error)
    handle = _handler(service)

    async def read_model(request: Request, model: type[BaseModel], check=None) -> Any:
        """The body parsed as ``model`` and passed to ``check`` (if any), in the decode pool
        unless the body is small."""
        body = await request.body()

        def parse_and_check():
            req = parse(model, body, service.max_json_values)
            return req if check is None else check(req)
        if len(body) <= _INLINE_BODY_BYTES:
            return parse_and_check()
        return await service.in_pool(parse_and_check)

    @app.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings: texts, or with ``"modality": "image"`` inline images."""
        async def work():
            req, prepared = await read_model(
                request, EmbeddingRequest, lambda r: (r, service.prepare_embeddings(r)))
            return _json(await service.embeddings(req, prepared))

        return await handle("/v1/embeddings", work)

    @app.post("/v1/images/embeddings",
              openapi_extra=request_body(ImageEmbeddingRequest, multipart=True))
    async def image_embeddings(request: Request) -> Response:
        """Images as multipart uploads (fields ``file`` / ``files``; optional ``model`` and
        ``encoding_format``) or JSON ``{"input": [base64 or data URL, ...]}``."""
        async def work():
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                datas, fmt, model = await _uploads(request, service)
            else:
                req, datas = await read_model(
                    request, ImageEmbeddingRequest,
                    lambda r: (r, service.prepare_image_request(r)))
                fmt, model = req.encoding_format or "float", req.model
            return _json(await service.image_embeddings(datas, fmt, model))

        return await handle("/v1/images/embeddings", work)

    @app.post("/v1/classify", openapi_extra=request_body(ClassifyRequest))
    async def classify(request: Request) -> Response:
        """Zero-shot: ``{"input": [images], "labels": [...], "template": "a photo of a {}."}``
        -> per image the probability of each label (softmax, or sigmoid for SigLIP)."""
        async def work():
            req, prepared = await read_model(
                request, ClassifyRequest, lambda r: (r, service.prepare_classify(r)))
            return _json(await service.classify(req, prepared))

        return await handle("/v1/classify", work)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(service.models())

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        return _json(*service.ready())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    if config.index is not None:  # POST /v1/search, thumbnails and the search page at /
        from clipfast.search.routes import mount

        async def handle_request(endpoint: str, request: Request, work) -> Response:
            return await handle(endpoint, work)

        mount(app, service, config.index, handle=handle_request, read_model=read_model)
    app.add_middleware(GuardMiddleware, service=service)
    return app


def _handler(service: Service) -> Callable[[str, Callable[[], Awaitable[Response]]],
                                           Awaitable[Response]]:
    """``handle(endpoint, work)``: ``await work()``, any error answered in the OpenAI shape
    (``to_api_error``; anything unforeseen a logged 500), counted in the metrics."""
    metrics = service.metrics

    async def handle(endpoint: str, work: Callable[[], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await work()
        except Exception as e:
            err = to_api_error(e)
            if err is None:
                log.exception("clipfast serve: %s failed", endpoint)
                err = internal_error()
            metrics.errors.labels(endpoint, err.kind).inc()
            response = err.response()
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response
    return handle


async def _uploads(request: Request, service: Service
                   ) -> tuple[list[bytes | Failure], str, str | None]:
    """A multipart body's images (fields file, files, image, images; a string field is an
    inline image), its encoding_format and model, with the request limits."""
    config = service.config
    form = await request.form(max_files=config.max_items + 1,
                              max_fields=config.max_items + 16,
                              max_part_size=config.max_body_bytes)
    try:
        uploads = [v for k, v in form.multi_items() if k in ("file", "files", "image", "images")]
        check_items(len(uploads), config.max_items, "files")
        model = form.get("model")
        service.check_model(model)
        fmt = str(form.get("encoding_format") or "float")
        if fmt not in ("float", "base64"):
            raise ApiError(422, f"encoding_format={fmt!r}: expected float or base64",
                           code="invalid_request", kind="invalid")
        datas: list[bytes | Failure] = []
        for i, up in enumerate(uploads):
            if isinstance(up, str):
                datas.extend(service.inline_images([up], offset=i))
                continue
            data = await up.read()
            datas.append(data if data else Failure(i, up.filename or "",
                                                   f"image {i}: empty upload"))
    finally:
        await form.close()
    return datas, fmt, model


def _version() -> str:
    from clipfast import __version__

    return __version__
