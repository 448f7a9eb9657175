"""The serving core without HTTP: ``Service``'s endpoint methods called directly on a stand-in
engine (payloads, usage counts, per-item failures at their request index, error mapping,
bounded batch statistics), and the app's OpenAPI schema declaring the request bodies."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from pydantic import ValidationError  # noqa: E402
from test_serve_support import StubEngine, data_url, jpeg, run_asgi  # noqa: E402

from clipfast.serve.app import create_app  # noqa: E402
from clipfast.serve.config import ServeConfig  # noqa: E402
from clipfast.serve.errors import ApiError, to_api_error  # noqa: E402
from clipfast.serve.inputs import LimitExceeded  # noqa: E402
from clipfast.serve.schemas import (  # noqa: E402
    ClassifyRequest,
    EmbeddingRequest,
    ImageEmbeddingRequest,
)
from clipfast.serve.service import Service  # noqa: E402


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return jpeg((rng.random((24, 40, 3)) * 255).astype(np.uint8))


def _run(fn, **config):
    """``await fn(service)`` on a Service over a StubEngine, closed afterwards."""
    opts = {"max_items": 8, "max_queue": 16, "max_wait_ms": 0.0, "max_batch": 4,
            "max_image_pixels": 10_000}
    opts.update(config)

    async def main():
        service = Service(StubEngine(), ServeConfig(**opts))
        try:
            return await fn(service)
        finally:
            await service.close()
    return asyncio.run(main())


def test_embeddings_counts_prompt_tokens_and_keeps_order():
    req = EmbeddingRequest(model="stub-model", input=["ab", "abcdefghij", "c"])
    out = _run(lambda s: s.embeddings(req))
    assert out["object"] == "list" and out["model"] == "stub-model"
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": 2 + 8 + 1, "total_tokens": 11}  # ids cut at 8
    assert "errors" not in out


def test_image_failures_carry_their_request_index():
    """The undecodable item is request item 1 but the first image decoded: its error says 1."""
    good = data_url(_photo(0))
    req = EmbeddingRequest(model="stub-model", modality="image",
                           input=["https://example.com/a.jpg", data_url(b"junk"), good])
    out = _run(lambda s: s.embeddings(req))
    assert [d["index"] for d in out["data"]] == [2]
    assert [e["index"] for e in out["errors"]] == [0, 1]
    assert out["errors"][0]["message"].startswith("image 0: URLs are not fetched")
    assert out["errors"][1]["message"].startswith("image 1 (<bytes>): cannot identify")
    assert out["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


def test_prepare_image_is_the_item_at_its_index():
    async def fn(s):
        return s.prepare_image(_photo(1), 7), s.prepare_image(b"junk", 7)

    ok, bad = _run(fn)
    assert ok.shape == (3, 4, 4) and ok.dtype == np.float32
    assert bad.index == 7 and bad.error.startswith("image 7 ")


def test_image_embeddings_and_classify_without_http():
    img = data_url(_photo(2))

    async def fn(s):
        datas = s.prepare_image_request(ImageEmbeddingRequest(input=[img, "%%"]))
        emb = await s.image_embeddings(datas, "base64")
        cls = await s.classify(ClassifyRequest(input=img, labels=["cat", "dog", "car"]))
        return emb, cls

    emb, cls = _run(fn)
    assert [d["index"] for d in emb["data"]] == [0] and isinstance(emb["data"][0]["embedding"],
                                                                   str)
    assert emb["errors"][0]["index"] == 1 and "invalid base64" in emb["errors"][0]["message"]
    assert cls["labels"] == ["cat", "dog", "car"] and len(cls["data"][0]["scores"]) == 3
    assert abs(sum(cls["data"][0]["scores"]) - 1) < 1e-5


def test_service_errors_map_to_openai_answers():
    async def fn(s):
        errors = []
        for coro in (s.embeddings(EmbeddingRequest(model="nope", input="a")),
                     s.embeddings(EmbeddingRequest(model="stub-model", input=["a"] * 9)),
                     s.embeddings(EmbeddingRequest(model="stub-model", input=[1, 2])),
                     s.classify(ClassifyRequest(input="x", labels=["a"], template="{}{}"))):
            with pytest.raises(Exception) as e:
                await coro
            errors.append(to_api_error(e.value))
        return errors

    errors = _run(fn)
    assert [(e.status, e.code) for e in errors] == [
        (404, "model_not_found"), (413, "max_items"), (422, "invalid_input"),
        (422, "invalid_template")]
    assert errors[0].payload()["error"]["param"] == "model"
    with pytest.raises(ValidationError) as v:
        EmbeddingRequest.model_validate({"input": "a"})
    err = to_api_error(v.value)
    assert (err.status, err.code) == (422, "invalid_request") and "model" in err.message
    err = to_api_error(LimitExceeded("too many", limit="max_labels", status=413))
    assert (err.status, err.code, err.kind) == (413, "max_labels", "limit")
    assert to_api_error(RuntimeError("x")) is None  # an internal error: 500, logged
    assert isinstance(to_api_error(ApiError(503, "m", code="c", kind="k")), ApiError)


def test_batch_statistics_stay_bounded():
    """Thousands of tower calls leave at most one counter per batch size."""
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 9, 600)]

    async def fn(s):
        for n in sizes:
            await s.embed_texts([f"t{j}" for j in range(n)])
        return s.stats()

    stats = _run(fn, max_queue=16)
    assert sum(n * k for n, k in stats["text"].items()) == sum(sizes)
    assert sum(stats["text"].values()) >= len(sizes)  # calls above max_batch were split
    assert set(stats["text"]) <= {1, 2, 3, 4} and stats["image"] == {}


def test_openapi_declares_the_request_bodies():
    app = create_app(StubEngine(), ServeConfig())
    paths = app.openapi()["paths"]
    for path, model in (("/v1/embeddings", EmbeddingRequest),
                        ("/v1/images/embeddings", ImageEmbeddingRequest),
                        ("/v1/classify", ClassifyRequest)):
        body = paths[path]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        assert body["required"] and set(schema["properties"]) == set(model.model_fields), path
        assert set(schema["required"]) == {n for n, f in model.model_fields.items()
                                           if f.is_required()}, path
    assert "multipart/form-data" in paths["/v1/images/embeddings"]["post"]["requestBody"][
        "content"]


def test_multipart_string_field_failure_names_its_position():
    app = create_app(StubEngine(), ServeConfig(max_items=4, max_queue=8, max_wait_ms=0.0))
    files = [("files", ("a.jpg", _photo(3), "image/jpeg")), ("files", (None, "%%%"))]

    async def fn(c: httpx.AsyncClient):
        return await c.post("/v1/images/embeddings", files=files)

    r = run_asgi(app, fn)
    assert r.status_code == 200, r.text
    assert r.json()["errors"] == [{"index": 1, "message": r.json()["errors"][0]["message"]}]
    assert r.json()["errors"][0]["message"].startswith("image 1: invalid base64")
