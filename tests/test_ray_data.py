"""Ray Data: EmbedBatch in Dataset.map_batches gives the Engine's rows for image bytes, image
paths and texts, `clipfast embed --ray` writes the local job's output row for row, the README's
snippet runs as written on 2 CPUs, and a missing cluster is a clear error. One local Ray
instance for the module (2 CPUs, 200 MB object store)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from test_embed import make_images  # noqa: E402

import clipfast  # noqa: E402
from clipfast.embed import EmbedOptions, read_failures, run_embed  # noqa: E402
from clipfast.errors import ClipfastError  # noqa: E402

README = Path(__file__).parents[1] / "README.md"


def test_no_cluster_at_address_is_a_clear_error(small_clip_artifact, tmp_path, monkeypatch):
    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_images(tmp_path / "imgs", 2)
    opts = EmbedOptions(artifact=str(small_clip_artifact), sources=[str(tmp_path / "imgs")],
                        out=str(tmp_path / "o"), ray=True, ray_address=f"127.0.0.1:{port}",
                        progress=False)
    with pytest.raises(ClipfastError, match=rf"no Ray cluster answers at --address 127.0.0.1:"
                                            rf"{port} .*ray start --head"):
        run_embed(opts)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if not os.path.exists("/tmp/ray/ray_current_cluster"):  # else `auto` finds that one
        opts.ray_address = "auto"
        with pytest.raises(ClipfastError, match="no Ray cluster answers at --address auto"):
            run_embed(opts)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True, _node_ip_address="127.0.0.1")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-imgs")
    paths = make_images(d, 10, seed=7)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d, sorted(str(p) for p in paths)


def test_embed_batch_adds_the_engines_rows(ray_local, small_clip_artifact, images):
    from clipfast.ray import EmbedBatch

    _, paths = images
    engine = clipfast.Engine(small_clip_artifact, backend="onnxruntime")
    blobs = [open(p, "rb").read() for p in paths]
    rows = [{"id": i, "image": b, "path": p, "text": f"thing {i}"}
            for i, (b, p) in enumerate(zip(blobs, paths))]
    rows.append({"id": 99, "image": b"not an image", "path": "/nope.png", "text": "x"})
    ds = ray.data.from_items(rows)
    ref_img = engine.encode_images(paths)
    for column, kind in (("image", "image_bytes"), ("path", "image_path")):
        out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={
            "artifact": str(small_clip_artifact), "column": column, "kind": kind,
            "backend": "onnxruntime"},
            compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, num_gpus=0).take_all()
        got = np.stack([r["embedding"] for r in out[:-1]])
        np.testing.assert_allclose(got, ref_img, atol=1e-6, err_msg=kind)
        assert [r["error"] for r in out[:-1]] == [None] * len(paths)
        assert out[-1]["error"] and np.isnan(out[-1]["embedding"]).all()
        assert [r["id"] for r in out] == [r["id"] for r in rows]  # columns kept
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={
        "artifact": str(small_clip_artifact), "column": "text", "kind": "text"},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4).take_all()
    ref_txt = engine.encode_texts([r["text"] for r in rows])
    np.testing.assert_allclose(np.stack([r["embedding"] for r in out]), ref_txt, atol=1e-6)


def test_clipfast_embed_ray_writes_the_local_jobs_rows(ray_local, small_clip_artifact, images,
                                                       tmp_path):
    folder, _ = images
    common = {"artifact": str(small_clip_artifact), "sources": [str(folder)], "batch_size": 4,
              "shard_size": 4, "progress": False}
    run_embed(EmbedOptions(out=str(tmp_path / "local"), **common))
    run_embed(EmbedOptions(out=str(tmp_path / "ray"), ray=True, ray_concurrency=1, **common))
    k_local, e_local = clipfast.read_embeddings(tmp_path / "local")
    k_ray, e_ray = clipfast.read_embeddings(tmp_path / "ray")
    assert k_ray == k_local and len(k_ray) == 10
    np.testing.assert_allclose(e_ray, e_local, atol=1e-6)
    assert read_failures(tmp_path / "ray") == read_failures(tmp_path / "local")
    assert [f["key"] for f in read_failures(tmp_path / "ray")] == [str(folder / "broken.png")]


def _readme_snippet() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(import os, ray, clipfast\.ray\n.*?)```", text, re.S)
    assert len(blocks) == 1, "the README's Ray Data snippet"
    return blocks[0]


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record):
        if "deprecated" in record.getMessage():
            self.seen.append(record.getMessage())


def test_readme_ray_data_snippet_runs_as_written_on_two_cpus(ray_local, small_clip_artifact,
                                                            images, tmp_path, monkeypatch):
    _, paths = images
    (tmp_path / "items").mkdir()
    pq.write_table(pa.table({"id": list(range(len(paths))),
                             "jpg": [open(p, "rb").read() for p in paths]}),
                   tmp_path / "items" / "part-0.parquet")
    (tmp_path / "art").symlink_to(small_clip_artifact)
    monkeypatch.chdir(tmp_path)
    assert ray.cluster_resources()["CPU"] == 2
    handler = _Deprecations()
    logging.getLogger("ray").addHandler(handler)

    def hung(*_a):
        raise TimeoutError("the README snippet did not finish in 300 s on 2 CPUs")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    try:
        exec(compile(_readme_snippet(), "README.md", "exec"), {})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        logging.getLogger("ray").removeHandler(handler)
    got = pq.read_table(tmp_path / "emb").sort_by("id")
    engine = clipfast.Engine(small_clip_artifact, backend="onnxruntime")
    np.testing.assert_allclose(np.stack(got.column("embedding").to_pylist()),
                               engine.encode_images(paths), atol=1e-6)
    assert not handler.seen, handler.seen
