"""encode_images streams its chunks: chunk k+1 is preprocessed while the tower runs chunk k, and a
backend with ``run_image_batches`` gets the chunks as a lazy stream (TensorRT's two-slot
pipeline then overlaps them). On CPU stand-ins: a backend that claims to be on CUDA around the
real ONNX Runtime backend, and test_tensorrt's CUDA / TensorRT stand-ins for the pipeline.
Ordering is checked with events, never with timing; the timeouts only keep a broken
implementation from hanging the run."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
from PIL import Image
from test_tensorrt import _fake_trt, _FakeCuda, _NoLog

import clipfast
from clipfast.backends.base import Backend, host_array
from clipfast.backends.batching import BatchProfile
from clipfast.backends.tensorrt import backend as trt_backend
from clipfast.errors import ClipfastError, ImageLoadError

WAIT_S = 60  # a deadlock guard, not a timing assumption


class _OnCuda(Backend):
    """The real backend's arithmetic, presented as a CUDA backend (so the Engine prefetches)."""

    name, device = "stand-in", "cuda"

    def __init__(self, inner):
        self.inner = inner
        self.calls: list = []

    def run_image(self, pixels):
        self.calls.append(("run_image", len(pixels)))
        return self.inner.run_image(host_array(pixels, np.float32))

    def run_text(self, feed):
        return self.inner.run_text(feed)

    def describe(self):
        return {"backend": self.name}


class _Streaming(_OnCuda):
    """Consumes the stream one batch at a time, as TensorRT's pipeline does; before finishing
    batch k it waits for the event "preprocessing of chunk k+1 started"."""

    def __init__(self, inner, started, log):
        super().__init__(inner)
        self.started, self.log = started, log
        self.waited: list[bool] = []

    def run_image_batches(self, batches):
        self.calls.append(("run_image_batches", type(batches).__name__))
        outs = []
        for k, pixels in enumerate(batches):
            self.log.append(("tower-start", k))
            out = self.inner.run_image(host_array(pixels, np.float32))
            if k + 1 < len(self.started):
                self.waited.append(self.started[k + 1].wait(WAIT_S))
            self.log.append(("tower-end", k))
            outs.append(out)
            pixels = None  # held no longer than a real pipeline holds a host batch
        return outs


def _images(n: int, bad: dict[int, object] | None = None) -> list:
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        h, w = 40 + 13 * i, 70 - 5 * i
        items.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for i, item in (bad or {}).items():
        items[i] = item
    return items


@pytest.fixture(scope="module")
def engines(vitb32_artifact):
    """(reference: CPU, sequential; streaming: the same backend behind a CUDA stand-in)."""
    ref = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=2, self_check=False)
    eng = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=2, self_check=False)
    return ref, eng


def _instrument(eng, n_chunks, monkeypatch):
    """Wrap the engine's CPU preprocessing: log start / end per chunk, set a start event per
    chunk, and count the pixel arrays alive (the most at once is returned in ``alive``)."""
    size = eng._chunk
    real = eng._pixels
    started = [threading.Event() for _ in range(n_chunks)]
    log: list = []
    alive = {"now": 0, "max": 0}
    lock = threading.Lock()

    def gone():
        with lock:
            alive["now"] -= 1

    def pixels(items, offset, errors):
        k = offset // size
        log.append(("pre-start", k))
        started[k].set()
        out = real(items, offset, errors)
        with lock:
            alive["now"] += 1
            alive["max"] = max(alive["max"], alive["now"])
        weakref.finalize(out[0], gone)
        log.append(("pre-end", k))
        return out

    monkeypatch.setattr(eng, "_pixels", pixels)
    return started, log, alive


def test_preprocessing_of_the_next_chunk_overlaps_the_tower(engines, monkeypatch):
    ref, eng = engines
    items = _images(7)  # chunks of 2, 2, 2, 1
    started, log, alive = _instrument(eng, 4, monkeypatch)
    backend = _Streaming(ref._backend, started, log)
    monkeypatch.setattr(eng, "_backend", backend)

    got = eng.encode_images(items)

    assert backend.calls == [("run_image_batches", "generator")]
    assert backend.waited == [True, True, True]
    for k in range(3):  # chunk k+1's preprocessing started before chunk k's tower finished
        assert log.index(("pre-start", k + 1)) < log.index(("tower-end", k)), log
    assert [e for e in log if e[0] == "tower-start"] == [("tower-start", k) for k in range(4)]
    assert alive["max"] <= 2, alive  # the chunk in the tower and the one being preprocessed
    np.testing.assert_array_equal(got, ref.encode_images(items))  # bitwise: same chunks


def test_skip_keeps_order_failures_and_rows_bitwise(engines, monkeypatch):
    ref, eng = engines
    # chunk 1 (items 2, 3) fails entirely, chunk 0 and 3 partly
    bad = {1: b"not an image", 2: "/no/such/file.png", 3: Image.new("RGB", (0, 4)),
           6: object()}
    items = _images(8, bad)
    backend = _Streaming(ref._backend, [], [])
    monkeypatch.setattr(eng, "_backend", backend)

    got = eng.encode_images(items, errors="skip")
    want = ref.encode_images(items, errors="skip")

    assert backend.calls == [("run_image_batches", "generator")]
    assert got.indices.tolist() == want.indices.tolist() == [0, 4, 5, 7]
    assert got.failures == want.failures and [f.index for f in got.failures] == [1, 2, 3, 6]
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    # unnormalised rows are the tower's own (batched differently: within float error)
    np.testing.assert_allclose(eng.encode_images(items, errors="skip", normalize=False)
                               .embeddings, ref.run_image_tower(ref.preprocess(
                                   [items[i] for i in (0, 4, 5, 7)])), atol=1e-5)


def test_a_backend_without_batches_gets_one_chunk_at_a_time(engines, monkeypatch):
    ref, eng = engines
    items = _images(5, {3: b"junk"})
    backend = _OnCuda(ref._backend)
    monkeypatch.setattr(eng, "_backend", backend)
    got = eng.encode_images(items, errors="skip")
    want = ref.encode_images(items, errors="skip")
    assert backend.calls == [("run_image", 2), ("run_image", 1), ("run_image", 1)]
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    assert got.failures == want.failures


def test_raise_stops_the_stream_at_the_bad_image(engines, monkeypatch):
    ref, eng = engines
    items = _images(6, {4: b"junk"})
    backend = _Streaming(ref._backend, [], [])
    monkeypatch.setattr(eng, "_backend", backend)
    with pytest.raises(ImageLoadError, match="image 4") as info:
        eng.encode_images(items)
    assert info.value.index == 4
    np.testing.assert_array_equal(eng.encode_images(items[:4]), ref.encode_images(items[:4]))


def test_a_backend_returning_too_few_rows_is_an_error(engines, monkeypatch):
    ref, eng = engines

    class Short(_OnCuda):
        def run_image_batches(self, batches):
            return [self.run_image(b) for b in batches][:-1]

    monkeypatch.setattr(eng, "_backend", Short(ref._backend))
    with pytest.raises(ClipfastError, match="returned 4 image rows for 5 images"):
        eng.encode_images(_images(5))


def test_the_engine_on_cpu_stays_sequential(engines, monkeypatch):
    """On a CPU backend nothing is prefetched: chunk k+1 starts after chunk k's tower."""
    ref, eng = engines
    items = _images(5)
    started, log, _ = _instrument(eng, 3, monkeypatch)

    class Seq(Backend):
        name, device = "cpu-stand-in", "cpu"

        def run_image(self, pixels):
            log.append(("tower", len(pixels)))
            return ref._backend.run_image(pixels)

        def run_text(self, feed):
            return ref._backend.run_text(feed)

        def describe(self):
            return {}

    monkeypatch.setattr(eng, "_backend", Seq())
    np.testing.assert_array_equal(eng.encode_images(items), ref.encode_images(items))
    assert [e[0] for e in log] == ["pre-start", "pre-end", "tower"] * 3


# -- TensorRT's image pipeline fed by a generator ----------------------------------------------
def _trt_backend(cuda):
    trt, runtime, w = _fake_trt(cuda)
    tower = trt_backend.TowerRunner(trt, cuda, runtime, _NoLog(), b"plan", "image", ["x"], "y",
                                    BatchProfile(1, 4, 8), True)
    backend = trt_backend.TensorRTBackend.__new__(trt_backend.TensorRTBackend)
    backend._towers = {"image": tower}
    return backend, tower, w


def test_tensorrt_run_image_batches_consumes_a_generator_lazily():
    cuda = _FakeCuda()
    backend, tower, w = _trt_backend(cuda)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 6)).astype(np.float32) for n in (13, 3, 8, 1, 5)]
    submitted = []
    real_submit = tower._submit

    def submit(slot, feed, chunk, out):
        submitted.append(chunk)
        real_submit(slot, feed, chunk, out)

    tower._submit = submit
    seen = []

    def stream():
        for k, b in enumerate(batches):
            if k:
                # batch k-1's chunks are enqueued, and the last one is still in flight
                seen.append((len(submitted), sum(s.pending is not None for s in tower.slots)))
            yield b

    outs = backend.run_image_batches(stream())
    # 13 rows -> chunks 8 + 5, then one chunk per batch
    assert seen == [(2, 2), (3, 2), (4, 2), (5, 2)]
    for b, out in zip(batches, outs):
        np.testing.assert_allclose(out, b @ w.T, rtol=1e-6)
    assert all(slot.pending is None and not slot.stream.queue for slot in tower.slots)
    tower._submit = real_submit
    as_list = backend.run_image_batches(batches)
    for a, b in zip(outs, as_list):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate(outs),
                                  np.concatenate(tower.run([{"x": b} for b in batches])))


def test_tensorrt_stream_error_leaves_no_pending_chunk():
    cuda = _FakeCuda()
    backend, tower, w = _trt_backend(cuda)
    x = np.ones((5, 6), np.float32)

    def stream():
        yield x
        yield x
        raise ImageLoadError("image 9: broken", index=9)

    with pytest.raises(ImageLoadError, match="image 9"):
        backend.run_image_batches(stream())
    assert all(slot.pending is None and not slot.stream.queue for slot in tower.slots)
    np.testing.assert_allclose(backend.run_image_batches([x])[0], x @ w.T, rtol=1e-6)


def test_tensorrt_stream_test_catches_a_missing_wait():
    backend, _, w = _trt_backend(_FakeCuda(event_waits=False))
    x = [np.full((n, 6), n, np.float32) for n in (8, 3, 8)]
    outs = backend.run_image_batches(iter(x))
    assert not all(np.allclose(o, b @ w.T) for o, b in zip(outs, x))

