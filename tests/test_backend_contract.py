"""The backend contract: every registered backend subclasses ``clipfast.backends.Backend``, the
Engine reaches backends only through it (streaming included, by the default loop where a
backend does not overlap batches), and ``Engine.backend_info()`` is what bench and ``describe()``
read. The batch planner (``clipfast.backends.batching``) decides the chunk sizes."""

from __future__ import annotations

import gc
import inspect
import weakref

import numpy as np
import pytest

import clipfast
from clipfast import backends
from clipfast.backends import Backend, BackendInfo
from clipfast.backends.batching import chunk_size, plan_rows, plan_text_batches
from clipfast.errors import ClipfastError, InputError


@pytest.mark.parametrize("name", backends.available_backends())
def test_every_registered_backend_implements_the_contract(name):
    module = backends.backend_module(name)
    classes = [v for v in vars(module).values() if isinstance(v, type) and v is not Backend
               and issubclass(v, Backend) and v.__module__ == module.__name__]
    assert len(classes) == 1, (name, classes)
    cls = classes[0]
    assert not inspect.isabstract(cls), inspect.getmembers(cls, inspect.isabstract)
    assert cls.name == name
    assert inspect.signature(module.load).return_annotation in (cls, cls.__name__)


class _Towers(Backend):
    """A backend that declares only the required methods: the real ONNX Runtime towers, with
    every call recorded."""

    name, device = "recorder", "cpu"

    def __init__(self, inner, max_batch=None):
        self.inner, self.max_batch = inner, max_batch
        self.calls: list[tuple[str, int]] = []

    def run_image(self, pixels):
        self.calls.append(("image", len(pixels)))
        return self.inner.run_image(pixels)

    def run_text(self, inputs):
        self.calls.append(("text", len(next(iter(inputs.values())))))
        return self.inner.run_text(inputs)

    def describe(self):
        return {"backend": self.name, "device": self.device}


def test_the_default_streaming_runs_batches_lazily_one_at_a_time():
    """``run_image_batches`` on a generator: each batch is run before the next is produced,
    and none is kept alive while the next one is."""

    class Echo(Backend):
        name, device = "echo", "cpu"
        log: list = []

        def run_image(self, pixels):
            self.log.append(("run", int(pixels[0, 0])))
            return pixels[:, :2].copy()

        def run_text(self, inputs):
            raise AssertionError("not called")

        def describe(self):
            return {}

    alive = []

    def batches():
        for k in range(3):
            gc.collect()
            Echo.log.append(("produce", k, sum(r() is not None for r in alive)))
            box = [np.full((2, 3), k, dtype=np.float32)]
            alive.append(weakref.ref(box[0]))
            yield box.pop()  # the generator keeps no reference of its own

    outs = Echo().run_image_batches(batches())
    assert [o[0, 0] for o in outs] == [0, 1, 2]
    assert Echo.log == [("produce", 0, 0), ("run", 0), ("produce", 1, 0), ("run", 1),
                        ("produce", 2, 0), ("run", 2)]


def test_engine_runs_a_contract_only_backend_chunked_by_the_planner(small_clip_artifact,
                                                                     monkeypatch):
    ref = clipfast.Engine(small_clip_artifact, backend="onnxruntime", batch_size=4,
                          self_check=False)
    eng = clipfast.Engine(small_clip_artifact, backend="onnxruntime", batch_size=4,
                          self_check=False)
    towers = _Towers(ref._backend)
    monkeypatch.setattr(eng, "_backend", towers)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8) for i in range(6)]
    texts = ["a cat", "two dogs on a red sofa in the sun", "sky", "a b c d e f g", "x"]
    np.testing.assert_array_equal(eng.encode_images(images), ref.encode_images(images))
    np.testing.assert_array_equal(eng.encode_texts(texts), ref.encode_texts(texts))
    assert [c for c in towers.calls if c[0] == "image"] == [("image", 4), ("image", 2)]
    assert all(rows <= 4 for _, rows in towers.calls)


def test_backend_info_is_public_and_feeds_describe(small_clip_artifact):
    engine = clipfast.Engine(small_clip_artifact, backend="onnxruntime", self_check=False)
    info = engine.backend_info()
    assert isinstance(info, BackendInfo)
    assert (info.name, info.device) == ("onnxruntime", "cpu")
    assert info.precision == engine.manifest.spec.precision  # onnxruntime runs the graph's own
    assert info.providers == ("CPUExecutionProvider",)
    assert info.max_batch is None and info.tuning is None and info.source_model is None
    described = engine.describe()
    assert described["compute_precision"] == info.precision
    assert {k: described[k] for k in info.details} == dict(info.details)


def test_the_backends_own_precision_wins_in_backend_info(small_clip_artifact, monkeypatch):
    engine = clipfast.Engine(small_clip_artifact, backend="onnxruntime", self_check=False)
    monkeypatch.setattr(engine._backend, "precision", "bf16")
    assert engine.backend_info().precision == "bf16"
    assert engine.describe()["compute_precision"] == "bf16"


# -- the planner ----------------------------------------------------------------------------------
def test_chunk_size_caps_the_batch_at_the_backends_max():
    assert chunk_size(32, None) == 32
    assert chunk_size(32, 8) == 8
    assert chunk_size(4, 256) == 4
    with pytest.raises(ClipfastError, match="batch_size=0"):
        chunk_size(0, None)


def test_plan_rows_without_a_max_or_buckets_is_one_chunk():
    assert [(c.start, c.stop, c.bucket) for c in plan_rows(5, None)] == [(0, 5, 5)]
    assert [(c.start, c.stop, c.bucket) for c in plan_rows(5, None, (1, 2, 4))] == [
        (0, 4, 4), (4, 5, 1)]
    with pytest.raises(InputError, match="cannot be negative"):
        plan_rows(-1, 4)


def test_the_text_plan_is_the_planners():
    plan = plan_text_batches(np.array([3, 70, 4, 5]), 2, context=77)
    assert sorted(int(r) for b in plan for r in b.rows) == [0, 1, 2, 3]
    assert all(len(b.rows) <= 2 for b in plan)
