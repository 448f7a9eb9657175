"""A bounded fuzz of every route of clipfast serve (stand-in engine, no model): hypothesis draws
request bodies (arbitrary bytes, arbitrary JSON, and objects shaped like each route's schema with
fields of any type), content types, methods and paths; no answer may be a 5xx (``/ready``
answers 503 before the server's lifespan started, by design) and every 4xx carries the
OpenAI-shaped error body. With an index mounted (``--index``), the same holds for the search
routes: ``POST /v1/search``, the thumbnails (any id, and keys that name no readable image) and
the search page."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve_support import StubEngine, data_url, jpeg  # noqa: E402

from clipfast.serve.app import create_app  # noqa: E402
from clipfast.serve.config import ServeConfig  # noqa: E402

ROUTES = ("/v1/embeddings", "/v1/images/embeddings", "/v1/classify", "/v1/models", "/health",
          "/ready", "/metrics")
IMAGE = data_url(jpeg(np.full((8, 8, 3), 128, np.uint8)))

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=6),
                           max_leaves=25)
texts = st.text(max_size=40) | st.sampled_from(["a photo", "", "{}", "{0}", "é" * 30])
images = st.sampled_from([IMAGE, IMAGE[:60], "https://example.com/x.jpg", "aGk=", "%%", ""])
templates = st.sampled_from(["a photo of a {}.", "{}", "{} {}", "{0}", "{:>99}", "{.a}", "x",
                             "{{}}"]) | st.text(max_size=20)


def one_or_list(s):
    return s | st.lists(s, max_size=6)


def shaped(fields: dict) -> st.SearchStrategy:
    """Objects with each field absent, plausible, or any JSON value."""
    return st.fixed_dictionaries({}, optional={
        k: v | json_values for k, v in fields.items()})


BODIES = {
    "/v1/embeddings": shaped({
        "model": st.sampled_from(["stub-model", "other"]), "input": one_or_list(texts | images),
        "encoding_format": st.sampled_from(["float", "base64", None, "hex"]),
        "dimensions": st.sampled_from([4, 3, None, -1]),
        "modality": st.sampled_from(["text", "image", "audio"]), "user": texts}),
    "/v1/images/embeddings": shaped({
        "model": st.sampled_from(["stub-model", None]), "input": one_or_list(images),
        "encoding_format": st.sampled_from(["float", "base64"])}),
    "/v1/classify": shaped({
        "model": st.sampled_from(["stub-model", None]), "input": one_or_list(images),
        "labels": st.lists(texts, max_size=5), "template": templates}),
}


labels = st.lists(st.sampled_from(["cat", "dog", "{}", ""]) | texts, max_size=10)
SEARCH_FILTER = st.fixed_dictionaries({"labels": labels}, optional={
    "exclude": st.lists(st.sampled_from(["cat", "dog"]) | texts, max_size=4),
    "threshold": st.floats(-1, 2), "template": templates})
# Mostly plausible searches (one query, maybe a filter), which reach the index and the filter;
# the rest with each field absent, plausible or any JSON value.
SEARCH_BODY = st.builds(
    lambda query, rest: {**query, **rest},
    st.fixed_dictionaries({"text": st.sampled_from(["a red car", "é" * 100]) | texts})
    | st.fixed_dictionaries({"image": images}),
    st.fixed_dictionaries({}, optional={"k": st.integers(-2, 1002), "filter": SEARCH_FILTER})
) | shaped({"text": texts, "image": images, "k": st.integers(-2, 1002),
            "filter": shaped({"labels": labels, "exclude": labels, "threshold": st.floats(-1, 2),
                              "template": templates})})
# Thumbnail ids: in and out of the index (``stub_index`` names 10 keys), and not ids at all.
THUMBNAIL_IDS = (st.integers(-3, 14).map(str)
                 | st.sampled_from(["x", "1.0", "1e1", " 0", "+1", "0x1", "٣", "9" * 40])
                 | st.text(alphabet="0123456789abc.-_%", max_size=12))


@st.composite
def requests(draw, search: bool = False):
    extra = ("/v1/search", "/v1/search/thumbnails/{id}") if search else ()
    # With an index, most draws go to the search routes with their usual method.
    kinds = ["shaped", "json", "bytes", "multipart"]
    if search and draw(st.integers(0, 3)):
        route = draw(st.sampled_from(extra))
        method = "POST" if route == "/v1/search" else "GET"
        kinds = ["shaped", "shaped", "shaped", "json", "bytes"]
    else:
        route = draw(st.sampled_from(ROUTES + extra + ("/v1/nothing", "/")))
        method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
    if route.endswith("{id}"):
        route = route.replace("{id}", draw(THUMBNAIL_IDS))
    kind = draw(st.sampled_from(kinds))
    ctype = "application/json"
    if kind == "shaped" and route == "/v1/search":
        body = json.dumps(draw(SEARCH_BODY)).encode()
    elif kind == "shaped" and route in BODIES:
        body = json.dumps(draw(BODIES[route])).encode()
    elif kind == "multipart":
        boundary = draw(st.sampled_from(["b0undary", ""]))
        parts = draw(st.lists(st.tuples(st.sampled_from(["file", "files", "model", "x"]),
                                        st.booleans(), st.binary(max_size=40)), max_size=6))
        body = b"".join(f'--b0undary\r\nContent-Disposition: form-data; name="{n}"'.encode()
                        + (b'; filename="f.jpg"' if f else b"") + b"\r\n\r\n" + d + b"\r\n"
                        for n, f, d in parts) + b"--b0undary--\r\n"
        ctype = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
        ctype = draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data"]))
    else:
        body = json.dumps(draw(json_values)).encode()
    return method, route, body, ctype


@pytest.fixture(scope="module")
def client():
    loop = asyncio.new_event_loop()
    app = create_app(StubEngine(), ServeConfig(max_items=4, max_queue=16, max_labels=8,
                                               max_body_bytes=100_000, max_image_pixels=10_000,
                                               max_wait_ms=0.0, max_text_chars=100))
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    yield loop, c
    loop.run_until_complete(c.aclose())
    loop.close()


@pytest.fixture(scope="session")
def search_index(tmp_path_factory) -> tuple[object, Path]:
    """A tiny index of a stand-in engine's artifact (test_search_serve's ``stub_index``: photos,
    and keys no thumbnail can come from)."""
    pytest.importorskip("faiss")
    from test_search_serve import stub_index

    engine, idx, _ = stub_index(tmp_path_factory.mktemp("fuzz-index"))
    return engine, idx


@pytest.fixture(scope="module")
def search_client(search_index):
    engine, idx = search_index
    loop = asyncio.new_event_loop()
    app = create_app(engine, ServeConfig(max_items=4, max_queue=16, max_labels=8,
                                         max_body_bytes=100_000, max_image_pixels=10_000,
                                         max_wait_ms=0.0, max_text_chars=100, index=str(idx)))
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    yield loop, c
    loop.run_until_complete(c.aclose())
    loop.close()


def _check(client, req) -> None:
    loop, c = client
    method, route, body, ctype = req
    r = loop.run_until_complete(asyncio.wait_for(c.request(
        method, route, content=body, headers={"content-type": ctype}), 30))
    if route == "/ready" and r.status_code == 503:
        return
    assert r.status_code < 500, (method, route, body[:200], r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert err["type"] == "invalid_request_error" and err["message"]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests())
def test_no_route_answers_5xx_and_every_4xx_is_openai_shaped(client, req):
    _check(client, req)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests(search=True))
def test_with_an_index_no_route_answers_5xx_and_every_4xx_is_openai_shaped(search_client, req):
    _check(search_client, req)
