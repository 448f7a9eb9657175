"""The search routes of ``clipfast serve ARTIFACT --index INDEX``.

- ``POST /v1/search``: ``{"text": "a red car"}`` or ``{"image": "<data URL or base64>"}``, ``k``
  (default 10), and an optional zero-shot ``filter``: ``{"labels": [...], "exclude": [...],
  "threshold": 0.5, "template": "a photo of a {}."}`` drops every hit whose probability for an
  excluded label is at least the threshold (moderation-style), and gives each kept hit its label
  probabilities. The query is embedded through the server's batchers, exactly as
  ``clipfast search`` embeds it.
- ``GET /v1/search/thumbnails/{id}``: a JPEG thumbnail of the indexed item ``id``, read from the
  path its key names (only keys of the index, never a path from the request), resized and kept
  in a bounded cache.
- ``GET /``: the search page (static HTML and JS from this package, no external resources); its
  calls carry the API key the user types in.
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import threading
import time
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipfast.errors import InputError
from clipfast.search.index import SearchIndex

THUMB_SIZE = 256
THUMB_CACHE_BYTES = 64 * 1024 * 1024
MAX_K = 1000
_OVERSAMPLE = 4  # candidates per result fetched when a filter may drop some


class SearchFilter(BaseModel):
    """Zero-shot filter: hits whose probability for any ``exclude`` label (among ``labels``) is
    at least ``threshold`` are dropped."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(min_length=1)
    exclude: list[str] = Field(default_factory=list)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    template: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = None
    k: int = Field(default=10, ge=1, le=MAX_K)
    filter: SearchFilter | None = None


class ThumbnailCache:
    """JPEG thumbnails by id, least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = THUMB_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: int, data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.max_bytes:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)

    def __len__(self) -> int:
        return len(self._items)


def make_thumbnail(path: str, size: int, max_pixels: int) -> bytes:
    """A JPEG of the image at ``path`` fitted in ``size`` x ``size``."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.width * img.height > max_pixels:
            raise InputError(f"{path}: {img.width}x{img.height} pixels, more than the limit "
                             f"of {max_pixels}")
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale (cheap)
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()


def page_html() -> bytes:
    return resources.files("clipfast.search").joinpath("static/index.html").read_bytes()


def mount(app: Any, service: Any, index_path: str | os.PathLike) -> SearchIndex:
    """Add the search routes to the serve app; refuses an index of another artifact."""
    from clipfast.serve.app import ApiError, _json, _validation_message
    from clipfast.serve.inputs import BadItem, LimitExceeded, decode_inline

    index = SearchIndex(index_path)
    index.check_artifact(service.engine)
    thumbs = ThumbnailCache()
    metrics = service.metrics
    page = page_html()
    app.state.search_index = index

    async def handle(endpoint: str, work) -> Response:
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
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def invalid(message: str, param: str) -> ApiError:
        return ApiError(422, message, code="invalid_request", kind="invalid", param=param)

    async def query_embedding(req: SearchRequest) -> np.ndarray:
        if (req.text is None) == (req.image is None):
            raise invalid("a search needs \"text\" or \"image\" (exactly one)", "text")
        if req.text is not None:
            if not req.text.strip():
                raise invalid("text: empty query", "text")
            emb, _ = await service.with_timeout(service.embed_texts([req.text]))
            return emb
        try:
            data = decode_inline(req.image, 0)
        except BadItem as e:
            raise invalid(f"image: {e}", "image") from None
        emb, idx, failures = await service.with_timeout(service.embed_images([data]))
        if not idx:
            raise ApiError(422, failures[0].error if failures else "image: unreadable",
                           code="bad_items", kind="bad_item", param="image")
        return emb

    async def filtered(hits: list, flt: SearchFilter, k: int) -> list[dict[str, Any]]:
        unknown = [x for x in flt.exclude if x not in flt.labels]
        if unknown:
            raise invalid(f"filter.exclude: {unknown} are not among filter.labels", "filter")
        if len(flt.labels) > service.config.max_labels:
            raise LimitExceeded(f"filter.labels: {len(flt.labels)}, more than the limit of "
                                f"{service.config.max_labels} (--max-labels)",
                                limit="max_labels", status=413)
        template = flt.template or service.engine.prompt_template
        if "{}" not in template:
            raise invalid(f"filter.template {template!r} must contain '{{}}'", "filter")
        text = await service.with_timeout(
            service.prompt_embeddings([template.format(x) for x in flt.labels]))
        probs = service.probabilities(index.vectors([h.id for h in hits]), text)
        cols = [flt.labels.index(x) for x in flt.exclude]
        out = []
        for h, p in zip(hits, probs):
            if cols and float(p[cols].max()) >= flt.threshold:
                continue
            out.append({**h.to_dict(), "labels": dict(zip(flt.labels, p.tolist()))})
            if len(out) == k:
                break
        return out

    @app.post("/v1/search")
    async def search(request: Request) -> Response:
        """Top-k indexed items for a text or image query."""
        endpoint = "/v1/search"

        async def work():
            try:
                body = await request.json()
            except ValueError as e:
                raise ApiError(422, f"the body is not valid JSON ({e})", code="invalid_json",
                               kind="invalid") from None
            req = SearchRequest.model_validate(body)
            emb = await query_embedding(req)
            fetch = min(len(index), req.k * (_OVERSAMPLE if req.filter else 1))
            hits = index.search(emb, fetch)[0]
            if req.filter is not None:
                data = await filtered(hits, req.filter, req.k)
            else:
                data = [h.to_dict() for h in hits[:req.k]]
            for rank, d in enumerate(data, 1):
                d["rank"] = rank
                d["thumbnail"] = f"/v1/search/thumbnails/{d['id']}"
            return _json({"object": "list", "data": data, "model": service.model_name,
                          "k": req.k, "index": {"count": len(index), "kind": index.info["kind"]}})

        return await handle(endpoint, work)

    @app.get("/v1/search/thumbnails/{item}")
    async def thumbnail(item: int) -> Response:
        """A thumbnail of indexed item ``item`` (its key must name a readable image file)."""
        endpoint = "/v1/search/thumbnails"

        async def work():
            if not 0 <= item < len(index):
                raise ApiError(404, f"no item {item} in the index ({len(index)} items)",
                               code="not_found", kind="invalid")
            data = thumbs.get(item)
            if data is None:
                key = index.keys[item]
                if not os.path.isfile(key):
                    raise ApiError(404, f"item {item}: its key {key!r} names no image file "
                                   "here (keys of tar shards and tables have no thumbnail)",
                                   code="not_found", kind="invalid")
                loop = asyncio.get_running_loop()
                try:
                    data = await loop.run_in_executor(
                        service.decode_pool, make_thumbnail, key, THUMB_SIZE,
                        service.config.max_image_pixels)
                except (OSError, ValueError) as e:
                    raise ApiError(404, f"item {item}: {key!r} is not a readable image ({e})",
                                   code="not_found", kind="invalid") from None
                thumbs.put(item, data)
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})

        return await handle(endpoint, work)

    @app.get("/")
    async def home() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy":
                                 "default-src 'self'; img-src 'self' blob: data:; "
                                 "style-src 'self' 'unsafe-inline'; "
                                 "script-src 'self' 'unsafe-inline'"})

    return index
