"""A small checked wrapper over the CUDA runtime API of NVIDIA's cuda-python.

The TensorRT backend needs device buffers, pinned host memory, streams, events, asynchronous
copies and stream capture into CUDA graphs, without PyTorch. cuda-python's runtime bindings are a
1:1 mirror of the C API: every call returns a tuple whose first item is a ``cudaError_t`` and the
rest are the C function's out-parameters. Ignoring that first item is how a failed copy turns
into wrong embeddings later, so every call here goes through ``check``, which raises CudaError
naming the call and CUDA's own error name and description.

Import paths (cuda-python's own layout; both checked against NVIDIA's TensorRT samples,
``samples/python/common_runtime.py``): cuda-python 12.6+ ships ``cuda.bindings.runtime``; older
12.x releases only ``cuda.cudart``. Importing this module never initialises CUDA: the bindings are
imported on first use.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from clipfast.errors import BackendUnavailable, ClipfastError

INSTALL_HINT = "pip install clipfast[tensorrt]"

_lock = threading.Lock()
_runtime: Any = None


class CudaError(ClipfastError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""


def runtime():
    """The cuda-python runtime module (``cudart``); BackendUnavailable when not installed."""
    global _runtime
    if _runtime is not None:
        return _runtime
    with _lock:
        if _runtime is None:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                try:
                    from cuda import cudart as rt  # cuda-python < 12.6
                except ImportError as e:
                    raise BackendUnavailable(
                        f"NVIDIA's cuda-python is not importable ({e}); the TensorRT backend "
                        f"drives the GPU through it: {INSTALL_HINT} (or pip install "
                        "'cuda-python>=12')"
                    ) from e
            _runtime = rt
    return _runtime


def _error_text(rt, err) -> str:
    name = desc = ""
    try:
        name = rt.cudaGetErrorName(err)[1]
        desc = rt.cudaGetErrorString(err)[1]
    except Exception:  # the names are best effort; the numeric code is always there
        pass
    name = name.decode() if isinstance(name, bytes) else str(name)
    desc = desc.decode() if isinstance(desc, bytes) else str(desc)
    code = getattr(err, "value", err)
    return f"{name or 'cudaError'} ({code}): {desc}".rstrip(": ")


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result ``(err, *values)``: raise CudaError unless ``err`` is
    cudaSuccess; return None, the single value, or the tuple of values."""
    rt = runtime()
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{what} failed: {_error_text(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def handle(obj: Any) -> int:
    """The integer address behind a cuda-python handle (stream, event, graph exec) or pointer:
    what TensorRT's ``execute_async_v3(stream_handle)`` and ``set_tensor_address`` take."""
    if isinstance(obj, int):
        return obj
    # getPtr() first: cuda-bindings 13 deprecates int(handle) ("Using int(cuda_obj) to retrieve
    # the underlying address of a CUDA object is deprecated").
    get_ptr = getattr(obj, "getPtr", None)
    if get_ptr is not None:
        return int(get_ptr())
    return int(obj)


# -- devices -----------------------------------------------------------------------------------
def device_count() -> int:
    """Number of visible CUDA devices; 0 when there is no device or no usable driver."""
    rt = runtime()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return 0
    return int(count)


def no_device_reason() -> str | None:
    """Why no CUDA device can be used (CUDA's own error), or None when one can."""
    rt = runtime()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return f"no usable CUDA device: cudaGetDeviceCount: {_error_text(rt, err)}"
    if count < 1:
        return "no CUDA device is visible (cudaGetDeviceCount returned 0)"
    return None


def current_device() -> int:
    return int(check(runtime().cudaGetDevice(), "cudaGetDevice"))


def compute_capability(device: int | None = None) -> tuple[int, int]:
    """``(major, minor)`` from cudaGetDeviceProperties, e.g. ``(8, 9)`` for an L4."""
    device = current_device() if device is None else device
    prop = check(runtime().cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    return int(prop.major), int(prop.minor)


def device_name(device: int | None = None) -> str:
    device = current_device() if device is None else device
    prop = check(runtime().cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name)


# -- streams and events ------------------------------------------------------------------------
class Stream:
    """An explicit (non-default) CUDA stream: graph capture is not allowed on the legacy default
    stream, and a stream per pipeline slot is what lets copies overlap compute."""

    def __init__(self):
        rt = runtime()
        # Non-blocking: a blocking stream synchronises with the legacy default stream, which is
        # PyTorch's default stream too. Any torch work there (GPU preprocessing, another model)
        # would then serialise with both pipeline slots, and a launch during a capture would
        # invalidate it (cudaErrorStreamCaptureImplicit).
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking),
                             "cudaStreamCreateWithFlags")
        self._handle = handle(self._stream)

    @property
    def handle(self) -> int:
        return self._handle

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def wait(self, event: Event) -> None:
        """Later work on this stream waits for ``event`` (no host blocking)."""
        check(runtime().cudaStreamWaitEvent(self._stream, event.raw, 0), "cudaStreamWaitEvent")

    def is_capturing(self) -> bool:
        rt = runtime()
        status = check(rt.cudaStreamIsCapturing(self._stream), "cudaStreamIsCapturing")
        return status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone

    def close(self) -> None:
        if self._stream is not None:
            check(runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


class Event:
    def __init__(self):
        rt = runtime()
        # Completion markers only: no timing (cheaper to record and to wait on).
        self._event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming),
                            "cudaEventCreateWithFlags")

    @property
    def raw(self) -> Any:
        return self._event

    def record(self, stream: Stream) -> None:
        check(runtime().cudaEventRecord(self._event, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        check(runtime().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    def close(self) -> None:
        if self._event is not None:
            check(runtime().cudaEventDestroy(self._event), "cudaEventDestroy")
            self._event = None


# -- memory ------------------------------------------------------------------------------------
class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc: 256-byte aligned, as TensorRT requires of tensor
    addresses and of user-managed context memory)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(runtime().cudaMalloc(max(self.nbytes, 1)),
                             f"cudaMalloc({self.nbytes} bytes)"))

    def close(self) -> None:
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """``nbytes`` of page-locked host memory (cudaMallocHost). Only pinned memory makes
    ``cudaMemcpyAsync`` truly asynchronous; from pageable memory the driver stages the copy
    synchronously and nothing overlaps."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(runtime().cudaMallocHost(max(self.nbytes, 1)),
                             f"cudaMallocHost({self.nbytes} bytes)"))

    def array(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of the buffer (no copy). ctypes has no float16, so the view is made over
        bytes and reinterpreted."""
        dtype = np.dtype(dtype)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if need > self.nbytes:
            raise ValueError(f"pinned buffer of {self.nbytes} bytes cannot hold {shape} {dtype}")
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)),
                                    (self.nbytes,))
        return raw[:need].view(dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def memcpy_htod_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             stream.raw), f"cudaMemcpyAsync host->device ({nbytes} bytes)")


def memcpy_dtoh_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             stream.raw), f"cudaMemcpyAsync device->host ({nbytes} bytes)")


def memcpy_dtod_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                             stream.raw), f"cudaMemcpyAsync device->device ({nbytes} bytes)")


def memset_async(ptr: int, value: int, nbytes: int, stream: Stream) -> None:
    check(runtime().cudaMemsetAsync(ptr, value, nbytes, stream.raw),
          f"cudaMemsetAsync ({nbytes} bytes)")


# -- graphs ------------------------------------------------------------------------------------
def begin_capture(stream: Stream) -> None:
    """Start capturing ``stream`` into a graph. Thread-local mode: only unsafe calls made by this
    thread invalidate the capture, so another thread's cudaMalloc does not break it."""
    rt = runtime()
    check(rt.cudaStreamBeginCapture(
        stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
        "cudaStreamBeginCapture")


def end_capture(stream: Stream) -> Any:
    """Finish the capture on ``stream``; return the captured cudaGraph_t."""
    return check(runtime().cudaStreamEndCapture(stream.raw), "cudaStreamEndCapture")


def abort_capture(stream: Stream) -> None:
    """End a capture that failed part-way (ignoring its error) and clear the (non-sticky) error
    it left, so the stream can run ordinary work again."""
    rt = runtime()
    try:
        if stream.is_capturing():
            err, graph = rt.cudaStreamEndCapture(stream.raw)
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
    finally:
        rt.cudaGetLastError()


class GraphExec:
    """An instantiated CUDA graph, launched on a stream."""

    def __init__(self, graph: Any):
        rt = runtime()
        self._graph = graph
        try:
            try:
                # cuda-python >= 12 mirrors CUDA 12's cudaGraphInstantiate(graph, flags); 11.x
                # took (graph, log buffer, size) and returned an error node as well.
                result = rt.cudaGraphInstantiate(graph, 0)
            except TypeError:
                result = rt.cudaGraphInstantiate(graph, b"", 0)[:2]
            self._exec = check(result, "cudaGraphInstantiate")
        except BaseException:
            rt.cudaGraphDestroy(graph)
            self._graph = None
            raise

    def launch(self, stream: Stream) -> None:
        check(runtime().cudaGraphLaunch(self._exec, stream.raw), "cudaGraphLaunch")

    def close(self) -> None:
        rt = runtime()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None


__all__ = [
    "INSTALL_HINT", "CudaError", "DeviceBuffer", "Event", "GraphExec", "PinnedBuffer", "Stream",
    "abort_capture", "begin_capture", "check", "compute_capability", "current_device",
    "device_count", "device_name", "end_capture", "handle", "memcpy_dtod_async",
    "memcpy_dtoh_async", "memcpy_htod_async", "memset_async", "no_device_reason", "runtime",
]
