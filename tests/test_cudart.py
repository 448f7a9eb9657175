"""clipfast.backends.tensorrt.cudart's error checking and clean-up, against a stand-in for
cuda-python's runtime
module (no GPU here): the same (err, *values) return convention, recording every call."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import pytest

import clipfast.backends.tensorrt.cudart as cudart
from clipfast.backends.tensorrt import backend as trt_backend


class _Err(IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1


class _Handle:
    """cuda-python handles expose their address through getPtr()."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def getPtr(self) -> int:  # noqa: N802 - cuda-python's name
        return self.ptr


class FakeRuntime:
    cudaError_t = _Err
    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2

    def __init__(self, fail_malloc_at: int | None = None, fail_instantiate: bool = False):
        self.calls: list[tuple] = []
        self.live: set[str] = set()
        self._next = 0x1000
        self.fail_malloc_at = fail_malloc_at
        self.fail_instantiate = fail_instantiate
        self.mallocs = 0

    def _new(self, kind: str):
        self._next += 0x100
        self.live.add(f"{kind}:{self._next}")
        return self._next

    def cudaGetErrorName(self, err):  # noqa: N802
        return _Err.cudaSuccess, _Err(err).name.encode()

    def cudaGetErrorString(self, err):  # noqa: N802
        return _Err.cudaSuccess, b"out of memory" if err == 2 else b"invalid value"

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        self.calls.append(("stream", flags))
        return _Err.cudaSuccess, _Handle(self._new("stream"))

    def cudaStreamDestroy(self, s):  # noqa: N802
        self.live.discard(f"stream:{s.ptr}")
        return (_Err.cudaSuccess,)

    def cudaEventCreateWithFlags(self, flags):  # noqa: N802
        self.calls.append(("event", flags))
        return _Err.cudaSuccess, _Handle(self._new("event"))

    def cudaEventDestroy(self, e):  # noqa: N802
        self.live.discard(f"event:{e.ptr}")
        return (_Err.cudaSuccess,)

    def cudaMalloc(self, n):  # noqa: N802
        self.mallocs += 1
        if self.fail_malloc_at is not None and self.mallocs == self.fail_malloc_at:
            return _Err.cudaErrorMemoryAllocation, 0
        return _Err.cudaSuccess, self._new("device")

    def cudaFree(self, ptr):  # noqa: N802
        self.live.discard(f"device:{ptr}")
        return (_Err.cudaSuccess,)

    def cudaMallocHost(self, n):  # noqa: N802
        buf = np.zeros(n, dtype=np.uint8)  # real host memory, so the numpy view can be made
        self.live.add(f"host:{buf.ctypes.data}")
        self.calls.append(("host-keepalive", buf))
        return _Err.cudaSuccess, buf.ctypes.data

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.live.discard(f"host:{ptr}")
        return (_Err.cudaSuccess,)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        if self.fail_instantiate:
            return _Err.cudaErrorInvalidValue, None
        return _Err.cudaSuccess, _Handle(self._new("exec"))

    def cudaGraphDestroy(self, graph):  # noqa: N802
        self.live.discard(f"graph:{graph.ptr}")
        return (_Err.cudaSuccess,)


@pytest.fixture()
def fake(monkeypatch):
    def install(**kw) -> FakeRuntime:
        rt = FakeRuntime(**kw)
        monkeypatch.setattr(cudart, "_runtime", rt)
        return rt
    return install


def test_check_returns_values_and_names_the_failed_call(fake):
    fake()
    assert cudart.check((_Err.cudaSuccess,), "cudaDeviceSynchronize") is None
    assert cudart.check((_Err.cudaSuccess, 7), "cudaGetDeviceCount") == 7
    assert cudart.check((_Err.cudaSuccess, 1, 2), "x") == (1, 2)
    with pytest.raises(cudart.CudaError,
                       match=r"cudaMalloc\(64\) failed: cudaErrorMemoryAllocation \(2\): out of "):
        cudart.check((_Err.cudaErrorMemoryAllocation, 0), "cudaMalloc(64)")


def test_streams_are_non_blocking_and_events_untimed(fake):
    rt = fake()
    s, e = cudart.Stream(), cudart.Event()
    assert ("stream", rt.cudaStreamNonBlocking) in rt.calls
    assert ("event", rt.cudaEventDisableTiming) in rt.calls
    assert s.handle == s.raw.getPtr() and cudart.handle(12345) == 12345
    s.close()
    e.close()
    assert not {k for k in rt.live if k.startswith(("stream", "event"))}


def test_a_failed_graph_instantiation_destroys_the_graph(fake):
    rt = fake(fail_instantiate=True)
    graph = _Handle(0x42)
    rt.live.add("graph:66")
    with pytest.raises(cudart.CudaError, match="cudaGraphInstantiate"):
        cudart.GraphExec(graph)
    assert "graph:66" not in rt.live


def test_a_slot_that_runs_out_of_memory_frees_what_it_had(fake):
    """Two inputs and an output: the third device allocation fails; the stream, event, scratch
    and the buffers allocated before must all be released (the backend then falls back)."""
    rt = fake(fail_malloc_at=3)
    inputs = {"input_ids": (np.int32, (77,))}
    with pytest.raises(cudart.CudaError, match="cudaMalloc"):
        trt_backend.Slot(cudart, inputs, ("text_embeds", np.float32, (512,)), 8, 1024)
    assert rt.mallocs == 3 and rt.live == set()
    slot = trt_backend.Slot(cudart, inputs, ("text_embeds", np.float32, (512,)), 8, 1024)
    assert slot.host["input_ids"].shape == (8, 77) and slot.host["text_embeds"].dtype == np.float32
    slot.close()
    assert rt.live == set()
