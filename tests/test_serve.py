"""clipfast serve: the batcher, the app's limits, errors, overload, timeout and API key (on a
stand-in engine, no model), and the real endpoints on a tiny exported CLIP through a uvicorn
server on a loopback port: the official openai client's embeddings equal Engine.encode_texts,
images and classification equal the Engine's, per-item image errors."""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_serve_support import (  # noqa: E402
    StubEngine,
    ThreadServer,
    data_url,
    decode_rows,
    jpeg,
    run_asgi,
)

from clipfast.serve.app import create_app  # noqa: E402
from clipfast.serve.batcher import Overloaded, TowerBatcher  # noqa: E402
from clipfast.serve.config import ServeConfig  # noqa: E402
from clipfast.serve.inputs import BadItem, decode_inline  # noqa: E402

# NOTE: ONNX Runtime's CPU kernels may order a row's reductions differently for different batch
# sizes on some ISAs, so rows computed in a merged batch are compared to the Engine's within
# 1e-6 (embeddings are L2-normalised: |x| <= 1); on the machines measured they were bitwise equal.
ATOL = 1e-6


def _photo(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


# -- the batcher ---------------------------------------------------------------------------------
def _batcher(run, **kw):
    from concurrent.futures import ThreadPoolExecutor

    opts = {"max_batch": 4, "max_wait_s": 0.0, "max_queue": 16}
    opts.update(kw)
    return TowerBatcher("text", run, executor=ThreadPoolExecutor(1), **opts)


async def _until(condition) -> None:
    """Yield to the loop until ``condition()`` holds (events, not elapsed time, decide)."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def test_batcher_merges_queued_requests_and_splits_large_ones_in_order():
    gate, entered, sizes = threading.Event(), threading.Event(), []

    def run(rows):
        entered.set()
        gate.wait(10)
        sizes.append(len(rows))
        return np.asarray(rows, np.float32)[:, None] * np.ones((1, 2), np.float32)

    async def main():
        b = _batcher(run)
        first = asyncio.create_task(b.submit([0.0]))
        await _until(entered.is_set)  # the first batch is in the tower, held by the gate
        rest = [asyncio.create_task(b.submit([float(10 * k + j) for j in range(n)]))
                for k, n in enumerate((1, 2, 6))]
        await _until(lambda: b.queued == 9)
        gate.set()
        outs = await asyncio.gather(first, *rest)
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert sizes[0] == 1 and sizes[1:] == [4, 4, 1]  # 9 queued rows -> full batches of 4
    for k, (out, n) in enumerate(zip(outs[1:], (1, 2, 6))):
        np.testing.assert_array_equal(out[:, 0], [10 * k + j for j in range(n)])


def test_batcher_admission_is_bounded_and_cancelled_rows_are_dropped():
    gate, entered, seen = threading.Event(), threading.Event(), []

    def run(rows):
        entered.set()
        gate.wait(10)
        seen.extend(rows)
        return np.zeros((len(rows), 1), np.float32)

    async def main():
        b = _batcher(run, max_queue=5)
        r1 = b.reserve(3)
        with pytest.raises(Overloaded, match=r"queue is full \(3 of 5 rows admitted, "
                                             r"--max-queue\)") as e:
            b.reserve(3)
        assert e.value.retry_after >= 1
        r2 = b.reserve(2)
        blocker = asyncio.create_task(b.submit(["a"]))
        await _until(entered.is_set)
        victim = asyncio.create_task(b.submit(["b", "c"]))
        await _until(lambda: b.queued == 2)
        victim.cancel()  # a timed-out request: its rows never reach the tower
        with pytest.raises(asyncio.CancelledError):
            await victim
        gate.set()
        await blocker
        r1.release()
        r2.release()
        assert b.admitted == 0 and b.queued == 0
        b.reserve(5).release()
        await b.close()

    asyncio.run(main())
    assert seen == ["a"]


def test_batcher_tower_failure_reaches_every_request_of_the_batch():
    def run(rows):
        raise RuntimeError("tower exploded")

    async def main():
        b = _batcher(run, max_wait_s=0.05)
        res = await asyncio.gather(b.submit([1]), b.submit([2]), return_exceptions=True)
        await b.close()
        return res

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_inline_images_never_fetch_urls():
    raw = jpeg(_photo(0))
    assert decode_inline(data_url(raw), 0) == raw
    assert decode_inline(base64.b64encode(raw).decode(), 0) == raw
    for bad, msg in (("https://example.com/cat.jpg", "URLs are not fetched"),
                     ("file:///etc/passwd", "URLs are not fetched"),
                     ("data:image/png,notbase64", "must be base64"),
                     ("data:text/plain;base64,aGk=", "expected image/"),
                     ("%%%", "invalid base64"), (3, "expected a base64 string")):
        with pytest.raises(BadItem, match=msg):
            decode_inline(bad, 5)


# -- the app on a stand-in engine (httpx ASGITransport) ------------------------------------------


def _cfg(**kw) -> ServeConfig:
    opts = {"max_items": 4, "max_queue": 8, "max_body_bytes": 4096, "max_image_pixels": 10_000,
            "max_wait_ms": 0.0}
    opts.update(kw)
    return ServeConfig(**opts)


def test_limits_are_413_or_422_naming_the_limit():
    app = create_app(StubEngine(), _cfg())
    big = jpeg(np.zeros((120, 100, 3), np.uint8), "PNG")  # 12000 pixels, small file

    async def fn(c):
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "input": ["a"] * 5})
        assert r.status_code == 413 and r.json()["error"]["code"] == "max_items"
        assert "--max-items" in r.json()["error"]["message"]
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "input": ["a" * 5000]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "max_body_bytes"
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "modality": "image",
                                                 "input": [data_url(big, "image/png")]})
        # The pixel limit fails its item; with no other item the request is 422.
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_items"
        assert "100x120 = 12000 pixels" in r.json()["error"]["message"]
        assert "--max-image-pixels" in r.json()["error"]["message"]
        for body, code in (({"model": "other", "input": "a"}, 404),
                           ({"model": "stub-model", "input": [1, 2]}, 422),
                           ({"model": "stub-model", "input": "a", "dimensions": 2}, 422),
                           ({"model": "stub-model"}, 422)):
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == code, (body, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "code"}
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "input": "a",
                                                 "encoding_format": None})
        assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list)
        r = await c.post("/v1/embeddings", content=b"{not json",
                         headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        return (await c.get("/metrics")).text

    text = run_asgi(app, fn)
    assert 'clipfast_errors_total{endpoint="/v1/embeddings",kind="limit"} 2.0' in text



def test_classify_takes_more_labels_than_items_per_request_in_chunks():
    engine = StubEngine()
    app = create_app(engine, _cfg(max_items=4, max_queue=8, max_labels=10,
                                  max_body_bytes=100_000))
    img = data_url(jpeg(_photo(3)))

    async def fn(c):
        labels = [f"l{i}" for i in range(10)]
        r = await c.post("/v1/classify", json={"input": [img], "labels": labels})
        assert r.status_code == 200, r.text
        scores = r.json()["data"][0]["scores"]
        assert len(scores) == 10 and abs(sum(scores) - 1) < 1e-5
        calls = list(engine.calls)
        r2 = await c.post("/v1/classify", json={"input": [img], "labels": labels[:3]})
        assert r2.status_code == 200
        r3 = await c.post("/v1/classify", json={"input": [img], "labels": labels + ["x"]})
        assert r3.status_code == 413 and r3.json()["error"]["code"] == "max_labels"
        return calls, list(engine.calls)

    calls, after = run_asgi(app, fn)
    assert sorted(calls[:-1]) == [2, 4, 4]  # 10 prompts in chunks of max_items, then the image
    assert after[len(calls):] == [1]  # the second request's prompts came from the cache

def test_overload_answers_503_with_retry_after_and_admits_only_max_queue():
    engine = StubEngine()
    engine.gate.clear()
    app = create_app(engine, _cfg(max_queue=8, max_items=4))
    high = []
    service = app.state.service
    b = service.batchers["text"]

    async def fn(c):
        async def one(k):
            return await c.post("/v1/embeddings",
                                json={"model": "stub-model", "input": [f"t{k}-{j}" for j in
                                                                       range(4)]})
        tasks = [asyncio.create_task(one(k)) for k in range(12)]  # 48 rows for a queue of 8
        pending: set = set(tasks)
        while len(pending) > 2:  # woken by each refusal, not by a clock
            high.append(b.admitted)
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        high.append(b.admitted)
        # The towers are held: the two admitted requests hold the whole queue.
        assert b.admitted == 8 and not any(t.done() for t in pending)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    rs = run_asgi(app, fn)
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 2 + [503] * 10
    assert max(high) <= 8
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
        else:
            assert len(r.json()["data"]) == 4
    assert b.admitted == 0


def test_requests_time_out_with_504_and_leave_the_queue():
    engine = StubEngine()
    engine.gate.clear()
    app = create_app(engine, _cfg(request_timeout_s=0.3))

    async def fn(c):
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "input": ["a", "b"]})
        engine.gate.set()
        return r

    r = run_asgi(app, fn)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert "--request-timeout-s" in r.json()["error"]["message"]
    assert app.state.service.batchers["text"].admitted == 0


def test_api_key_is_required_on_v1_and_metrics_but_not_on_probes():
    app = create_app(StubEngine(), _cfg(api_key="s3cret"))

    async def fn(c):
        body = {"model": "stub-model", "input": "a"}
        out = {
            "none": (await c.post("/v1/embeddings", json=body)).status_code,
            "wrong": (await c.post("/v1/embeddings", json=body,
                                   headers={"Authorization": "Bearer s3cre"})).status_code,
            "bearer": (await c.post("/v1/embeddings", json=body,
                                    headers={"Authorization": "Bearer s3cret"})).status_code,
            "x-api-key": (await c.get("/v1/models",
                                      headers={"X-API-Key": "s3cret"})).status_code,
            "metrics": (await c.get("/metrics")).status_code,
            "health": (await c.get("/health")).status_code,
        }
        r = await c.get("/v1/models")
        assert r.headers["www-authenticate"] == "Bearer"
        return out

    assert run_asgi(app, fn) == {"none": 401, "wrong": 401, "bearer": 200, "x-api-key": 200,
                             "metrics": 401, "health": 200}


def test_api_key_from_the_environment(monkeypatch):
    from clipfast import settings

    monkeypatch.setenv("CLIPFAST_API_KEY", " k ")
    assert settings.CLIPFAST_API_KEY == "k"


def test_serve_without_the_extra_names_it(monkeypatch, capsys):
    import clipfast.serve.cli as serve_cli
    from clipfast.cli import main

    monkeypatch.setattr(serve_cli, "missing_extra", lambda: ["fastapi", "uvicorn"])
    assert main(["serve", "/nonexistent"]) == 1
    assert "pip install 'clipfast[serve]'" in capsys.readouterr().err


def test_cli_module_does_not_import_fastapi():
    import subprocess
    import sys

    code = ("import sys, clipfast.cli, clipfast.serve.cli; clipfast.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the real thing: a tiny exported CLIP behind uvicorn -----------------------------------------
@pytest.fixture(scope="module")
def server(small_clip_artifact):
    from clipfast.serve.server import load_engine

    config = ServeConfig(max_batch=8, max_wait_ms=20, max_items=16, max_queue=64,
                         model_name="clip-small")
    engine = load_engine(str(small_clip_artifact), backend="onnxruntime", config=config)
    app = create_app(engine, config)
    with ThreadServer(app) as url:
        yield url


def test_openai_client_embeddings_equal_engine_encode_texts(server, small_clip_engine):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    texts = ["a photo of a cat", "a dog", "", "ünïcödé text, with punctuation!", "x " * 100]
    want = small_clip_engine.encode_texts(texts)
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        resp = client.embeddings.create(model="clip-small", input=texts, **kw)
        got = np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)],
                         np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        assert resp.model == "clip-small" and resp.usage.prompt_tokens > 0
    one = client.embeddings.create(model="clip-small", input="a dog")
    np.testing.assert_allclose(one.data[0].embedding, want[1], rtol=0, atol=ATOL)
    assert [m.id for m in client.models.list().data] == ["clip-small"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")


def test_concurrent_clients_are_batched_and_get_their_own_rows(server, small_clip_engine):
    texts = [f"text number {i}" for i in range(24)]
    want = small_clip_engine.encode_texts(texts)

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json={
                "model": "clip-small", "input": [t], "encoding_format": "float"})
                for t in texts))
        return [decode_rows(r.json())[0] for r in rs]

    got = np.stack(asyncio.run(main()))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    metrics = httpx.get(server + "/metrics").text
    count = [line for line in metrics.splitlines()
             if line.startswith('clipfast_batch_size_count{tower="text"}')]
    total = [line for line in metrics.splitlines()
             if line.startswith('clipfast_items_total{tower="text"}')]
    assert count and total and float(total[0].split()[-1]) >= 24


def test_images_by_json_multipart_and_embeddings_with_a_bad_item(server, small_clip_engine, photos):
    good = [jpeg(photos["chelsea"]), jpeg(_photo(1)), jpeg(photos["coffee"])]
    want = small_clip_engine.encode_images(good)
    corrupt = good[0][:200]
    items = [data_url(good[0]), "https://example.com/x.jpg", data_url(good[1]),
             data_url(corrupt), base64.b64encode(good[2]).decode()]
    expect = {0: want[0], 2: want[1], 4: want[2]}

    r = httpx.post(server + "/v1/embeddings", json={"model": "clip-small", "input": items,
                                                    "modality": "image"}, timeout=60)
    assert r.status_code == 200, r.text
    rows, errors = decode_rows(r.json()), r.json()["errors"]
    assert sorted(rows) == [0, 2, 4] and [e["index"] for e in errors] == [1, 3]
    assert "URLs are not fetched" in errors[0]["message"]
    assert errors[1]["message"].startswith("image 3 ")
    for i, row in rows.items():
        np.testing.assert_allclose(row, expect[i], rtol=0, atol=ATOL)

    r = httpx.post(server + "/v1/images/embeddings", json={"input": items[:3]}, timeout=60)
    assert r.status_code == 200 and sorted(decode_rows(r.json())) == [0, 2]

    files = [("files", ("a.jpg", good[0], "image/jpeg")), ("files", ("bad.jpg", corrupt,
                                                                      "image/jpeg")),
             ("files", ("c.jpg", good[2], "image/jpeg"))]
    r = httpx.post(server + "/v1/images/embeddings", files=files,
                   data={"encoding_format": "base64"}, timeout=60)
    assert r.status_code == 200, r.text
    rows = decode_rows(r.json())
    assert sorted(rows) == [0, 2] and r.json()["errors"][0]["index"] == 1
    np.testing.assert_allclose(rows[0], want[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(rows[2], want[2], rtol=0, atol=ATOL)

    r = httpx.post(server + "/v1/images/embeddings", json={"input": [data_url(corrupt)]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_items"


def test_classify_equals_engine_classify(server, small_clip_engine, photos):
    imgs = [jpeg(photos["chelsea"]), jpeg(photos["rocket"])]
    labels = ["cat", "rocket", "cup of coffee"]
    want = small_clip_engine.classify(imgs, labels)
    r = httpx.post(server + "/v1/classify", json={"input": [data_url(b) for b in imgs],
                                                  "labels": labels}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    got = np.asarray([d["scores"] for d in data], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert [d["label"] for d in data] == [labels[int(np.argmax(p))] for p in want]


def test_models_health_ready_metrics(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    ready = httpx.get(server + "/ready")
    assert ready.status_code == 200 and ready.json()["queue"]["image"]["max_queue"] == 64
    m = httpx.get(server + "/v1/models").json()["data"][0]
    assert m["id"] == "clip-small" and m["backend"] == "onnxruntime" and m["embed_dim"] > 0
    text = httpx.get(server + "/metrics").text
    for name in ("clipfast_requests_total", "clipfast_batch_size_bucket",
                 "clipfast_queue_depth", "clipfast_request_latency_seconds_bucket",
                 "clipfast_errors_total", "clipfast_admitted_rows"):
        assert name in text, name

