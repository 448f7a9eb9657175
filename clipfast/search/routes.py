"""The search routes of ``clipfast serve ARTIFACT --index INDEX``.

- ``POST /v1/search``: ``{"text": "a red car"}`` or ``{"image": "<data URL or base64>"}``, ``k``
  (default 10), and an optional zero-shot ``filter``: ``{"labels": [...], "exclude": [...],
  "threshold": 0.5, "template": "a photo of a {}."}`` drops every hit whose probability for an
  excluded label is at least the threshold (moderation-style), and gives each kept hit its label
  probabilities. The query is embedded through the server's batchers, exactly as
  ``clipfast search`` embeds it.
- ``GET /v1/search/thumbnails/{id}``: a JPEG thumbnail of the indexed item ``id``, read from the
  path its key names (only keys of the index, never a path from the request) by the project's
  image loading policy, in the decode pool, resized and kept in a bounded cache.
- ``GET /``: the search page (static HTML and JS from this package, no external resources); its
  calls carry the API key the user types in.

The routes obey the serving core's rules: the body is parsed, validated and checked off the
event loop (``--max-text-chars``, ``--max-labels``, literal templates, per-item image limits),
every client error is an OpenAI-shaped 4xx, and the paths have their own metrics labels.
"""

from __future__ import annotations

import collections
import io
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from clipfast.errors import InputError
from clipfast.search.index import SearchIndex

THUMB_SIZE = 256
THUMB_CACHE_BYTES = 64 * 1024 * 1024
MAX_K = 1000
THUMBNAILS = "/v1/search/thumbnails"  # + "/{id}"
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


@dataclass
class Prepared:
    """A search request after its checks: the text's tokens or the image's bytes (or that
    item's Failure), and the filter's prompts."""

    request: SearchRequest
    tokens: dict[str, np.ndarray] | None
    image: Any
    prompts: list[str]


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
    """A JPEG of the image at ``path`` fitted in ``size`` x ``size``, read and decoded by the
    project's loading policy (``clipfast.inputs.image_io``: regular files only, never a FIFO or a
    device, a read limit, the decompression-bomb limit, EXIF orientation, modes to RGB) and
    refused past ``max_pixels`` (the server's --max-image-pixels) before decoding. Runs in a
    decode thread; ImageLoadError / InputError name the file and the problem."""
    from clipfast.inputs.image_io import load_image, read_image_bytes
    from clipfast.serve.inputs import check_pixels

    data = read_image_bytes(path)
    over = check_pixels(data, 0, max_pixels)
    if over is not None:
        raise InputError(f"{path}: {over.error.split(': ', 1)[-1]}")
    # JPEG: decoded at a reduced scale (Pillow's draft), each side still at least ``size``.
    img = load_image(data, draft=lambda stored: (size, size))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def page_html() -> bytes:
    return resources.files("clipfast.search").joinpath("static/index.html").read_bytes()


def mount(app: Any, service: Any, index_path: str | os.PathLike, *,
          handle: Callable[..., Awaitable[Response]],
          read_model: Callable[..., Awaitable[Any]]) -> SearchIndex:
    """Add the search routes to the serve app; refuses an index of another artifact.

    ``handle`` and ``read_model`` are the serve app's own (``clipfast.serve.app.create_app``):
    errors answered in the OpenAI shape and counted, and the body's JSON values counted, then
    parsed, validated and checked in the decode pool, as on every other route."""
    from clipfast.serve.app import ApiError, _json
    from clipfast.serve.inputs import (
        BadItem,
        LimitExceeded,
        check_template,
        check_texts,
        decode_inline,
        fill_template,
    )
    from clipfast.types import Failure

    index = SearchIndex(index_path)
    index.check_artifact(service.engine)
    thumbs = ThumbnailCache()
    config = service.config
    engine = service.engine
    page = page_html()
    app.state.search_index = index
    service.routes.update({"/v1/search", "/"})
    service.param_routes.add(THUMBNAILS)

    def invalid(message: str, param: str, code: str = "invalid_request") -> ApiError:
        return ApiError(422, message, code=code, kind="invalid", param=param)

    def prepare(req: SearchRequest) -> Prepared:
        """In the decode pool (the body is parsed there too): the limits every route applies,
        the text tokenized or the image's base64 decoded, the filter's prompts filled."""
        if (req.text is None) == (req.image is None):
            raise invalid("a search needs \"text\" or \"image\" (exactly one)", "text")
        prompts: list[str] = []
        flt = req.filter
        if flt is not None:
            for what, values in (("filter.labels", flt.labels), ("filter.exclude", flt.exclude)):
                if len(values) > config.max_labels:
                    raise LimitExceeded(f"{what}: {len(values)}, more than the limit of "
                                        f"{config.max_labels} per request (--max-labels)",
                                        limit="max_labels", status=413)
            check_texts(flt.labels, config.max_text_chars, "filter.labels")
            known = set(flt.labels)
            unknown = [x for x in flt.exclude if x not in known]
            if unknown:
                raise invalid(f"filter.exclude: {unknown[:5]} are not among filter.labels",
                              "filter.exclude")
            template = flt.template if flt.template is not None else engine.prompt_template
            try:
                check_template(template)
            except LimitExceeded:
                raise
            except InputError as e:
                raise invalid(f"filter.{e}", "filter.template", "invalid_template") from None
            prompts = [fill_template(template, label) for label in flt.labels]
        tokens = data = None  # the filter is checked first: it may refuse the request
        if req.text is not None:
            if not req.text.strip():
                raise invalid("text: empty query", "text")
            check_texts([req.text], config.max_text_chars, "text")
            tokens = engine.tokenize([req.text])
        else:
            try:
                data = decode_inline(req.image, 0)
            except BadItem as e:
                data = Failure(0, e.item or "", str(e))
        return Prepared(req, tokens, data, prompts)

    async def query_embedding(p: Prepared) -> np.ndarray:
        if p.tokens is not None:
            emb, _ = await service.embed_texts([p.request.text], p.tokens)
            return emb
        emb, idx, failures = await service.embed_images([p.image])
        if not idx:
            raise ApiError(422, failures[0].error if failures else "image: unreadable",
                           code="bad_items", kind="bad_item", param="image")
        return emb

    def ranked(emb: np.ndarray, req: SearchRequest, text: np.ndarray | None
               ) -> list[dict[str, Any]]:
        """In the decode pool: the index searched (k is the client's) and the filter applied."""
        fetch = min(len(index), req.k * (_OVERSAMPLE if req.filter else 1))
        hits = index.search(emb, fetch)[0]
        flt = req.filter
        if flt is None or text is None:
            return [h.to_dict() for h in hits[:req.k]]
        probs = service.probabilities(index.vectors([h.id for h in hits]), text)
        column = {}
        for i, label in enumerate(flt.labels):
            column.setdefault(label, i)
        cols = sorted({column[x] for x in flt.exclude})
        out = []
        for h, p in zip(hits, probs):
            if cols and float(p[cols].max()) >= flt.threshold:
                continue
            out.append({**h.to_dict(), "labels": dict(zip(flt.labels, p.tolist()))})
            if len(out) == req.k:
                break
        return out

    @app.post("/v1/search")
    async def search(request: Request) -> Response:
        """Top-k indexed items for a text or image query."""
        endpoint = "/v1/search"

        async def work():
            p = await read_model(request, SearchRequest, prepare)
            req = p.request

            async def embed():
                emb = await query_embedding(p)
                text = await service.prompt_embeddings(p.prompts) if p.prompts else None
                return emb, text

            emb, text = await service.with_timeout(embed())
            data = await service.in_pool(ranked, emb, req, text)
            for rank, d in enumerate(data, 1):
                d["rank"] = rank
                d["thumbnail"] = f"{THUMBNAILS}/{d['id']}"
            return _json({"object": "list", "data": data, "model": service.model_name,
                          "k": req.k, "index": {"count": len(index), "kind": index.info["kind"]}})

        return await handle(endpoint, request, work)

    def thumbnail_of(item: int) -> bytes:
        """In the decode pool: the cached thumbnail of ``item``, or one made from its key."""
        data = thumbs.get(item)
        if data is None:
            data = make_thumbnail(index.keys[item], THUMB_SIZE, config.max_image_pixels)
            thumbs.put(item, data)
        return data

    @app.get(THUMBNAILS + "/{item}")
    async def thumbnail(item: str, request: Request) -> Response:
        """A thumbnail of indexed item ``item`` (its key must name a readable image file)."""

        async def work():
            n = len(index)
            # Only the ids of the index, written as plain decimal integers (never a path).
            if not (item.isascii() and item.isdigit() and len(item) <= 19
                    and int(item) < n):
                raise ApiError(404, f"no item {item[:40]!r} in the index: ids are the integers "
                               f"0 to {n - 1}", code="not_found", kind="invalid", param="id")
            i = int(item)
            try:
                data = await service.in_pool(thumbnail_of, i)
            except InputError as e:
                raise ApiError(404, f"item {i} ({index.keys[i][:200]!r}) has no thumbnail: "
                               f"{e}", code="not_found",
                               kind="invalid", param="id") from None
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})

        return await handle(THUMBNAILS, request, work)

    @app.get("/")
    async def home() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy":
                                 "default-src 'self'; img-src 'self' blob: data:; "
                                 "style-src 'self' 'unsafe-inline'; "
                                 "script-src 'self' 'unsafe-inline'"})

    return index
