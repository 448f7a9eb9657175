"""The ASGI app: OpenAI-style embeddings, image embeddings, zero-shot classification, models,
health, readiness and Prometheus metrics, over one Engine and one batcher per tower.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``; a limit's
``code`` is its name (``max_items``, ``max_body_bytes``, ``max_text_chars``, ...), an overload's
``overloaded`` (with ``Retry-After``), a timeout's ``request_timeout``.

Nothing sized by the client runs on the event loop: the body is read with a byte cap and a
deadline, its JSON values are counted before it is parsed, and parsing, validation, template
filling and tokenization run in the decode pool, as image decoding does.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from clipfast.artifact.fidelity import l2_normalize
from clipfast.errors import InputError
from clipfast.serve.batcher import Overloaded, TowerBatcher
from clipfast.serve.config import ServeConfig
from clipfast.serve.inputs import (
    BadItem,
    LimitExceeded,
    check_items,
    check_json,
    check_template,
    check_texts,
    decode_inline,
    fill_template,
    preprocess_one,
    token_count,
    token_rows,
)
from clipfast.serve.metrics import CONTENT_TYPE, Metrics
from clipfast.serve.protocol import ConnectionGuard
from clipfast.types import Failure

log = logging.getLogger("clipfast.serve")

_OPEN_PATHS = ("/health", "/ready", "/")  # "/": the search page, whose calls carry the key
_ROUTES = frozenset({"/v1/embeddings", "/v1/images/embeddings", "/v1/classify", "/v1/models",
                     "/metrics", "/health", "/ready"})
_LABEL_CACHE = 4096  # prompt embeddings kept for /v1/classify
# Bodies up to this size are parsed (and their texts tokenized) on the event loop: about a
# millisecond of work (2000 characters tokenize in under 1 ms on one core, long words and
# CJK included), less than a trip to a worker thread costs under load, when the loop must win
# the GIL back from it. Larger bodies go to the decode pool.
_INLINE_BODY_BYTES = 2048


# -- request schemas ---------------------------------------------------------------------------
class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; ``modality`` is infinity's extension (``"image"``: each
    input is a ``data:image/...;base64,...`` URL or bare base64)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"  # null: float
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] = "text"


class ImageEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"  # null: float


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str]
    labels: list[str]
    template: str | None = None


# -- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str, kind: str,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.param, self.headers = param, headers

    def response(self) -> JSONResponse:
        err_type = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": err_type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _parse(model: type[BaseModel], body: bytes, max_values: int) -> BaseModel:
    """The body as ``model`` (in a worker thread): values counted first, then parsed and
    validated by pydantic straight from the bytes."""
    check_json(body, max_values)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        bad = [err for err in e.errors() if err.get("type") == "json_invalid"]
        if bad:
            raise ApiError(422, f"the body is not valid JSON ({bad[0].get('msg')})",
                           code="invalid_json", kind="invalid") from None
        raise


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status,
                    media_type="application/json")


# -- the service ------------------------------------------------------------------------------
class Service:
    """The state behind the routes: the engine, the batchers, the pools, the metrics."""

    def __init__(self, engine: Any, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.model_name = config.model_name or Path(str(engine.manifest.directory)).name
        self.metrics = Metrics()
        self.created = int(time.time())
        self.draining = False
        self.started = False
        self.connections = ConnectionGuard(max_connections=config.max_connections,
                                           max_per_client=config.max_connections_per_client,
                                           header_timeout_s=config.header_timeout_s)
        # Most JSON values a request may hold: its items and labels, a few per item, the rest.
        self.max_json_values = 4 * (config.max_items + config.max_labels) + 256
        self.buffered = 0  # bytes of request bodies held now (--max-buffered-bytes)
        threads = config.decode_threads or os.cpu_count() or 1
        self.decode_pool = ThreadPoolExecutor(max_workers=threads,
                                              thread_name_prefix="clipfast-decode")
        # On the CPU both towers share the cores: one tower call at a time gets them all. On a
        # GPU the towers' calls may overlap.
        tower_threads = 2 if getattr(engine, "backend_device", "cpu") == "cuda" else 1
        self.tower_pool = ThreadPoolExecutor(max_workers=tower_threads,
                                             thread_name_prefix="clipfast-tower")
        wait = config.max_wait_ms / 1000.0
        self.batchers = {
            tower: TowerBatcher(tower, run, max_batch=config.max_batch, max_wait_s=wait,
                                max_queue=config.max_queue, executor=self.tower_pool,
                                deadline_s=0.8 * config.request_timeout_s,
                                on_batch=self.metrics.batch_observer(tower),
                                on_depth=self.metrics.depth_observer(tower))
            for tower, run in (("text", self._run_text), ("image", self._run_image))
        }
        self._label_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        # Paths with their own metrics label and listed in a 404's message; mounted routes
        # (the search routes) add theirs. ``param_routes``: prefixes of routes that end in one
        # path parameter (``prefix/{id}``), labelled by the prefix.
        self.routes: set[str] = set(_ROUTES)
        self.param_routes: set[str] = set()
        pad = getattr(getattr(engine.manifest.spec, "tokenizer", None), "pad_id", 0)
        self._pad_id = pad if isinstance(pad, int) else 0

    # Tower calls, in the tower thread: exactly Engine.encode_texts / encode_images per row.
    def _run_text(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        tokens = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return l2_normalize(self.engine.run_text_tower(tokens))

    def _run_image(self, rows: list[np.ndarray]) -> np.ndarray:
        return l2_normalize(self.engine.run_image_tower(np.stack(rows)))

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.tower_pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers ----------------------------------------------------------------------------
    def endpoint(self, path: str) -> str:
        """The metrics label of ``path``: its route, or "other" (bounded cardinality)."""
        if path in self.routes:
            return path
        head = path.rpartition("/")[0]
        return head if head in self.param_routes else "other"

    def route_names(self) -> list[str]:
        return sorted(self.routes | {p + "/{id}" for p in self.param_routes})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                           f"{self.model_name!r} (GET /v1/models)", code="model_not_found",
                           kind="invalid", param="model")

    def reserve(self, tower: str, n: int):
        try:
            return self.batchers[tower].reserve(n)
        except Overloaded as e:
            raise ApiError(503, str(e), code="overloaded", kind="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None

    async def with_timeout(self, coro):
        try:
            return await asyncio.wait_for(coro, self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.config.request_timeout_s:g}"
                           " s (--request-timeout-s)", code="request_timeout",
                           kind="timeout") from None

    async def in_pool(self, fn, *args):
        """``fn(*args)`` in the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def embed_texts(self, texts: list[str], tokens: dict[str, np.ndarray] | None = None
                          ) -> tuple[np.ndarray, int]:
        """Texts -> (normalised (N, D), prompt tokens); tokenized in the decode pool unless
        ``tokens`` (``engine.tokenize(texts)``, done off the loop already) are given."""
        with self.reserve("text", len(texts)):
            if tokens is None:
                tokens = await self.in_pool(self.engine.tokenize, texts)
            emb = await self.batchers["text"].submit(token_rows(tokens))
        return emb, token_count(tokens, self._pad_id)

    async def embed_images(self, datas: list[bytes | Failure]
                           ) -> tuple[np.ndarray, list[int], list[Failure]]:
        """Encoded images (or an item's Failure already) -> (rows for the good ones, their
        indices, failures). Decoding runs in the decode pool."""
        with self.reserve("image", len(datas)):
            loop = asyncio.get_running_loop()
            limit = self.config.max_image_pixels
            futures = [None if isinstance(d, Failure) else
                       loop.run_in_executor(self.decode_pool, preprocess_one, self.engine, d, i,
                                            limit)
                       for i, d in enumerate(datas)]
            try:
                done = [d if f is None else await f for d, f in zip(datas, futures)]
            except BaseException:
                for f in futures:
                    if f is not None:
                        f.cancel()
                raise
            good = [(i, x) for i, x in enumerate(done) if not isinstance(x, Failure)]
            failures = [x for x in done if isinstance(x, Failure)]
            if not good:
                return np.zeros((0, self.engine.embed_dim), np.float32), [], failures
            emb = await self.batchers["image"].submit([x for _, x in good])
        return emb, [i for i, _ in good], failures

    async def prompt_embeddings(self, prompts: list[str]) -> np.ndarray:
        """Normalised embeddings of the prompts, from the cache or embedded in chunks that each
        fit the queue (a label set may be larger than --max-items)."""
        # Rows are taken from the cache before any await: a concurrent request may evict them.
        rows = {p: self._label_cache[p] for p in prompts if p in self._label_cache}
        for p in rows:
            self._label_cache.move_to_end(p)
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        step = min(self.config.max_items, self.config.max_queue)
        for s in range(0, len(missing), step):
            part = missing[s:s + step]
            emb, _ = await self.embed_texts(part)
            for p, row in zip(part, emb):
                rows[p] = row
                self._label_cache[p] = row
                while len(self._label_cache) > _LABEL_CACHE:
                    self._label_cache.popitem(last=False)
        return np.stack([rows[p] for p in prompts])

    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """What Engine.classify returns for these embeddings."""
        logits = self.engine.logits(image_emb, text_emb).astype(np.float64)
        if self.engine.manifest.spec.logits.kind == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
        return probs.astype(np.float32)


def _encode_rows(emb: np.ndarray, indices: list[int], fmt: str) -> list[dict[str, Any]]:
    data = []
    for row, i in zip(emb, indices):
        value = (base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()
                 if fmt == "base64" else row.tolist())
        data.append({"object": "embedding", "index": int(i), "embedding": value})
    return data


def _errors(failures: list[Failure]) -> list[dict[str, Any]]:
    return [{"index": f.index, "message": f.error} for f in failures]


def _as_list(value: str | list) -> list:
    return [value] if isinstance(value, str) else list(value)


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
    metrics = service.metrics

    def answer(endpoint: str, started: float, response: Response) -> Response:
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def handle(endpoint: str, request: Request, work) -> Response:
        started = time.perf_counter()
        try:
            response = await work()
        except ApiError as e:
            metrics.errors.labels(endpoint, e.kind).inc()
            response = e.response()
        except LimitExceeded as e:
            metrics.errors.labels(endpoint, "limit").inc()
            response = ApiError(e.status, str(e), code=e.limit, kind="limit").response()
        except ValidationError as e:
            metrics.errors.labels(endpoint, "invalid").inc()
            response = ApiError(422, _validation_message(e), code="invalid_request",
                                kind="invalid").response()
        except InputError as e:
            metrics.errors.labels(endpoint, "invalid").inc()
            response = ApiError(422, str(e), code="invalid_request", kind="invalid").response()
        except HTTPException as e:  # starlette's form parser (no boundary, too many parts)
            metrics.errors.labels(endpoint, "invalid").inc()
            status = e.status_code if 400 <= e.status_code < 500 else 400
            response = ApiError(status, f"multipart body refused: {e.detail}",
                                code="invalid_multipart", kind="invalid").response()
        except Exception:
            log.exception("clipfast serve: %s failed", endpoint)
            metrics.errors.labels(endpoint, "internal").inc()
            response = ApiError(500, "internal error (see the server log)", code="internal",
                                kind="internal").response()
        return answer(endpoint, started, response)

    async def read_model(request: Request, model: type[BaseModel], check=None) -> Any:
        """The body parsed as ``model`` and passed to ``check`` (if any), in the decode pool
        unless the body is small."""
        body = await request.body()

        def parse():
            req = _parse(model, body, service.max_json_values)
            return req if check is None else check(req)
        if len(body) <= _INLINE_BODY_BYTES:
            return parse()
        return await service.in_pool(parse)

    def embedding_response(emb, indices, failures, fmt, n_tokens) -> Response:
        if not indices and failures:
            raise ApiError(422, "no input could be embedded: " + "; ".join(
                f.error for f in failures[:5]), code="bad_items", kind="bad_item")
        payload = {"object": "list", "data": _encode_rows(emb, indices, fmt),
                   "model": service.model_name,
                   "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        if failures:
            payload["errors"] = _errors(failures)
        return _json(payload)

    def inline_images(items: list) -> list[bytes | Failure]:
        out: list[bytes | Failure] = []
        for i, item in enumerate(items):
            try:
                out.append(decode_inline(item, i))
            except BadItem as e:
                out.append(Failure(i, e.item or "", str(e)))
        return out

    def count_bad(endpoint: str, failures: list[Failure]) -> None:
        if failures:
            metrics.errors.labels(endpoint, "bad_item").inc(len(failures))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings: texts, or with ``"modality": "image"`` inline images."""
        endpoint = "/v1/embeddings"

        async def work():
            def prepare(req):
                """In the decode pool: the limits, then the images decoded from base64 or
                the texts tokenized (one trip off the loop per request)."""
                items = _as_list(req.input)
                check_items(len(items), config.max_items)
                if req.modality == "image":
                    return req, inline_images(items), None
                if all(isinstance(t, str) for t in items):
                    check_texts(items, config.max_text_chars)
                    return req, None, engine.tokenize(items)
                return req, None, None
            req, datas, tokens = await read_model(request, EmbeddingRequest, prepare)
            service.check_model(req.model)
            if req.dimensions is not None and req.dimensions != engine.embed_dim:
                raise ApiError(422, f"dimensions={req.dimensions}: this model's embeddings "
                               f"have {engine.embed_dim} (CLIP embeddings are not truncated)",
                               code="invalid_dimensions", kind="invalid", param="dimensions")
            items = _as_list(req.input)
            check_items(len(items), config.max_items)
            if req.modality == "image":
                emb, idx, failures = await service.with_timeout(service.embed_images(datas))
                count_bad(endpoint, failures)
                return embedding_response(emb, idx, failures, req.encoding_format or "float", 0)
            if not all(isinstance(t, str) for t in items):
                raise ApiError(422, "input: token ids are not accepted; send strings (the "
                               "server tokenizes with the model's own tokenizer)",
                               code="invalid_input", kind="invalid", param="input")
            emb, n_tokens = await service.with_timeout(service.embed_texts(items, tokens))
            return embedding_response(emb, list(range(len(items))), [],
                                      req.encoding_format or "float", n_tokens)

        return await handle(endpoint, request, work)

    @app.post("/v1/images/embeddings")
    async def image_embeddings(request: Request) -> Response:
        """Images as multipart uploads (fields ``file`` / ``files``; optional ``model`` and
        ``encoding_format``) or JSON ``{"input": [base64 or data URL, ...]}``."""
        endpoint = "/v1/images/embeddings"

        async def work():
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                form = await request.form(max_files=config.max_items + 1,
                                          max_fields=config.max_items + 16,
                                          max_part_size=config.max_body_bytes)
                try:
                    uploads = [v for k, v in form.multi_items()
                               if k in ("file", "files", "image", "images")]
                    check_items(len(uploads), config.max_items, "files")
                    service.check_model(form.get("model"))
                    fmt = str(form.get("encoding_format") or "float")
                    if fmt not in ("float", "base64"):
                        raise ApiError(422, f"encoding_format={fmt!r}: expected float or base64",
                                       code="invalid_request", kind="invalid")
                    datas: list[bytes | Failure] = []
                    for i, up in enumerate(uploads):
                        if isinstance(up, str):
                            datas.append(inline_images([up])[0])
                            if isinstance(datas[-1], Failure):
                                datas[-1].index = i
                            continue
                        data = await up.read()
                        datas.append(data if data else Failure(
                            i, up.filename or "", f"image {i}: empty upload"))
                finally:
                    await form.close()
            else:
                def prepare(req):
                    items = _as_list(req.input)
                    check_items(len(items), config.max_items)
                    return req, inline_images(items)

                req, datas = await read_model(request, ImageEmbeddingRequest, prepare)
                service.check_model(req.model)
                fmt = req.encoding_format or "float"
            emb, idx, failures = await service.with_timeout(service.embed_images(datas))
            count_bad(endpoint, failures)
            return embedding_response(emb, idx, failures, fmt, 0)

        return await handle(endpoint, request, work)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        """Zero-shot: ``{"input": [images], "labels": [...], "template": "a photo of a {}."}``
        -> per image the probability of each label (softmax, or sigmoid for SigLIP)."""
        endpoint = "/v1/classify"

        async def work():
            def check(req):
                check_items(len(_as_list(req.input)), config.max_items)
                if not req.labels:
                    raise ApiError(422, "labels: at least one label is needed",
                                   code="invalid_request", kind="invalid", param="labels")
                if len(req.labels) > config.max_labels:
                    raise LimitExceeded(f"labels: {len(req.labels)}, more than the limit of "
                                        f"{config.max_labels} per request (--max-labels)",
                                        limit="max_labels", status=413)
                check_texts(req.labels, config.max_text_chars, "labels")
                template = req.template if req.template is not None else engine.prompt_template
                try:
                    check_template(template)
                except LimitExceeded:
                    raise
                except InputError as e:
                    raise ApiError(422, str(e), code="invalid_template", kind="invalid",
                                   param="template") from None
                prompts = [fill_template(template, label) for label in req.labels]
                return req, prompts, inline_images(_as_list(req.input))

            req, prompts, datas = await read_model(request, ClassifyRequest, check)
            service.check_model(req.model)

            async def both():
                text = await service.prompt_embeddings(prompts)
                emb, idx, failures = await service.embed_images(datas)
                return text, emb, idx, failures

            text, emb, idx, failures = await service.with_timeout(both())
            count_bad(endpoint, failures)
            if not idx:
                raise ApiError(422, "no image could be read: " + "; ".join(
                    f.error for f in failures[:5]), code="bad_items", kind="bad_item")
            probs = service.probabilities(emb, text)
            data = [{"object": "classification", "index": int(i),
                     "label": req.labels[int(np.argmax(p))], "scores": p.tolist()}
                    for i, p in zip(idx, probs)]
            payload = {"object": "list", "data": data, "labels": req.labels,
                       "model": service.model_name}
            if failures:
                payload["errors"] = _errors(failures)
            return _json(payload)

        return await handle(endpoint, request, work)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created,
            "owned_by": "clipfast", "embed_dim": engine.embed_dim,
            "family": engine.manifest.spec.family, "precision": engine.manifest.spec.precision,
            "backend": engine.backend, "device": engine.backend_device,
            "modalities": ["text", "image"]}]})

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if service.draining or not service.started:
            return _json({"status": "draining" if service.draining else "starting"}, 503)
        return _json({"status": "ready", "queue": {
            t: {"queued": b.queued, "admitted": b.admitted, "max_queue": b.max_queue}
            for t, b in service.batchers.items()}})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if config.index is not None:  # POST /v1/search, thumbnails and the search page at /
        from clipfast.search.routes import mount

        mount(app, service, config.index, handle=handle, read_model=read_model)
    app.add_middleware(GuardMiddleware, service=service)
    return app


def _version() -> str:
    from clipfast import __version__

    return __version__
