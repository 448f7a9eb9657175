"""clipfast.ray.serve on a local Ray instance (one deployment, started once: Ray Serve is slow to
start): handle calls and the HTTP route give the Engine's embeddings; a bad image is that
item's failure; batches never exceed max_batch."""

from __future__ import annotations

import base64
import socket

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from test_serve_support import data_url, decode_rows, jpeg  # noqa: E402

ATOL = 1e-6  # see test_serve.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(small_clip_artifact):
    from clipfast.ray import build_app

    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(str(small_clip_artifact), max_batch=4, max_wait_ms=50,
                                     model_name="m", backend="onnxruntime"),
                           name="clipfast", route_prefix="/v1/embeddings")
        yield handle, f"http://127.0.0.1:{port}/v1/embeddings"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_handle_http_and_batches(deployed, small_clip_engine, photos):
    handle, url = deployed
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
    r = httpx.post(url, json={"model": "m", "modality": "image", "input": [
        data_url(good[0]), "https://example.com/a.jpg",
        base64.b64encode(good[1]).decode()]}, timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(decode_rows(r.json())) == [0, 2] and r.json()["errors"][0]["index"] == 1
    assert httpx.post(url, json={"model": "other", "input": "a"}, timeout=60).status_code == 404

    stats = handle.stats.remote().result()
    assert sum(stats["text"]) == 10 + 3 and max(stats["text"]) <= 4
    assert sum(stats["image"]) == 3 + 2 and max(stats["image"]) <= 4
