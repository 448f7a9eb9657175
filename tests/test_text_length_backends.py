"""The dynamic text path in the fixed-shape backends, tested on CPU: TensorRT build profiles
over the sequence axis, the TensorRT runner's per-(batch, length) contexts and CUDA graphs with
the CUDA stand-in of test_tensorrt, and the ONNX Runtime TensorRT EP's profile shapes."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest
from manifest_stub import stub_manifest
from test_tensorrt import _FakeCuda, _NoLog

from clipfast.artifact.manifest import Manifest
from clipfast.backends.batching import BatchProfile
from clipfast.backends.tensorrt import backend as trt_backend
from clipfast.backends.tensorrt import build as tb

SHA = "ab" * 32
MAX_LEN = 12


def _manifest(sequence: str | None) -> Manifest:
    text = {"file": "text.onnx", "inputs": ["input_ids"]}
    if sequence is not None:
        text["sequence"] = sequence
    return stub_manifest("/nonexistent", {
        "precision": "fp16", "io_dtype": "fp32", "text": text,
        "image": {"file": "image.onnx", "shape": [3, 8, 8]},
        "tokenizer": {"kind": "hf", "context_length": 77},
        "files": {"text.onnx": {"sha256": SHA, "bytes": 1},
                  "image.onnx": {"sha256": SHA, "bytes": 1}}})


def test_text_engine_key_carries_the_sequence_profile():
    dyn = tb.engine_key(_manifest("dynamic"), "text", BatchProfile(1, 8, 16), "10.8.0", (8, 9))
    assert dyn.sequence == (1, 16, 77)
    assert dyn.stem() == f"text.fp16-io32.b1-8-16.s1-16-77.trt10.8.0.sm89.{SHA[:12]}"
    assert tb.EngineKey.from_dict(dyn.as_dict()) == dyn
    # artifacts without the field, and image towers: fixed shapes, names as before
    for m in (_manifest(None), _manifest("fixed")):
        fixed = tb.engine_key(m, "text", BatchProfile(1, 8, 16), "10.8.0", (8, 9))
        assert fixed.sequence is None and ".s" not in fixed.stem().split(".trt")[0]
        assert "sequence" not in fixed.as_dict()
        assert fixed.differences(dyn) == ["text sequence profile: engine has None, wanted "
                                          "(1, 16, 77)"]
    image = tb.engine_key(_manifest("dynamic"), "image", BatchProfile(), "10.8.0", (8, 9))
    assert image.sequence is None


def test_build_profile_spans_the_sequence_axis():
    def network(*shapes):
        inputs = [types.SimpleNamespace(name=f"in{i}", shape=s) for i, s in enumerate(shapes)]
        return types.SimpleNamespace(num_inputs=len(inputs), get_input=inputs.__getitem__)

    prof = BatchProfile(1, 8, 16)
    net = network((-1, -1), (-1, -1))
    shapes = tb._profile_shapes(net, prof, {"in0": (77,), "in1": (77,)}, (1, 16, 77))
    assert shapes["in0"] == ((1, 1), (8, 16), (16, 77)) == shapes["in1"]
    # no sequence profile: the manifest's context length, as for fixed-length artifacts
    shapes = tb._profile_shapes(net, prof, {"in0": (77,), "in1": (77,)})
    assert shapes["in0"] == ((1, 77), (8, 77), (16, 77))
    # a graph with a fixed length keeps it whatever the profile
    shapes = tb._profile_shapes(network((-1, 77)), prof, {}, (1, 16, 77))
    assert shapes["in0"] == ((1, 77), (8, 77), (16, 77))


def _fake_seq_trt(cuda, dim_out=3):
    """A text engine with inputs ``x`` ``(batch, L)`` for any ``L <= MAX_LEN``: output row =
    ``W[:, :L] @ x row``, so rows read at the wrong length or offset show in the result."""
    weights = np.arange(dim_out * MAX_LEN, dtype=np.float32).reshape(dim_out, MAX_LEN) / 10

    class Context:
        def __init__(self):
            self.addr, self.shape = {}, None

        def set_device_memory(self, ptr, size):
            self.memory = ptr

        def set_input_shape(self, name, shape):
            self.shape = shape
            return shape[0] <= 8 and 1 <= shape[1] <= MAX_LEN

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _run(self):
            b, length = self.shape
            x = np.ctypeslib.as_array(ctypes.cast(self.addr["x"], ctypes.POINTER(ctypes.c_float)),
                                      (b, length))
            y = np.ctypeslib.as_array(ctypes.cast(self.addr["y"], ctypes.POINTER(ctypes.c_float)),
                                      (b, dim_out))
            y[:] = x @ weights[:, :length].T

        def execute_async_v3(self, stream_handle):
            cuda.streams[stream_handle].enqueue(self._run)
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 64

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "x" else "out"

        def get_tensor_dtype(self, name):
            return np.float32

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 1), (4, 4), (8, MAX_LEN)]

        def get_tensor_shape(self, name):
            return (-1, -1) if name == "x" else (-1, dim_out)

        def create_execution_context(self, strategy):
            return Context()

    trt = types.SimpleNamespace(nptype=lambda t: t, TensorIOMode=types.SimpleNamespace(INPUT="in"),
                                ExecutionContextAllocationStrategy=types.SimpleNamespace(
                                    USER_MANAGED=2))
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine())
    return trt, runtime, weights


@pytest.mark.parametrize("graphs", [True, False])
def test_runner_runs_each_chunk_at_its_own_length(graphs):
    cuda = _FakeCuda()
    trt, runtime, w = _fake_seq_trt(cuda)
    tower = trt_backend.TowerRunner(trt, cuda, runtime, _NoLog(), b"plan", "text", ["x"], "y",
                                    BatchProfile(1, 4, 8), graphs)
    assert tower.dynamic_sequence and tower.inputs["x"][1] == (MAX_LEN,)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, length)).astype(np.float32)
               for n, length in ((13, 4), (3, MAX_LEN), (8, 4), (5, 1), (2, MAX_LEN))]
    outs = tower.run([{"x": b} for b in batches])
    for b, out in zip(batches, outs):
        np.testing.assert_allclose(out, b @ w[:, :b.shape[1]].T, rtol=1e-5)
    again = tower.run([{"x": batches[1]}])[0]  # replays (bucket 4, length 12)
    np.testing.assert_allclose(again, batches[1] @ w.T, rtol=1e-5)
    keys = {k for slot in tower.slots for k in slot.contexts}
    assert keys == {(8, 4), (4, MAX_LEN), (8, 1), (2, MAX_LEN)}
    captured = {k for slot in tower.slots for k, g in slot.graphs.items() if g is not None}
    assert captured == (keys if graphs else set())
    assert all(not slot.stream.queue and slot.pending is None for slot in tower.slots)


def test_ort_tensorrt_ep_profile_spans_the_sequence_axis():
    from clipfast.backends.onnxruntime import trt_profile_shapes

    m = _manifest("dynamic")
    shapes = trt_profile_shapes(m, BatchProfile(1, 8, 16))
    assert shapes["text"] == {"trt_profile_min_shapes": "input_ids:1x1",
                              "trt_profile_opt_shapes": "input_ids:8x16",
                              "trt_profile_max_shapes": "input_ids:16x77"}
    assert shapes["image"]["trt_profile_opt_shapes"] == "pixel_values:8x3x8x8"
    fixed = trt_profile_shapes(_manifest(None), BatchProfile(1, 8, 16))
    assert fixed["text"]["trt_profile_min_shapes"] == "input_ids:1x77"
