"""clipfast.ray.serve on a local Ray instance (one deployment, started once: Ray Serve is slow to
start): handle calls and the HTTP routes give the Engine's embeddings; a bad image is that
item's failure, named by its request index; batches never exceed max_batch; the same requests
through ``clipfast serve``'s ASGI app and through the Ray deployment get the same JSON."""

from __future__ import annotations

import base64
import socket

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from test_serve_support import data_url, decode_rows, jpeg, run_asgi  # noqa: E402

from clipfast.serve.config import ServeConfig  # noqa: E402

ATOL = 1e-6  # see test_serve.py
SETTINGS = {"max_batch": 4, "max_wait_ms": 50, "model_name": "m"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(small_clip_artifact):
    from clipfast.ray import build_app

    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(str(small_clip_artifact), backend="onnxruntime",
                                     **SETTINGS), name="clipfast", route_prefix="/")
        yield handle, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_handle_http_and_batches(deployed, small_clip_engine, photos):
    handle, base = deployed
    url = base + "/v1/embeddings"
    texts = [f"a photo of thing {i}" for i in range(10)]
    got = handle.embed_texts.remote(texts).result()
    np.testing.assert_allclose(got, small_clip_engine.encode_texts(texts), rtol=0, atol=ATOL)

    good = [jpeg(photos["chelsea"]), jpeg(photos["coffee"])]
    emb, idx, failures = handle.embed_images.remote([good[0], b"not an image", good[1]]
                                                    ).result()
    assert idx == [0, 2] and [f.index for f in failures] == [1]
    assert failures[0].error.startswith("image 1 ")
    np.testing.assert_allclose(emb, small_clip_engine.encode_images(good), rtol=0, atol=ATOL)

    r = httpx.post(url, json={"model": "m", "input": texts[:3], "encoding_format": "base64"},
                   timeout=60)
    assert r.status_code == 200, r.text
    rows = decode_rows(r.json())
    np.testing.assert_allclose(np.stack([rows[i] for i in range(3)]),
                               small_clip_engine.encode_texts(texts[:3]), rtol=0, atol=ATOL)
    assert r.json()["usage"]["prompt_tokens"] > 0  # counted, as clipfast serve counts them
    # The undecodable image is request item 1 but the first image decoded (the URL before it
    # is refused unread): its error names the request's index.
    r = httpx.post(url, json={"model": "m", "modality": "image", "input": [
        "https://example.com/a.jpg", data_url(b"not an image"), data_url(good[0]),
        base64.b64encode(good[1]).decode()]}, timeout=60)
    assert r.status_code == 200, r.text
    errors = r.json()["errors"]
    assert sorted(decode_rows(r.json())) == [2, 3] and [e["index"] for e in errors] == [0, 1]
    assert errors[1]["message"].startswith("image 1 "), errors
    assert httpx.post(url, json={"model": "other", "input": "a"}, timeout=60).status_code == 404

    stats = handle.stats.remote().result()
    assert sum(n * k for n, k in stats["text"].items()) == 10 + 3 and max(stats["text"]) <= 4
    assert sum(n * k for n, k in stats["image"].items()) == 2 + 2
    assert max(stats["image"]) <= 4


def test_ray_serve_answers_as_clipfast_serve(deployed, small_clip_artifact, photos):
    """Byte for byte the same JSON (status and body) from the ASGI app and the Ray replica."""
    from clipfast.serve.app import create_app
    from clipfast.serve.service import load_engine

    _, base = deployed
    config = ServeConfig(**SETTINGS)
    app = create_app(load_engine(str(small_clip_artifact), backend="onnxruntime",
                                 config=config), config)
    img = data_url(jpeg(photos["chelsea"]))
    requests = [
        ("post", "/v1/embeddings", {"model": "m", "input": ["a cat", "two dogs"]}),
        ("post", "/v1/embeddings", {"model": "m", "input": "a cat", "encoding_format": "base64"}),
        ("post", "/v1/embeddings", {"model": "m", "modality": "image",
                                    "input": ["ftp://x/y.png", data_url(b"junk"), img]}),
        ("post", "/v1/embeddings", {"model": "other", "input": "a"}),
        ("post", "/v1/embeddings", {"model": "m", "input": [1, 2]}),
        ("post", "/v1/embeddings", {"model": "m", "input": ["x"] * 65}),
        ("post", "/v1/embeddings", {"input": "no model"}),
        ("post", "/v1/images/embeddings", {"input": [img, "bad base64!"]}),
        ("post", "/v1/classify", {"input": [img], "labels": ["cat", "dog"]}),
        ("post", "/v1/classify", {"input": [img], "labels": ["cat"], "template": "{} {}"}),
        ("post", "/v1/nowhere", {}),
        ("get", "/health", None),
    ]

    async def local(c):
        return [await c.request(m.upper(), p, json=b) for m, p, b in requests]

    ours = run_asgi(app, local)
    with httpx.Client(base_url=base, timeout=60) as c:
        theirs = [c.request(m.upper(), p, json=b) for m, p, b in requests]
    for (_, path, _), a, b in zip(requests, ours, theirs):
        assert (a.status_code, a.content) == (b.status_code, b.content), (path, a.text[:300],
                                                                          b.text[:300])
        assert a.headers["content-type"] == b.headers["content-type"]
    models = [r.json()["data"][0] for r in (run_asgi(app, lambda c: c.get("/v1/models")),
                                           httpx.get(base + "/v1/models", timeout=60))]
    for m in models:
        m.pop("created")
    assert models[0] == models[1]
