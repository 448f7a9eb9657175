"""TensorRT backend: strongly typed engines per tower, driven through cuda-python (no torch).

Execution, and why:
- Each tower has two *slots*; a slot owns a CUDA stream, device input/output buffers sized for
  the profile's max batch, pinned host staging buffers, a completion event, and the activation
  memory its execution contexts share. Chunks alternate between the slots, so while one slot's
  engine runs, the other slot's host->device copy (and the CPU staging of the next chunk) proceeds:
  H2D, compute and D2H of consecutive chunks overlap.
- A chunk is padded up to its batch *bucket* (``clipfast.backends.batching``): a handful of fixed
shapes
  serve every batch size. Each (slot, bucket) gets its own execution context, with the input
  shape and tensor addresses set once; the contexts of a slot share one activation buffer
  (``ExecutionContextAllocationStrategy.USER_MANAGED`` + ``set_device_memory``), which is safe
  because a slot's work is serialised on its stream.
- CUDA graphs: a captured graph fixes the shapes, addresses and the context it was captured from,
  so one graph is captured per (slot, bucket), after one ordinary ``execute_async_v3`` (TensorRT
  does shape-dependent setup on the first enqueue after a shape change; capture must come after
  it). Replays replace the per-layer kernel launches with one ``cudaGraphLaunch``. When capture
  fails (an engine with data-dependent shapes or a plugin that synchronises), that bucket falls
  back to plain ``execute_async_v3`` and ``describe()`` says why.
- Padded rows are zero and dropped: tower rows are independent at inference.

Options (``Engine(..., backend_options={...})``; ``OPTIONS``, any other raises InputError):
``profile`` (BatchProfile or dict), ``cache_dir`` (default: the artifact's ``tensorrt`` cache,
clipfast.artifact.cache), ``build`` ("missing": build an absent or stale engine, which takes
minutes;
"never": raise BackendUnavailable listing the engines found), ``cuda_graphs`` (default True).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.backends.base import (
    Backend,
    Option,
    OptionSpec,
    choice,
    flag,
    host_array,
    is_torch_tensor,
)
from clipfast.backends.batching import PROFILE, BatchProfile, Chunk, plan_rows
from clipfast.errors import ArtifactError, BackendUnavailable, ClipfastError, InputError
from clipfast.inputs.text_batching import length_buckets

log = logging.getLogger("clipfast.tensorrt")

BUILD_MODES = ("missing", "never")
SLOTS = 2


def _cache_dir(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"tensorrt backend option cache_dir={value!r}: expected a folder path "
                         "(str or os.PathLike) or None")
    return Path(value)


# cuda_graphs=None is the default (on), as for the torch backend: one options dict serves both.
OPTIONS = OptionSpec("tensorrt", PROFILE, Option("cache_dir", None, _cache_dir),
                     choice("build", "missing", BUILD_MODES, owner="tensorrt backend"),
                     flag("cuda_graphs", True, owner="tensorrt backend", none_ok=True))


# -- shapes and staging (pure, tested on CPU) -------------------------------------------------
def _shape_key(bucket: int, length: int | None) -> int | tuple[int, int]:
    """Contexts and graphs are keyed by batch bucket, and by length too on a dynamic-sequence
    text engine."""
    return bucket if length is None else (bucket, length)


def _shape_text(key: int | tuple[int, int]) -> int | str:
    """A shape key as ``describe()`` shows it: the bucket, or ``"<bucket>x<length>"``."""
    return key if isinstance(key, int) else f"{key[0]}x{key[1]}"


def stage_rows(dst: np.ndarray, src: np.ndarray, bucket: int) -> np.ndarray:
    """Write ``src`` ``(rows, ...)`` into the first rows of ``dst`` ``(capacity, ...)`` (a pinned
    staging buffer), zero rows ``rows:bucket``, and return ``dst[:bucket]``: the padded batch."""
    rows = src.shape[0]
    if src.shape[1:] != dst.shape[1:]:
        raise InputError(f"rows of shape {src.shape[1:]} do not fit a staging buffer of rows "
                         f"{dst.shape[1:]}")
    if not rows <= bucket <= dst.shape[0]:
        raise ClipfastError(f"cannot stage {rows} rows as a batch of {bucket} in a buffer of "
                            f"{dst.shape[0]} rows")
    np.copyto(dst[:rows], src, casting="same_kind")
    dst[rows:bucket] = 0
    return dst[:bucket]


def parse_options(**options: Any) -> tuple[BatchProfile, Path | None, str, bool]:
    """``(profile, cache_dir, build, cuda_graphs)``, checked by ``OPTIONS.validate``: InputError
    names an unknown option or a bad value."""
    given = OPTIONS.validate(options)
    graphs = given["cuda_graphs"]
    return (given["profile"], given["cache_dir"], given["build"],
            True if graphs is None else graphs)


# -- one tower ---------------------------------------------------------------------------------
class Slot:
    def __init__(self, cudart, inputs: dict[str, tuple], output: tuple, capacity: int,
                 scratch_bytes: int):
        self.stream = self.done = self.scratch = None
        self.device: dict[str, Any] = {}
        self.host: dict[str, np.ndarray] = {}
        self._pinned = []
        # keyed by batch bucket, or (bucket, length) on a dynamic-sequence text engine
        self.contexts: dict[int | tuple[int, int], Any] = {}
        self.graphs: dict[int | tuple[int, int], Any] = {}
        self.pending: tuple[np.ndarray, Chunk] | None = None
        try:  # a failed allocation (out of memory) must not leak what was already allocated
            self.stream = cudart.Stream()
            self.done = cudart.Event()
            self.scratch = cudart.DeviceBuffer(scratch_bytes)
            for name, (dtype, row) in {**inputs, output[0]: output[1:]}.items():
                nbytes = capacity * int(np.prod(row, dtype=np.int64)) * np.dtype(dtype).itemsize
                self.device[name] = cudart.DeviceBuffer(nbytes)
                pinned = cudart.PinnedBuffer(nbytes)
                self._pinned.append(pinned)
                self.host[name] = pinned.array(dtype, (capacity, *row))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # graphs reference the contexts' kernels: destroy them first, then the contexts
        for g in self.graphs.values():
            if g is not None:
                g.close()
        self.graphs.clear()
        self.contexts.clear()
        for res in [*self.device.values(), *self._pinned, self.scratch, self.done, self.stream]:
            if res is not None:  # None: the constructor failed before allocating it
                res.close()


class TowerRunner:
    """One engine, two slots, the pipelined chunk loop."""

    def __init__(self, trt, cudart, runtime, logger, engine_bytes: bytes, name: str,
                 input_names: list[str], output_name: str, profile: BatchProfile,
                 cuda_graphs: bool):
        self.trt, self.cudart, self.logger = trt, cudart, logger
        self.name = name
        self.profile = profile
        self.cuda_graphs = cuda_graphs
        self.graph_failures: dict[int | tuple[int, int], str] = {}
        since = logger.mark()
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise _DeserializeError(" | ".join(logger.errors(since)) or "no error message")
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in [*input_names, output_name] if n not in io]
        if missing:
            raise ArtifactError(f"{name} engine has I/O tensors {io}; the manifest names "
                                f"{missing}, which it lacks")
        self.inputs: dict[str, tuple] = {}
        for n in input_names:
            self.inputs[n] = (self._np_dtype(n), self._row_shape(n))
        # a text engine built over a range of lengths (dim 1 of its inputs is -1): buffers hold
        # rows of the longest, each chunk runs at its own length
        self.dynamic_sequence = any(
            len(self.engine.get_tensor_shape(n)) == 2 and self.engine.get_tensor_shape(n)[1] < 0
            for n in input_names)
        self.output = (output_name, self._np_dtype(output_name), self._row_shape(output_name))
        # TensorRT 11 removed device_memory_size (superseded by _v2 since 10.1); a v2 of 0 is
        # a valid answer, not a reason to ask the old attribute.
        v2 = getattr(self.engine, "device_memory_size_v2", None)
        self.scratch_bytes = int(v2 if v2 is not None else self.engine.device_memory_size)
        self.slots: list[Slot] = []
        try:
            for _ in range(SLOTS):
                self.slots.append(Slot(cudart, self.inputs, self.output, profile.max,
                                       self.scratch_bytes))
        except BaseException:
            self.close()
            raise
        self.lock = threading.Lock()

    def _np_dtype(self, tensor: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(tensor)))

    def _row_shape(self, tensor: str) -> tuple[int, ...]:
        mode = self.engine.get_tensor_mode(tensor)
        if mode == self.trt.TensorIOMode.INPUT:
            # (min, opt, max) shapes of profile 0; the non-batch dims are fixed
            shape = tuple(self.engine.get_tensor_profile_shape(tensor, 0)[2])
        else:
            shape = tuple(self.engine.get_tensor_shape(tensor))
        row = tuple(int(d) for d in shape[1:])
        if any(d < 0 for d in row):
            raise ArtifactError(f"{self.name} engine tensor {tensor!r} has dynamic non-batch "
                                f"dimensions {shape}; only the batch axis may vary")
        return row

    # -- contexts and graphs -------------------------------------------------------------------
    def _context(self, slot: Slot, bucket: int, length: int | None = None):
        ctx = slot.contexts.get(_shape_key(bucket, length))
        if ctx is not None:
            return ctx
        trt = self.trt
        since = self.logger.mark()
        ctx = self.engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise ClipfastError(f"TensorRT could not create a {self.name} execution context: "
                                + " | ".join(self.logger.errors(since)))
        try:
            ctx.set_device_memory(slot.scratch.ptr, self.scratch_bytes)  # TensorRT >= 10.1
        except (AttributeError, TypeError):
            ctx.device_memory = slot.scratch.ptr  # 10.0: one-argument property setter
        for n, (_, row) in self.inputs.items():
            shape = (bucket, *row) if length is None else (bucket, length)
            if not ctx.set_input_shape(n, shape):
                raise ClipfastError(f"{self.name} engine rejected input shape {shape} "
                                    f"for {n!r} (profile {self.profile.tag()}): "
                                    + " | ".join(self.logger.errors(since)))
        for n, buf in slot.device.items():
            if not ctx.set_tensor_address(n, buf.ptr):
                raise ClipfastError(f"{self.name} engine rejected the address of {n!r}")
        slot.contexts[_shape_key(bucket, length)] = ctx
        return ctx

    def _execute(self, ctx, slot: Slot) -> None:
        since = self.logger.mark()
        if not ctx.execute_async_v3(slot.stream.handle):
            raise ClipfastError(f"TensorRT {self.name} execution failed: "
                                + (" | ".join(self.logger.errors(since)) or "no error message"))

    def _enqueue(self, slot: Slot, bucket: int, length: int | None = None) -> None:
        """Run the staged chunk: ``bucket`` rows, each ``length`` tokens (a dynamic-sequence
        text engine; None: the engine's fixed row shape). One context, and one CUDA graph, per
        ``(bucket, length)``: the Engine pads text batches to a few lengths
        (``text_lengths``), so their number stays small."""
        key = _shape_key(bucket, length)
        ctx = self._context(slot, bucket, length)
        if not self.cuda_graphs or key in self.graph_failures:
            self._execute(ctx, slot)
            return
        graph = slot.graphs.get(key)
        if graph is not None:
            graph.launch(slot.stream)
            return
        # First run of this shape on this slot: an ordinary enqueue (TensorRT's shape setup
        # after set_input_shape happens here; it also computes this chunk), then capture.
        self._execute(ctx, slot)
        self._capture(ctx, slot, key)

    def _capture(self, ctx, slot: Slot, bucket: int | tuple[int, int]) -> None:
        cudart = self.cudart
        slot.stream.synchronize()
        since = self.logger.mark()
        try:
            cudart.begin_capture(slot.stream)
            ok = ctx.execute_async_v3(slot.stream.handle)
            graph = cudart.end_capture(slot.stream)
            if not ok:
                cudart.runtime().cudaGraphDestroy(graph)
                raise ClipfastError("execute_async_v3 returned False during capture: "
                                    + " | ".join(self.logger.errors(since)))
            slot.graphs[bucket] = cudart.GraphExec(graph)
        except Exception as e:  # noqa: BLE001 - the stream must leave capture mode whatever failed
            cudart.abort_capture(slot.stream)
            slot.graphs[bucket] = None
            shape = (f"batch {bucket}" if isinstance(bucket, int)
                     else f"batch {bucket[0]}, length {bucket[1]}")
            reason = f"CUDA graph capture failed for {shape}: {e}"
            self.graph_failures[bucket] = reason
            log.warning("clipfast tensorrt %s: %s; plain enqueue is used for it", self.name,
                        reason)

    # -- the pipeline --------------------------------------------------------------------------
    def _stage(self, slot: Slot, feed: dict[str, Any], chunk: Chunk) -> int | None:
        """Copy the chunk's rows into the slot's device buffers; returns the chunk's sequence
        length on a dynamic-sequence engine (rows shorter than the buffer's: staged packed,
        ``(bucket, length)`` contiguous), else None."""
        cudart = self.cudart
        length = None
        for n, (dtype, row) in self.inputs.items():
            src = feed[n]
            dev = slot.device[n]
            if self.dynamic_sequence:
                length = int(src.shape[1])
                row = (length,)
            row_bytes = int(np.prod(row, dtype=np.int64)) * dtype.itemsize
            if is_torch_tensor(src, "cuda"):
                # already on the GPU (GPU preprocessing): device-to-device into the slot buffer
                offset = chunk.start * row_bytes
                cudart.memcpy_dtod_async(dev.ptr, src.data_ptr() + offset,
                                         chunk.rows * row_bytes, slot.stream)
                if chunk.bucket > chunk.rows:
                    cudart.memset_async(dev.ptr + chunk.rows * row_bytes, 0,
                                        (chunk.bucket - chunk.rows) * row_bytes, slot.stream)
            else:
                host = slot.host[n]
                if self.dynamic_sequence:
                    # the pinned buffer holds (capacity, max length); view its start as
                    # (capacity, length) rows, the layout the engine reads for this shape
                    host = host.reshape(-1)[:host.shape[0] * length].reshape(host.shape[0],
                                                                             length)
                staged = stage_rows(host, src[chunk.start:chunk.stop], chunk.bucket)
                cudart.memcpy_htod_async(dev.ptr, staged.ctypes.data, staged.nbytes, slot.stream)
        return length

    def _submit(self, slot: Slot, feed: dict[str, Any], chunk: Chunk, out: np.ndarray) -> None:
        length = self._stage(slot, feed, chunk)
        self._enqueue(slot, chunk.bucket, length)
        name, dtype, row = self.output
        host = slot.host[name]
        nbytes = chunk.rows * int(np.prod(row, dtype=np.int64)) * dtype.itemsize
        self.cudart.memcpy_dtoh_async(host.ctypes.data, slot.device[name].ptr, nbytes,
                                      slot.stream)
        slot.done.record(slot.stream)
        slot.pending = (out, chunk)

    def _collect(self, slot: Slot) -> None:
        if slot.pending is None:
            return
        out, chunk = slot.pending
        slot.done.synchronize()
        out[chunk.start:chunk.stop] = slot.host[self.output[0]][:chunk.rows]
        slot.pending = None

    def run(self, feeds: Any) -> list[np.ndarray]:
        """``feeds``: an iterable of ``{input name: (N_i, ...)}``, one per request -> float32
        ``(N_i, D)`` each, every request's chunks through the same two-slot pipeline.

        Consumed lazily: feed k+1 is taken only once feed k's chunks are enqueued, so producing
        it (the Engine's preprocessing, from a generator) overlaps their copies and compute. A
        host feed is released once staged; a CUDA tensor feed stays referenced until its slot's
        device-to-device copy is waited for, so at most ``SLOTS`` feeds are held here.
        """
        outs: list[np.ndarray] = []
        held: list[Any] = [None] * SLOTS  # the CUDA feed each slot's pending copy reads
        k = 0
        with self.lock:
            try:
                for feed in feeds:
                    on_device = any(is_torch_tensor(v, "cuda") for v in feed.values())
                    n = len(next(iter(feed.values())))
                    out = np.empty((n, *self.output[2]), dtype=np.float32)
                    outs.append(out)
                    for chunk in plan_rows(n, self.profile.max, self.profile.buckets()):
                        slot = self.slots[k % SLOTS]
                        self._collect(slot)
                        held[k % SLOTS] = feed if on_device else None
                        self._submit(slot, feed, chunk, out)
                        k += 1
                    feed = None  # not kept alive while the next feed is produced
                for i in range(k, k + SLOTS):
                    self._collect(self.slots[i % SLOTS])
            except BaseException:
                for slot in self.slots:  # leave no stale pending chunk behind
                    slot.pending = None
                    try:
                        slot.stream.synchronize()
                    except ClipfastError as e:  # keep the first error; note the second
                        log.warning("clipfast tensorrt %s: stream sync after an error: %s",
                                    self.name, e)
                raise
        return outs

    def close(self) -> None:
        for slot in getattr(self, "slots", []):
            slot.close()
        self.slots = []
        self.engine = None


class _DeserializeError(Exception):
    pass


# -- the backend -------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, manifest, device: str = "cuda", *, profile: BatchProfile,
                 cache_dir: Path | None, build: str, cuda_graphs: bool):
        """``load`` checks the options (``parse_options``) before this runs."""
        from clipfast.backends.tensorrt import build as tb

        trt = tb.import_tensorrt()
        from clipfast.backends.tensorrt import cudart

        cudart.runtime()
        if device != "cuda":
            raise BackendUnavailable(f"the tensorrt backend runs on CUDA GPUs only; got "
                                     f"device={device!r} (use device='cuda')")
        reason = cudart.no_device_reason()
        if reason:
            raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {reason}")
        self.device = "cuda"
        self.max_batch = profile.max
        self.profile = profile
        self._trt = trt
        self._manifest = manifest
        self._cuda_device = cudart.current_device()
        self._cc = cudart.compute_capability(self._cuda_device)
        self._gpu = cudart.device_name(self._cuda_device)
        self._logger = tb.shared_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._cache = tb.engine_cache_dir(manifest, cache_dir)
        self._engines: dict[str, dict[str, Any]] = {}
        self._towers: dict[str, TowerRunner] = {}
        try:
            for tower in tb.TOWERS:
                self._towers[tower] = self._load_tower(tb, cudart, tower, build, cuda_graphs)
        except tb.EngineBuildError as e:
            self.close()
            raise BackendUnavailable(f"TensorRT cannot build engines for this artifact: {e}"
                                     ) from e
        except cudart.CudaError as e:
            self.close()
            raise BackendUnavailable(f"TensorRT backend setup failed on {self._gpu}: {e}") from e
        except BaseException:
            self.close()
            raise
        self._text_inputs = list(manifest.spec.text.inputs)
        # The Engine pads text batches up to one of these lengths: one execution context and
        # one CUDA graph per (batch bucket, length) instead of one per length seen.
        self.text_lengths = (length_buckets(int(manifest.spec.tokenizer.context_length))
                             if self._towers["text"].dynamic_sequence else None)

    def _load_tower(self, tb, cudart, tower: str, build: str, cuda_graphs: bool) -> TowerRunner:
        m = self._manifest
        key = tb.engine_key(m, tower, self.profile, self._trt.__version__, self._cc)
        lookup = tb.find_engine(self._cache, key)
        built = False
        if lookup.path is None:
            if build == "never":
                found = "; ".join(f"{s} ({w})" for s, w in lookup.found) or "none"
                raise BackendUnavailable(
                    f"no usable TensorRT {tower} engine and build='never': wanted {key.stem()} "
                    f"in {self._cache} ({lookup.reason}); engines found: {found}. Build them on "
                    f"this machine with `clipfast build-engines {m.directory}` (same batch "
                    "profile) or pass backend_options={'build': 'missing'}")
            path, key, built = tb.ensure_engine(m, tower, self.profile, self._cache,
                                                progress=True)
        else:
            path = lookup.path
        if tower == "image":
            inputs, output = [m["image"]["input"]], m["image"]["output"]
        else:
            inputs, output = list(m["text"]["inputs"]), m["text"]["output"]
        try:
            runner = TowerRunner(self._trt, cudart, self._runtime, self._logger,
                                 path.read_bytes(), tower, inputs, output, self.profile,
                                 cuda_graphs)
        except _DeserializeError as e:
            # a plan TensorRT refuses (other TensorRT build, other GPU despite the sidecar,
            # corruption): rebuild once when allowed, otherwise let the caller fall back
            if build == "never" or built:
                raise BackendUnavailable(f"TensorRT cannot load {path.name}: {e}") from None
            log.warning("clipfast: TensorRT cannot load %s (%s); rebuilding it", path.name, e)
            path, key, built = tb.ensure_engine(m, tower, self.profile, self._cache,
                                                rebuild=True, why=f"TensorRT rejected the "
                                                f"cached plan: {e}", progress=True)
            try:
                runner = TowerRunner(self._trt, cudart, self._runtime, self._logger,
                                     path.read_bytes(), tower, inputs, output, self.profile,
                                     cuda_graphs)
            except _DeserializeError as e2:
                raise BackendUnavailable(f"TensorRT cannot load the engine it just built, "
                                         f"{path.name}: {e2}") from None
        self._engines[tower] = {"engine": path.name, "key": key.stem(), "built_now": built}
        return runner

    # -- protocol ------------------------------------------------------------------------------
    def _image_feed(self, pixels: Any) -> dict[str, Any]:
        tower = self._towers["image"]
        name, (dtype, row) = next(iter(tower.inputs.items()))
        if is_torch_tensor(pixels, "cuda"):
            import torch

            x = pixels.detach().to(dtype=getattr(torch, dtype.name)).contiguous()
            # the copy below runs on this backend's stream: the producer must be done
            torch.cuda.current_stream(x.device).synchronize()
        else:
            x = host_array(pixels, dtype)
        if tuple(x.shape[1:]) != row or x.ndim != 1 + len(row):
            raise InputError(f"pixels: expected shape (N, {', '.join(map(str, row))}), got "
                             f"{tuple(x.shape)}")
        return {name: x}

    def _text_feed(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        tower = self._towers["text"]
        feed = {}
        for n, (dtype, row) in tower.inputs.items():
            if n not in inputs:
                raise ArtifactError(f"text tower expects input {n!r}; tokenizer gave "
                                    f"{sorted(inputs)}")
            x = host_array(inputs[n], dtype)
            if tower.dynamic_sequence:
                if x.ndim != 2 or not 1 <= x.shape[1] <= row[0]:
                    raise InputError(f"text input {n!r}: expected shape (N, L) with 1 <= L <= "
                                     f"{row[0]}, got {tuple(x.shape)}")
            elif tuple(x.shape[1:]) != row:
                raise InputError(f"text input {n!r}: expected shape (N, "
                                 f"{', '.join(map(str, row))}), got {tuple(x.shape)}")
            feed[n] = x
        lengths = {len(v) for v in feed.values()}
        if len(lengths) > 1:
            raise InputError(f"text inputs have different row counts: "
                             f"{ {k: len(v) for k, v in feed.items()} }")
        return feed

    def run_image(self, pixels: Any) -> np.ndarray:
        """float32/float16 ``(N, 3, H, W)`` (numpy or torch, CUDA tensors copied on device) ->
        float32 ``(N, D)``; any N, chunked to the profile and pipelined."""
        return self._towers["image"].run([self._image_feed(pixels)])[0]

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._towers["text"].run([self._text_feed(inputs)])[0]

    def run_image_batches(self, batches: Any) -> list[np.ndarray]:
        """Several pixel batches (any iterable, a generator included, consumed lazily: see
        ``TowerRunner.run``) through one pipeline: one float32 ``(N_i, D)`` per batch."""
        return self._towers["image"].run(self._image_feed(b) for b in batches)

    def run_text_batches(self, batches: Any) -> list[np.ndarray]:
        """Token batches (an iterable of ``{name: (N_i, L)}``) through one pipeline: one
        float32 ``(N_i, D)`` per batch."""
        return self._towers["text"].run(self._text_feed(b) for b in batches)

    def describe(self) -> dict[str, Any]:
        graphs = {}
        for tower, runner in self._towers.items():
            captured = sorted({b for s in runner.slots for b, g in s.graphs.items()
                               if g is not None}, key=lambda b: (b, 0) if isinstance(b, int)
                              else b)
            graphs[tower] = {"enabled": runner.cuda_graphs,
                             "captured_buckets": [_shape_text(b) for b in captured],
                             "failures": {_shape_text(b): r
                                          for b, r in runner.graph_failures.items()}}
        return {"backend": self.name, "device": self.device, "gpu": self._gpu,
                "compute_capability": f"{self._cc[0]}.{self._cc[1]}",
                "tensorrt": self._trt.__version__, "profile": self.profile.as_dict(),
                "buckets": list(self.profile.buckets()), "engine_cache": str(self._cache),
                "engines": dict(self._engines), "cuda_graphs": graphs,
                "pipeline": f"{SLOTS} slots (stream + pinned buffers + event each)",
                "image_input_dtype": next(iter(self._towers["image"].inputs.values()))[0].name
                if "image" in self._towers else None}

    def close(self) -> None:
        """Release engines, graphs and buffers (graphs before contexts before the engine)."""
        for runner in getattr(self, "_towers", {}).values():
            for slot in runner.slots:
                slot.stream.synchronize()
            runner.close()
        self._towers = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass


def load(manifest, device: str = "cuda", threads: int | None = None, **options: Any
         ) -> TensorRTBackend:
    """The TensorRT backend for ``manifest``; ``options`` are this backend's (``OPTIONS``, see
    the module docstring), checked before anything loads: InputError names an unknown one or a
    bad value. ``threads`` (host threads of the CPU backends) does not apply here."""
    profile, cache_dir, build, cuda_graphs = parse_options(**options)
    return TensorRTBackend(manifest, device=device, profile=profile, cache_dir=cache_dir,
                           build=build, cuda_graphs=cuda_graphs)


__all__ = ["BUILD_MODES", "OPTIONS", "Slot", "TensorRTBackend", "TowerRunner", "load",
           "parse_options", "stage_rows"]
