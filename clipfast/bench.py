"""`clipfast bench`: latency, throughput, memory and utilisation of an artifact's towers.

::

    clipfast bench ARTIFACT [ARTIFACT ...] [--backends onnxruntime,tensorrt,torch]
        [--batch-sizes 1,8,32,128] [--towers image,text] [--images DIR] [--device cpu|cuda]
        --out results.json

For every artifact (one precision each: its manifest says which), backend, tower and batch size
one row: latency p50 / p90 / p99 in ms over timed calls after warm-up (CUDA synchronised around
each call), throughput in items/s at the median, the process's peak memory during the row, FLOPs
per item counted from the ONNX graph, the fraction of the machine's measured matrix-multiply peak
that throughput reaches, and the speedup against the PyTorch source model in eager mode
(backend ``torch``), measured in the same run. ``--images DIR`` adds end-to-end rows: decode +
preprocess + encode for images (the number users feel), tokenize + encode for texts. The results
go to ``--out`` as JSON, with a markdown table (``.md``) and a latency-against-batch-size plot
(``.png``, needs matplotlib: ``pip install 'clipfast[bench]'``) written beside it. Both name the
CPU's instruction-set level (``clipfast.cpu``: AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI, AMX,
aarch64): int8 kernels, their speed and even their results differ between levels.

By default one backend is loaded at a time (clean per-backend memory). ``--interleave`` loads
them together and alternates their calls, so on a shared machine every backend is timed under
the same background load and the speedups stay meaningful.

Importing this module is cheap (standard library only): numpy, onnx, torch and matplotlib are
imported by the functions that need them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfast import cpu as cpu_facts
from clipfast.errors import ClipfastError

SCHEMA = "clipfast-bench"
SCHEMA_VERSION = 1
DEFAULT_BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
TOWERS = ("image", "text")
MODES = ("tower", "end_to_end")
BASELINE = "torch"
# Above this 1-minute load average other jobs share the cores and timings are not clean.
BUSY_LOAD = 1.5

# --------------------------------------------------------------------------- statistics


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Per-call latencies in ms -> p50 / p90 / p99 (linear interpolation between order
    statistics, numpy's default), mean, min, max, std, and throughput at the median."""
    import numpy as np

    if len(times_ms) == 0:
        raise ValueError("summarize: no timings")
    if batch_size < 1:
        raise ValueError(f"summarize: batch_size must be at least 1, got {batch_size}")
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {
        "iterations": int(t.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "std_ms": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        # The median call, not the mean: one slow outlier should not move the headline figure.
        "items_per_s": batch_size * 1000.0 / float(p50) if p50 > 0 else math.inf,
        "ms_per_item": float(p50) / batch_size,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    min_iters: int = 5,
    max_iters: int = 200,
    min_seconds: float = 2.0,
    sync: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float] | Exception]:
    """Time several callables in rounds, one call of each per round (the order rotating), so
    that all of them see the same background load: on a shared machine the ratios stay fair
    even when absolute times drift. Each gets ``warmup`` untimed calls first; rounds go on
    until every callable has ``min_iters`` calls and ``min_seconds`` have passed, or
    ``max_iters`` rounds. ``sync`` runs after every call, inside the timed region. Returns ms
    per call for each name, or the exception a callable raised (it leaves the rotation)."""
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got {min_iters} and {max_iters}")
    out: dict[str, list[float] | Exception] = {}
    live: list[str] = []
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 0)):
                fn()
            if sync is not None:
                sync()
        except Exception as e:  # reported per callable; the others go on
            out[name] = e
            continue
        out[name] = []
        live.append(name)
    start = clock()
    rounds = 0
    while live and rounds < max_iters:
        shift = rounds % len(live)
        for name in live[shift:] + live[:shift]:
            t0 = clock()
            try:
                fns[name]()
                if sync is not None:
                    sync()
            except Exception as e:  # e.g. out of memory at a large batch
                out[name] = e
                continue
            out[name].append((clock() - t0) * 1000.0)
        live = [n for n in live if not isinstance(out[n], Exception)]
        rounds += 1
        if rounds >= min_iters and clock() - start >= min_seconds:
            break
    return out


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    min_iters: int = 5,
    max_iters: int = 200,
    min_seconds: float = 2.0,
    sync: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time calls (ms each) until at least
    ``min_iters`` calls and ``min_seconds`` have passed, or ``max_iters`` calls. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after every call, inside the timed region, so queued GPU
    work is counted where it belongs. Exceptions from ``fn`` propagate."""
    got = time_interleaved({"fn": fn}, warmup=warmup, min_iters=min_iters, max_iters=max_iters,
                           min_seconds=min_seconds, sync=sync, clock=clock)["fn"]
    if isinstance(got, Exception):
        raise got
    return got


def add_speedups(rows: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Set ``speedup_vs_torch`` on every row: its items/s over the baseline backend's items/s
    for the same model, tower, mode and batch size (None where the baseline was not
    measured). The baseline's own rows get 1.0. Rows with a ``group`` (timed interleaved)
    compare only within their group."""
    def key(r: dict[str, Any]) -> tuple:
        # "group": rows timed together (--interleave) compare only with each other.
        return r["model"], r["tower"], r["mode"], r["batch_size"], r.get("group")

    base = {key(r): r["items_per_s"] for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get(key(r))
        r["speedup_vs_torch"] = (round(r["items_per_s"] / b, 3) if b and b > 0
                                 and math.isfinite(r["items_per_s"]) else None)


# --------------------------------------------------------------------------- memory


def _proc_status_kb(keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def current_rss_mb() -> float | None:
    """Resident set size of this process in MiB (None where it cannot be read)."""
    st = _proc_status_kb(("VmRSS",))
    if "VmRSS" in st:
        return st["VmRSS"] / 1024.0
    try:
        import psutil  # optional: only where /proc is missing

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS, Linux >= 4.0
    (``/proc/self/clear_refs`` value 5). False where that is not possible: then the peak is the
    process-lifetime maximum."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark in MiB: VmHWM (resettable), else ``getrusage`` (lifetime)."""
    st = _proc_status_kb(("VmHWM",))
    if "VmHWM" in st:
        return st["VmHWM"] / 1024.0
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS


class MemoryProbe:
    """Peak memory during one row. CPU: the process RSS high-water mark (native allocations of
    onnxruntime and torch included, which tracemalloc cannot see). CUDA: also
    ``torch.cuda.max_memory_allocated`` (the torch backend's tensors) and the device's used
    memory after the row (every allocator, onnxruntime's arena included)."""

    def __init__(self, device: str):
        self.device = device
        self.resettable = False
        self._before: float | None = None
        self._torch = None
        if device == "cuda":
            try:
                import torch

                if torch.cuda.is_available():
                    self._torch = torch
            except ImportError:
                pass

    def start(self) -> None:
        gc.collect()
        self.resettable = reset_peak_rss()
        self._before = current_rss_mb()
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, float | None]:
        peak = peak_rss_mb()
        out: dict[str, float | None] = {
            "peak_rss_mb": round(peak, 1),
            "rss_delta_mb": (round(max(peak - self._before, 0.0), 1)
                             if self._before is not None and self.resettable else None),
        }
        if self._torch is not None:
            cuda = self._torch.cuda
            free, total = cuda.mem_get_info()
            out["peak_gpu_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
            out["gpu_used_mb"] = round((total - free) / 2**20, 1)
        return out


# --------------------------------------------------------------------------- FLOPs

# op -> (index of A, index of B) for matrix products; output = A @ B.
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3),
               "FusedMatMul": (0, 1), "MatMulIntegerToFloat": (0, 1),
               "DynamicQuantizeMatMul": (0, 1), "MatMulNBits": (0, None)}
# op -> index of the weight (Cout, Cin / group, *kernel).
_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}
_GEMM_OPS = {"Gemm", "FusedGemm"}
_ATTENTION_OPS = {"Attention", "MultiHeadAttention"}
_INTEGER_OPS = {"MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                "ConvInteger", "QLinearConv", "MatMulNBits"}
# Ops that do matrix work this counter does not model: reported, never silently dropped.
_UNCOUNTED_COMPUTE = {"Einsum", "ConvTranspose", "QAttention", "QGemm", "GroupQueryAttention",
                      "PackedAttention", "PackedMultiHeadAttention", "SparseAttention",
                      "DecoderAttention", "DecoderMaskedMultiHeadAttention"}
COMPUTE_OPS = set(_MATMUL_OPS) | set(_CONV_OPS) | _GEMM_OPS | _ATTENTION_OPS


@dataclass
class FlopCount:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs) of a graph at the bound input shapes.

    total: FLOPs (integer ops for int8 graphs counted the same way).
    by_op: total per op type.
    int8_fraction: share of ``total`` in integer or QDQ-quantized products.
    nodes: compute nodes counted; unresolved: names of compute nodes whose shapes stayed unknown
        (not in ``total``); uncounted_ops: op types doing matrix work that are not modelled.
    method: how shapes were found.
    """

    total: float
    by_op: dict[str, float] = field(default_factory=dict)
    int8_fraction: float = 0.0
    nodes: int = 0
    unresolved: list[str] = field(default_factory=list)
    uncounted_ops: list[str] = field(default_factory=list)
    method: str = "onnx.shape_inference"

    def to_dict(self) -> dict[str, Any]:
        return {"gflop": _sig(self.total / 1e9, 6), "by_op_gflop":
                {k: _sig(v / 1e9, 6) for k, v in sorted(self.by_op.items())},
                "int8_fraction": round(self.int8_fraction, 4), "nodes": self.nodes,
                "unresolved": self.unresolved[:20], "unresolved_count": len(self.unresolved),
                "uncounted_ops": self.uncounted_ops, "method": self.method}


def _attr(node, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _known(shape: Sequence[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def node_flops(node, shape: Callable[[str], list[int | None] | None]) -> float | None:
    """FLOPs of one compute node from the shapes of its tensors (``shape(name)`` gives a list
    of dims, None for an unknown dim, or None for an unknown tensor); None when they are not
    known well enough."""
    op = node.op_type

    def s(i: int | None) -> list[int | None] | None:
        if i is None or len(node.input) <= i or not node.input[i]:
            return None
        return shape(node.input[i])

    out = shape(node.output[0]) if node.output else None
    if not _known(out):
        return None
    n_out = math.prod(out)
    if op in _MATMUL_OPS:
        ia, ib = _MATMUL_OPS[op]
        a, b = s(ia), s(ib)
        k = None
        if op == "FusedMatMul" and _attr(node, "transA") and a and len(a) >= 2:
            k = a[-2]
        elif a:
            k = a[-1]
        if (not isinstance(k, int)) and b:
            # A[..., K] @ B[..., K, N]: K is also B's second-to-last dim (first for 1-D B).
            k = b[0] if len(b) == 1 else b[-2]
            if op == "FusedMatMul" and _attr(node, "transB") and len(b) >= 2:
                k = b[-1]
        if op == "MatMulNBits":
            k = _attr(node, "K") or k
        return 2.0 * n_out * k if isinstance(k, int) else None
    if op in _GEMM_OPS:
        a, b = s(0), s(1)
        k = None
        if a and len(a) == 2 and isinstance(a[0 if _attr(node, "transA") else 1], int):
            k = a[0 if _attr(node, "transA") else 1]
        elif b and len(b) == 2:
            k = b[1 if _attr(node, "transB") else 0]
        return 2.0 * n_out * k if isinstance(k, int) else None
    if op in _CONV_OPS:
        w = s(_CONV_OPS[op])
        if not _known(w) or len(w) < 3:
            return None
        # Weight (Cout, Cin / group, kh, kw): each output value is a Cin/group*kh*kw dot product.
        return 2.0 * n_out * math.prod(w[1:])
    if op == "Attention":  # com.microsoft: input (B, S, H), QKV weight (H, 3 * H')
        x, w = s(0), s(1)
        if not (_known(x) and _known(w)) or len(x) != 3 or len(w) != 2:
            return None
        bsz, seq, hid = x
        return 2.0 * bsz * seq * hid * w[1] + 4.0 * bsz * seq * seq * out[-1]
    if op == "MultiHeadAttention":  # com.microsoft, separate q (B, S, D), k (B, L, D)
        q, k = s(0), s(1)
        if not (_known(q) and _known(k)) or len(q) != 3 or len(k) != 3:
            return None
        return 2.0 * q[0] * q[1] * k[1] * q[2] + 2.0 * q[0] * q[1] * k[1] * out[-1]
    return None


def _bind_inputs(model, input_shapes: dict[str, Sequence[int]] | None, batch: int) -> None:
    """Make every graph input's shape static: ``input_shapes[name]`` where given, else the
    symbolic dims bound to ``batch`` (first dim) or 1."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(inp.name)
        if given is not None:
            if len(given) != len(dims):
                raise ValueError(f"input {inp.name!r}: graph has rank {len(dims)}, "
                                 f"input_shapes gives {tuple(given)}")
            values = list(given)
        else:
            values = [d.dim_value if d.HasField("dim_value") else (batch if j == 0 else 1)
                      for j, d in enumerate(dims)]
        for d, v in zip(dims, values):
            d.Clear()
            d.dim_value = int(v)


def _shape_table(model) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
    return shapes


def _probe_shapes(path: Path, names: list[str], input_shapes: dict[str, list[int]]
                  ) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run at the bound input shapes (no graph
    optimisation, so every tensor still exists). Used only for what shape inference left
    unknown (shapes computed from Shape/Div chains)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    del model
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
    feed = {}
    for inp in sess.get_inputs():
        shape = input_shapes[inp.name]
        dtype = dtypes.get(inp.type, np.float32)
        # Masks of ones keep every token; zero ids and zero pixels are valid for everything else.
        fill = 1 if "mask" in inp.name else 0
        feed[inp.name] = np.full(shape, fill, dtype=dtype)
    values = sess.run(names, feed)
    return {n: list(v.shape) for n, v in zip(names, values)}


# Ops whose value a shape computation needs (Shape -> Gather -> Div -> Concat -> Reshape, as torch
# exports write head dims): evaluated with numpy on small tensors so shape inference can go on.
_FOLDABLE = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub",
             "Mul", "Div", "Mod", "Sqrt", "Neg", "Floor", "Ceil", "Equal", "Less", "Greater",
             "Where", "Reshape", "Identity", "ConstantOfShape", "Range", "Expand", "Min", "Max",
             "Transpose"}
_FOLD_MAX_ELEMENTS = 1024


def _fold_value(node, vals: list[Any], shape: Callable[[str], list[int | None] | None]) -> Any:
    """numpy value of one small node, or None when it is not computable here."""
    import numpy as np
    from onnx import helper

    op = node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op == "Shape":
        s = shape(node.input[0])
        if not _known(s):
            return None
        start, end = attrs.get("start", 0), attrs.get("end", None)
        return np.array(s[start:end], dtype=np.int64)
    if any(v is None for v in vals[:1]) or (op not in ("Slice", "Squeeze", "Unsqueeze", "Range")
                                            and any(v is None for v in vals)):
        return None
    x = vals[0]
    if op == "Identity":
        return x
    if op == "Gather":
        return np.take(x, vals[1], axis=attrs.get("axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes")
        if axes is None and len(vals) > 1:
            if vals[1] is None:
                return None
            axes = [int(a) for a in np.atleast_1d(vals[1])]
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in vals], axis=attrs.get("axis", 0))
    if op == "Slice":
        if len(vals) < 3 or any(v is None for v in vals):
            return None
        starts, ends = vals[1], vals[2]
        axes = vals[3] if len(vals) > 3 else np.arange(len(starts))
        steps = vals[4] if len(vals) > 4 else np.ones(len(starts), dtype=np.int64)
        index = [slice(None)] * x.ndim
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            index[int(ax)] = slice(int(st), int(en), int(sp))
        return x[tuple(index)]
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op in ("Add", "Sub", "Mul", "Min", "Max", "Equal", "Less", "Greater"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Min": np.minimum,
              "Max": np.maximum, "Equal": np.equal, "Less": np.less, "Greater": np.greater}[op]
        out = vals[0]
        for v in vals[1:]:
            out = fn(out, v)
        return out.astype(x.dtype) if op in ("Add", "Sub", "Mul", "Min", "Max") else out
    if op == "Div":
        if np.issubdtype(x.dtype, np.integer):  # ONNX integer Div truncates toward zero
            return np.trunc(np.true_divide(x, vals[1])).astype(x.dtype)
        return np.divide(x, vals[1]).astype(x.dtype)
    if op == "Mod":
        return (np.fmod if attrs.get("fmod", 0) else np.mod)(x, vals[1]).astype(x.dtype)
    if op in ("Sqrt", "Neg", "Floor", "Ceil"):
        return {"Sqrt": np.sqrt, "Neg": np.negative, "Floor": np.floor, "Ceil": np.ceil}[op](x)
    if op == "Where":
        return np.where(vals[0], vals[1], vals[2])
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Reshape":
        target = [int(d) for d in vals[1]]
        if not attrs.get("allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)
    if op == "ConstantOfShape":
        n = int(np.prod(x)) if x.size else 1
        if n > _FOLD_MAX_ELEMENTS:
            return None
        fill = attrs.get("value")
        fill = (np.frombuffer(fill.raw_data, helper.tensor_dtype_to_np_dtype(fill.data_type))
                if fill is not None and fill.raw_data else np.zeros(1, np.float32))
        return np.full([int(d) for d in x], fill.reshape(-1)[0] if fill.size else 0,
                       dtype=fill.dtype)
    if op == "Range":
        if any(v is None for v in vals):
            return None
        return np.arange(vals[0], vals[1], vals[2]).astype(np.asarray(vals[0]).dtype)
    if op == "Expand":
        target = np.broadcast_shapes(x.shape, tuple(int(d) for d in vals[1]))
        if math.prod(target) > _FOLD_MAX_ELEMENTS:
            return None
        return np.broadcast_to(x, target).copy()
    return None


def _fold_shape_computations(model) -> int:
    """Replace every small node whose value is computable (from constants and now-known
    shapes) by a Constant, so the next shape inference sees literal Reshape targets. Returns
    how many nodes were folded."""
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = _shape_table(model)
    values: dict[str, Any] = {}
    for init in model.graph.initializer:
        if math.prod(init.dims) <= _FOLD_MAX_ELEMENTS and (init.raw_data or not init.dims
                                                           or init.int64_data or init.float_data
                                                           or init.int32_data):
            values[init.name] = numpy_helper.to_array(init)
    folded = 0
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
            continue
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx") \
                or len(node.output) != 1:
            continue
        try:
            val = _fold_value(node, [values.get(i) if i else None for i in node.input],
                              shapes.get)
        except (ValueError, TypeError, IndexError, KeyError, OverflowError):
            val = None  # not a shape computation this evaluator understands: leave it
        if val is None or np.asarray(val).size > _FOLD_MAX_ELEMENTS:
            continue
        val = np.asarray(val)
        values[node.output[0]] = val
        node.ClearField("input")
        node.ClearField("attribute")
        node.op_type, node.domain = "Constant", ""
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(val)))
        folded += 1
    return folded


def count_flops(
    model: Any,
    input_shapes: dict[str, Sequence[int]] | None = None,
    *,
    batch: int = 1,
    probe: bool = True,
) -> FlopCount:
    """Count MatMul / Gemm / Conv FLOPs (and their integer, QLinear and fused ORT forms) of an
    ONNX graph at batch ``batch`` (default 1: FLOPs per item).

    model: a path or an ``onnx.ModelProto`` (not modified). input_shapes: static shapes for
    inputs whose non-batch dims are symbolic; other symbolic dims are bound to ``batch`` (first
    dim) or 1. Shapes come from ``onnx.shape_inference`` with data propagation; where that
    leaves a compute node unknown and ``model`` is a path, one onnxruntime run at those shapes
    fills the gaps (``method`` says so).
    """
    import onnx
    from onnx import shape_inference

    path = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = onnx.load(str(path), load_external_data=False)
        # Shape inference needs the initializers' dims, not their bytes: dropping the big ones
        # keeps the copy it makes small (a ViT-B tower is 350 MB).
        for init in proto.graph.initializer:
            if len(init.raw_data) > 4096:
                init.ClearField("raw_data")
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    _bind_inputs(proto, input_shapes, batch)
    bound = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
             for i in proto.graph.input}
    method = "onnx.shape_inference"
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    inferred = proto
    for round_ in range(6):
        try:
            inferred = shape_inference.infer_shapes(inferred, data_prop=True)
        except Exception as e:  # onnx raises InferenceError and plain RuntimeErrors
            method = f"declared shapes only (shape inference failed: {e})"
            break
        shapes = _shape_table(inferred)
        pending = [n for n in inferred.graph.node
                   if n.op_type in COMPUTE_OPS and node_flops(n, shapes.get) is None]
        # Shapes computed at run time (Shape -> Div -> Reshape) stay unknown to onnx's
        # inference: fold those small computations into constants and infer again.
        if not pending or not _fold_shape_computations(inferred):
            break
        if round_ == 0:
            method += " + shape folding"
    shapes = _shape_table(inferred)

    def shape(name: str) -> list[int | None] | None:
        return shapes.get(name)

    compute = [n for n in inferred.graph.node if n.op_type in COMPUTE_OPS]
    pending = [n for n in compute if node_flops(n, shape) is None]
    if pending and probe and path is not None:
        wanted = sorted({t for n in pending for t in list(n.input) + list(n.output)
                         if t and t not in bound and not _known(shapes.get(t))})
        try:
            shapes.update(_probe_shapes(path, wanted, bound))
            method += " + onnxruntime probe"
        except Exception as e:  # a probe failure leaves those nodes unresolved, and says why
            method += f" (onnxruntime probe failed: {type(e).__name__}: {e})"
    total, int8 = 0.0, 0.0
    by_op: dict[str, float] = {}
    unresolved: list[str] = []
    counted = 0
    for n in compute:
        f = node_flops(n, shape)
        if f is None:
            unresolved.append(n.name or f"{n.op_type}:{n.output[0]}")
            continue
        counted += 1
        total += f
        by_op[n.op_type] = by_op.get(n.op_type, 0.0) + f
        quantized = n.op_type in _INTEGER_OPS or any(
            producers.get(t) == "DequantizeLinear" for t in n.input[:2])
        if quantized:
            int8 += f
    uncounted = sorted({n.op_type for n in inferred.graph.node
                        if n.op_type in _UNCOUNTED_COMPUTE})
    return FlopCount(total=total, by_op=by_op, int8_fraction=int8 / total if total else 0.0,
                     nodes=counted, unresolved=unresolved, uncounted_ops=uncounted,
                     method=method)


# --------------------------------------------------------------------------- machine peak


def _gemm_model(n: int, kind: str) -> bytes:
    """One (n, n) @ (n, n) product as an ONNX model; the right operand is a constant, as
    weights are in a tower (onnxruntime pre-packs it). kind: "fp32" MatMul or "int8"
    MatMulInteger (uint8 activations x int8 weights, what dynamic/QDQ int8 runs on CPU)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    elif kind == "int8":
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        raise ValueError(f"kind must be 'fp32' or 'int8', got {kind!r}")
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _best_rate(fn: Callable[[], Any], flop: float, repeats: int) -> float:
    """Best-of-``repeats`` rate in GFLOP/s (the peak is what the machine can do, so the fastest
    call, not the median, after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def measure_cpu_peak(n: int = 2048, repeats: int = 10, threads: int | None = None
                     ) -> dict[str, Any]:
    """Matrix-multiply peak of this CPU: fp32 as the best of numpy (BLAS) and onnxruntime
    (MLAS) on an (n, n) @ (n, n) product, int8 from onnxruntime MatMulInteger. GFLOP/s (GOP/s
    for int8) with the thread count of the benchmarked sessions."""
    import numpy as np

    flop = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    found: dict[str, float] = {"numpy_fp32": _best_rate(lambda: a @ b, flop, repeats)}
    notes = []
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        for kind, x in (("fp32", a), ("int8", rng.integers(0, 256, (n, n)).astype(np.uint8))):
            sess = ort.InferenceSession(_gemm_model(n, kind), so,
                                        providers=["CPUExecutionProvider"])
            found[f"onnxruntime_{kind}"] = _best_rate(lambda s=sess, x=x: s.run(None, {"A": x}),
                                                      flop, repeats)
    except ImportError as e:
        notes.append(f"onnxruntime GEMM peak not measured ({e}); install onnx for it")
    fp32 = max(v for k, v in found.items() if k.endswith("fp32"))
    return {"device": "cpu", "size": n, "repeats": repeats, "threads": threads or os.cpu_count(),
            "fp32_gflops": round(fp32, 1),
            "int8_gops": round(found["onnxruntime_int8"], 1) if "onnxruntime_int8" in found
            else None,
            "measured": {k: round(v, 1) for k, v in found.items()}, "notes": notes}


def measure_gpu_peak(n: int = 8192, repeats: int = 10) -> dict[str, Any]:
    """Matrix-multiply peak of the current CUDA device with torch: fp32 (TF32 off), fp16 and
    int8 (``torch._int_mm``), best of ``repeats`` synchronised calls."""
    import torch

    dev = torch.device("cuda")
    flop = 2.0 * n**3
    found: dict[str, float] = {}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)

            def mm(a=a, b=b):
                torch.matmul(a, b)
                torch.cuda.synchronize()

            found[name] = _best_rate(mm, flop, repeats)
        try:
            a8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
            b8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)

            def mm8():
                torch._int_mm(a8, b8)
                torch.cuda.synchronize()

            found["int8"] = _best_rate(mm8, flop, repeats)
        except (RuntimeError, AttributeError):
            pass  # no int8 tensor-core path in this torch build: int8 rows get no utilisation
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"device": "cuda", "name": torch.cuda.get_device_name(), "size": n, "repeats": repeats,
            "fp32_gflops": round(found["fp32"], 1), "fp16_gflops": round(found["fp16"], 1),
            "int8_gops": round(found["int8"], 1) if "int8" in found else None,
            "measured": {k: round(v, 1) for k, v in found.items()}, "notes": []}


def peak_for(precision: str, peak: dict[str, Any] | None) -> float | None:
    """The peak (GFLOP/s) a row of ``precision`` is compared with: int8 -> the int8 GEMM peak;
    fp16 -> the fp16 peak where measured (GPU), else fp32; anything else -> fp32."""
    if not peak:
        return None
    if precision.startswith("int8"):
        return peak.get("int8_gops")
    if precision.startswith(("fp16", "bf16")) and peak.get("fp16_gflops"):
        return peak["fp16_gflops"]
    return peak.get("fp32_gflops")


# --------------------------------------------------------------------------- machine facts


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, instruction-set level (``isa``: int8 kernels, speed and even int8 fidelity
    depend on it) and feature flags, cores, memory and library versions (and the GPU on
    CUDA)."""
    import numpy as np

    host = cpu_facts.host_cpu()
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": host.model, "arch": host.machine, "isa": host.isa,
                            "cpu_features": list(host.flags),
                            "int8_saturates": host.int8_saturates, "cores": os.cpu_count()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import clipfast

    versions = {"clipfast": clipfast.__version__, "numpy": np.__version__}
    try:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    for mod in ("torch", "open_clip", "transformers", "tensorrt"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    info["versions"] = versions
    if device == "cuda" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_isa(machine: dict[str, Any]) -> str | None:
    """The ISA level of a results document's ``machine``: its ``isa``, or for documents written
    before that was recorded, the level its ``cpu_features`` flags give (None without flags)."""
    if machine.get("isa"):
        return machine["isa"]
    flags = machine.get("cpu_features")
    if not flags:
        return None
    arch = machine.get("arch") or next(
        (a for a in ("x86_64", "aarch64", "arm64", "AMD64") if a in machine.get("platform", "")),
        "x86_64" if {"avx2", "avx512f", "fma"} & set(flags) else "")
    return cpu_facts.CpuInfo(machine=arch, model=machine.get("cpu", ""), flags=tuple(flags)).isa


def machine_line(machine: dict[str, Any]) -> str:
    """``CPU: Intel Xeon, AVX-512 VNNI, 2 cores``: the CPU a results document was measured on
    ("ISA not recorded" for documents without CPU flags)."""
    return (f"CPU: {machine.get('cpu')}, {machine_isa(machine) or 'ISA not recorded'}, "
            f"{machine.get('cores')} cores")


# --------------------------------------------------------------------------- the run


@dataclass
class BenchConfig:
    """Everything one bench run needs; the CLI fills it from its flags."""

    artifacts: list[Path]
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    towers: tuple[str, ...] = TOWERS
    images: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 200
    min_seconds: float = 2.0
    peak: bool = True
    peak_size: int = 2048
    flops: bool = True
    progress: bool = True
    interleave: bool = False

    def validate(self) -> None:
        if not self.artifacts:
            raise ClipfastError("bench: give at least one artifact directory")
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise ClipfastError(f"--towers {','.join(self.towers)}: expected a comma-separated "
                                f"subset of {','.join(TOWERS)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ClipfastError(f"--batch-sizes {self.batch_sizes}: expected positive integers")
        if not self.backends:
            raise ClipfastError("--backends: name at least one backend")
        if self.device not in ("cpu", "cuda"):
            raise ClipfastError(f"--device {self.device!r}: expected 'cpu' or 'cuda'")
        if self.images is not None and not Path(self.images).is_dir():
            raise ClipfastError(f"--images {str(self.images)!r} is not a directory")
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ClipfastError(f"need 1 <= --min-iters <= --max-iters, got {self.min_iters} "
                                f"and {self.max_iters}")

    def command(self, out: str | os.PathLike | None = None) -> str:
        """The canonical command line that reproduces this run."""
        parts = ["clipfast", "bench", *[str(a) for a in self.artifacts],
                 "--backends", ",".join(self.backends),
                 "--batch-sizes", ",".join(str(b) for b in self.batch_sizes),
                 "--towers", ",".join(self.towers), "--device", self.device]
        if self.images is not None:
            parts += ["--images", str(self.images)]
        if self.threads:
            parts += ["--threads", str(self.threads)]
        defaults = BenchConfig(artifacts=[])
        for name in ("warmup", "min_iters", "max_iters", "min_seconds"):
            if getattr(self, name) != getattr(defaults, name):
                parts += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        if self.interleave:
            parts.append("--interleave")
        if not self.peak:
            parts.append("--no-peak")
        if out is not None:
            parts += ["--out", str(out)]
        return " ".join(parts)


def model_label(manifest) -> str:
    """A short, stable name for an artifact's source model (rows of one source share the torch
    baseline): the open_clip name (with its tag unless random), or the transformers id / dir."""
    src = manifest["source"]
    model = str(src.get("model", "?"))
    if model.startswith("transformers:"):
        ref = model[len("transformers:"):]
        if os.path.isabs(ref) or os.path.exists(ref):
            arch = manifest.get("architecture") or {}
            ref = arch.get("name") or Path(ref).name
        return f"transformers:{ref}"
    tag = src.get("pretrained")
    return model if tag in (None, "", "none") else f"{model}:{tag}"


def _image_files(directory: Path) -> list[Path]:
    from clipfast.types import IMAGE_SUFFIXES

    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClipfastError(f"--images {str(directory)!r}: no image files "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


@dataclass
class _Inputs:
    """Inputs of one artifact at the largest batch; rows slice them. pixels: float32
    (B, 3, H, W) of generated sample images; tokens: {name: int64 (B, L)}; paths / captions
    for the end-to-end rows."""

    pixels: Any
    tokens: dict[str, Any]
    captions: list[str]
    paths: list[str]


def _prepare_inputs(manifest, max_batch: int, images: Path | None, towers: Iterable[str]
                    ) -> _Inputs:
    import numpy as np

    from clipfast.preprocess import preprocess_batch
    from clipfast.samples import CAPTIONS, sample_images
    from clipfast.tokenizer import Tokenizer

    towers = set(towers)
    pixels = tokens = None
    if "image" in towers:
        # Real preprocessed pixels (not zeros): value-dependent paths (denormals) stay honest.
        base = preprocess_batch(sample_images(min(max_batch, 12)), manifest.preprocess)
        pixels = np.ascontiguousarray(np.resize(base, (max_batch, *base.shape[1:])))
    captions = _cycle(CAPTIONS, max_batch)
    if "text" in towers:
        tok_cfg = manifest.tokenizer
        tokens = Tokenizer(tok_cfg, manifest.path(tok_cfg.file))(captions)
    paths = [str(p) for p in _cycle(_image_files(images), max_batch)] if images else []
    return _Inputs(pixels, tokens or {}, captions, paths)


def _source_of(engine) -> Any:
    """The torch backend's loaded SourceModel (its reference transform and tokenizer make the
    PyTorch end-to-end pipeline), or None."""
    return getattr(engine._backend, "source", None)


def _row_callable(engine, tower: str, mode: str, batch: int, inputs: _Inputs
                  ) -> Callable[[], Any]:
    """The work one timed call does."""
    if mode == "tower":
        if tower == "image":
            pix = inputs.pixels[:batch]
            return lambda: engine.run_image_tower(pix)
        tok = {k: v[:batch] for k, v in inputs.tokens.items()}
        return lambda: engine.run_text_tower(tok)
    source = _source_of(engine) if engine.backend == BASELINE else None
    if tower == "image":
        paths = inputs.paths[:batch]
        if source is None:
            return lambda: engine.encode_images(paths)
        # PyTorch users' pipeline: PIL decode + the source's own transform + eager model.
        import numpy as np
        from PIL import Image

        from clipfast.fidelity import l2_normalize

        def torch_images():
            arrays = []
            for p in paths:
                with Image.open(p) as im:
                    arrays.append(source.reference_transform(im.convert("RGB")))
            return l2_normalize(engine.run_image_tower(np.stack(arrays)))

        return torch_images
    captions = inputs.captions[:batch]
    if source is None:
        return lambda: engine.encode_texts(captions)
    from clipfast.fidelity import l2_normalize

    return lambda: l2_normalize(engine.run_text_tower(source.reference_tokenize(captions)))


def _cuda_sync(device: str) -> Callable[[], Any] | None:
    if device != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None  # onnxruntime returns host arrays: each call has synchronised already
    return torch.cuda.synchronize if torch.cuda.is_available() else None


def _load_engine(artifact: Path, backend: str, config: BenchConfig, verify: bool):
    import clipfast

    return clipfast.Engine(artifact, backend=backend, device=config.device, fallback=False,
                           batch_size=max(config.batch_sizes), threads=config.threads,
                           verify_checksums=verify)


def run_bench(config: BenchConfig, *, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the results document (see ``write_results``)."""
    from clipfast.manifest import load_manifest

    config.validate()
    say = log or logging.getLogger("clipfast.bench").info
    load_start = load_average()
    notes: list[str] = []
    modes = ["tower"] + (["end_to_end"] if config.images is not None else [])
    batch_sizes = sorted(set(config.batch_sizes))
    max_batch = batch_sizes[-1]

    peak = None
    if config.peak:
        say("measuring the matrix-multiply peak")
        try:
            if config.device == "cuda":
                peak = measure_gpu_peak()
            else:
                peak = measure_cpu_peak(config.peak_size, threads=config.threads)
        except Exception as e:  # the peak is context, not the benchmark: say why it is missing
            notes.append(f"matrix-multiply peak not measured: {type(e).__name__}: {e}")
        else:
            notes.extend(peak.pop("notes", []))

    per_artifact = len(config.backends) * len(config.towers) * len(modes) * len(batch_sizes)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=per_artifact * len(config.artifacts), unit="row", desc="bench",
                   file=sys.stderr)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    artifacts: list[dict[str, Any]] = []
    baselines_done: set[str] = set()
    rss_per_row = True
    try:
        for art_i, art in enumerate(config.artifacts):
            manifest = load_manifest(art, verify_checksums=False)
            label = model_label(manifest)
            precision = manifest.precision
            art_info: dict[str, Any] = {
                "path": str(Path(art)), "model": label, "family": manifest["family"],
                "precision": precision, "random_weights": bool(manifest.get("random_weights")),
                "embed_dim": manifest.embed_dim, "flops": {},
            }
            artifacts.append(art_info)
            flops_per_item: dict[str, float | None] = {t: None for t in config.towers}
            if config.flops:
                for tower in config.towers:
                    say(f"counting FLOPs of the {label} {tower} tower")
                    try:
                        fc = count_flops(manifest.path(manifest[tower]["file"]),
                                         _tower_shapes(manifest, tower))
                    except ImportError as e:
                        notes.append(f"FLOPs not counted: {e} (pip install onnx)")
                        break
                    except Exception as e:
                        notes.append(f"{label} {tower}: FLOPs not counted: "
                                     f"{type(e).__name__}: {e}")
                        continue
                    art_info["flops"][tower] = fc.to_dict()
                    flops_per_item[tower] = fc.total if fc.total > 0 else None
                    if fc.unresolved or fc.uncounted_ops:
                        notes.append(f"{label} {tower}: {len(fc.unresolved)} compute nodes with "
                                     f"unknown shapes, uncounted ops {fc.uncounted_ops}: FLOPs "
                                     "are a lower bound")
            inputs = _prepare_inputs(manifest, max_batch, config.images, config.towers)
            verified = False
            # Sequential: one backend loaded at a time (clean per-backend memory figures).
            # Interleaved: all loaded, calls alternating, so every backend sees the same load.
            wanted = [b for b in config.backends
                      if config.interleave or not (b == BASELINE and label in baselines_done)]
            n_rows = len(config.towers) * len(modes) * len(batch_sizes)
            if bar is not None:
                bar.update(n_rows * (len(config.backends) - len(wanted)))
            groups = [wanted] if config.interleave else [[b] for b in wanted]
            for group in groups:
                engines: dict[str, Any] = {}
                loads: dict[str, tuple[float, float | None]] = {}
                for backend in group:
                    say(f"loading {label} ({precision}) on {backend}")
                    rss0 = current_rss_mb()
                    t0 = time.perf_counter()
                    try:
                        engines[backend] = _load_engine(art, backend, config,
                                                        verify=not verified)
                    except (ClipfastError, ImportError, OSError) as e:
                        skipped.append({"artifact": str(art), "model": label,
                                        "backend": backend, "reason": str(e)})
                        if bar is not None:
                            bar.update(n_rows)
                        continue
                    verified = True
                    rss1 = current_rss_mb()
                    loads[backend] = (time.perf_counter() - t0,
                                      round(rss1 - rss0, 1) if rss0 is not None and rss1
                                      else None)
                    if backend == BASELINE:
                        baselines_done.add(label)
                if not engines:
                    continue
                sync = _cuda_sync(config.device)
                probe = MemoryProbe(config.device)
                for tower in config.towers:
                    for mode in modes:
                        for batch in batch_sizes:
                            if bar is not None:
                                bar.set_postfix_str(f"{label} {'+'.join(engines)} {tower} "
                                                    f"{mode} b{batch}")
                            fns = {b: _row_callable(e, tower, mode, batch, inputs)
                                   for b, e in engines.items()}
                            probe.start()
                            timed = time_interleaved(
                                fns, warmup=config.warmup, min_iters=config.min_iters,
                                max_iters=config.max_iters, min_seconds=config.min_seconds,
                                sync=sync)
                            mem = probe.stop()
                            rss_per_row = rss_per_row and probe.resettable
                            for backend, times in timed.items():
                                if bar is not None:
                                    bar.update(1)
                                if isinstance(times, Exception) or not times:
                                    # One row failing (out of memory at a large batch) must
                                    # not lose the others: record it, with the reason.
                                    skipped.append({"artifact": str(art), "model": label,
                                                    "backend": backend, "tower": tower,
                                                    "mode": mode, "batch_size": batch,
                                                    "reason": f"{type(times).__name__}: "
                                                              f"{times}"})
                                    continue
                                row = _make_row(
                                    label, art, backend, engines[backend],
                                    "fp32" if backend == BASELINE else precision, tower, mode,
                                    batch, times, config, mem, *loads[backend],
                                    flops_per_item.get(tower), peak)
                                if config.interleave:
                                    row["group"] = art_i
                                rows.append(row)
                del engines
                gc.collect()
            if art_i + 1 < len(config.artifacts):
                del inputs
                gc.collect()
    finally:
        if bar is not None:
            bar.close()
    if not rows:
        reasons = "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped)
        raise ClipfastError(f"bench: no backend could run ({reasons})")
    add_speedups(rows)
    if not any(r["backend"] == BASELINE for r in rows) and BASELINE in config.backends:
        notes.append("the torch baseline did not run (see skipped): no speedups")
    load_end = load_average()
    busy = max((load_start or [0])[0], (load_end or [0])[0])
    if busy > BUSY_LOAD:
        notes.append(f"load average {busy:.2f} > {BUSY_LOAD} while measuring (start "
                     f"{load_start}, end {load_end}): other jobs were running on this machine, "
                     "timings are noisy")
    if config.interleave:
        notes.append("--interleave: the backends were loaded together and their calls "
                     "alternated; peak RSS is the whole process's (every backend's weights), "
                     "load_rss_mb in the JSON is what each backend's load added")
    over = [r for r in rows if (r.get("utilisation") or 0) > 1.0]
    if over:
        notes.append(f"{len(over)} row(s) above 100% of the measured matrix-multiply peak: the "
                     "peak (best of a few GEMMs at the start) was depressed by other load, or "
                     "those calls ran in a quiet moment; compare utilisation on an idle machine")
    if not rss_per_row:
        notes.append("the RSS high-water mark could not be reset per row (no "
                     "/proc/self/clear_refs): peak RSS is the process-lifetime maximum")
    for s in skipped:
        where = (f" {s['tower']} {s['mode']} batch {s['batch_size']}" if "tower" in s else "")
        notes.append(f"{s['model']}: backend {s['backend']}{where} skipped: {s['reason']}")
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": config.command(),
        "machine": machine_info(config.device),
        "load_average": {"start": load_start, "end": load_end},
        "settings": {"device": config.device, "threads": config.threads or os.cpu_count(),
                     "warmup": config.warmup, "min_iters": config.min_iters,
                     "max_iters": config.max_iters, "min_seconds": config.min_seconds,
                     "batch_sizes": batch_sizes, "towers": list(config.towers),
                     "backends": list(config.backends), "modes": modes,
                     "interleave": config.interleave,
                     "images": str(config.images) if config.images else None},
        "peak": peak,
        "artifacts": artifacts,
        "rows": rows,
        "skipped": skipped,
        "notes": notes,
    }


def _tower_shapes(manifest, tower: str) -> dict[str, list[int]]:
    """Batch-1 input shapes of a tower from the manifest (the text length is the context
    length even where the graph leaves it symbolic)."""
    if tower == "image":
        return {manifest["image"].get("input", "pixel_values"): [1, *manifest["image"]["shape"]]}
    length = manifest.tokenizer.context_length
    return {name: [1, length] for name in manifest["text"]["inputs"]}


def _sig(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits (FLOPs of tiny and huge towers alike)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _make_row(label, art, backend, engine, precision, tower, mode, batch, times, config, mem,
              load_s, load_rss, flops, peak) -> dict[str, Any]:
    stats = summarize(times, batch)
    row: dict[str, Any] = {
        "model": label, "artifact": str(art), "backend": backend, "device": config.device,
        "precision": precision, "tower": tower, "mode": mode, "batch_size": batch,
        "warmup": config.warmup,
    }
    row.update({k: (_sig(v, 6) if isinstance(v, float) else v) for k, v in stats.items()})
    row.update(mem)
    row["load_s"] = round(load_s, 2)
    row["load_rss_mb"] = load_rss
    if engine.backend == "onnxruntime":
        row["providers"] = getattr(engine._backend, "providers", None)
    row["gflop_per_item"] = _sig(flops / 1e9) if flops else None
    peak_g = peak_for(precision, peak)
    if flops and math.isfinite(stats["items_per_s"]):
        achieved = flops * stats["items_per_s"] / 1e9
        row["achieved_gflops"] = _sig(achieved)
        row["peak_gflops"] = peak_g
        row["utilisation"] = _sig(achieved / peak_g) if peak_g else None
    else:
        row["achieved_gflops"] = row["peak_gflops"] = row["utilisation"] = None
    return row


# --------------------------------------------------------------------------- reports


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one markdown table (model, backend, precision, tower, mode, batch, latency
    percentiles, items/s, speedup against torch, peak memory, GFLOP/item, utilisation)."""
    head = ["model", "backend", "precision", "tower", "mode", "batch", "p50 ms", "p90 ms",
            "p99 ms", "items/s", "vs torch", "peak RSS MiB", "GFLOP/item", "% of peak"]
    gpu = any(r.get("peak_gpu_mb") is not None for r in rows)
    if gpu:
        head.insert(12, "GPU MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        util = r.get("utilisation")
        cells = [r["model"], r["backend"], r["precision"], r["tower"],
                 "end-to-end" if r["mode"] == "end_to_end" else "tower", str(r["batch_size"]),
                 _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                 _fmt(r["items_per_s"], 1),
                 f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-",
                 _fmt(r.get("peak_rss_mb"), 0), _fmt(r.get("gflop_per_item"), 2),
                 f"{100 * util:.1f}%" if util is not None else "-"]
        if gpu:
            cells.insert(12, _fmt(r.get("peak_gpu_mb") or r.get("gpu_used_mb"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any]) -> str:
    """A readable page: command, machine (CPU model, ISA level, cores first), peak, FLOPs, the
    table, skipped backends, notes."""
    m = doc["machine"]
    models = ", ".join(sorted({a["model"] for a in doc["artifacts"]}))
    out = [f"# clipfast bench: {models}", "", f"Command: `{doc['command']}`", ""]
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    out.append(f"- {machine_line(m)}"
               + (f" (flags {', '.join(m['cpu_features'])})" if m.get("cpu_features") else "")
               + (f", GPU {m['gpu']}" if m.get("gpu") else "")
               + f"; {doc['settings']['threads']} threads; {versions}")
    la = doc.get("load_average") or {}
    out.append(f"- Load average (1, 5, 15 min): {la.get('start')} at start, {la.get('end')} at "
               "end")
    out.append(f"- Timing: {doc['settings']['warmup']} warm-up call(s), then at least "
               f"{doc['settings']['min_iters']} calls and {doc['settings']['min_seconds']} s; "
               "latency percentiles over calls, items/s at the median call"
               + ("; backends interleaved call by call" if doc["settings"].get("interleave")
                  else ""))
    peak = doc.get("peak")
    if peak:
        meas = ", ".join(f"{k} {v}" for k, v in peak.get("measured", {}).items())
        out.append(f"- Matrix-multiply peak ({peak['device']}, {peak['size']}x{peak['size']}, "
                   f"best of {peak.get('repeats', '?')} calls): "
                   f"fp32 {peak.get('fp32_gflops')} GFLOP/s"
                   + (f", fp16 {peak['fp16_gflops']} GFLOP/s" if peak.get("fp16_gflops") else "")
                   + (f", int8 {peak['int8_gops']} GOP/s" if peak.get("int8_gops") else "")
                   + f" ({meas})")
    for a in doc["artifacts"]:
        fl = ", ".join(f"{t} {v['gflop']} GFLOP" for t, v in a.get("flops", {}).items())
        out.append(f"- {a['model']} ({a['precision']}, {a['path']})"
                   + (" [random weights]" if a.get("random_weights") else "")
                   + (f": {fl} per item" if fl else ""))
    out += ["", markdown_table(doc["rows"]), ""]
    out.append("`vs torch`: throughput over the PyTorch source model in eager mode, same tower, "
               "mode and batch, measured in the same run. `% of peak`: GFLOP/item x items/s over "
               "the measured matrix-multiply peak for the row's precision. `peak RSS`: the "
               "process's resident-set high-water mark during the row (loaded weights and "
               "runtime arenas included). End-to-end image rows: file decode + preprocess + "
               "encode (torch: PIL + the source's own transform + the eager model); text rows: "
               "tokenize + encode.")
    if doc.get("notes"):
        out += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(out) + "\n"


def plot_latency(doc: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Latency (p50, with a p90..p99 band) against batch size per backend, one panel per tower
    and mode, log-log. Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = doc["rows"]
    panels = sorted({(r["tower"], r["mode"]) for r in rows},
                    key=lambda p: (TOWERS.index(p[0]) if p[0] in TOWERS else 9,
                                   MODES.index(p[1]) if p[1] in MODES else 9))
    multi_model = len({r["model"] for r in rows}) > 1
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (tower, mode) in zip(axes.flat, panels):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if (r["tower"], r["mode"]) == (tower, mode):
                name = f"{r['backend']} {r['precision']}"
                if multi_model:
                    name = f"{r['model']} {name}"
                series.setdefault(name, []).append(r)
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["batch_size"])
            x = [r["batch_size"] for r in rs]
            line = ax.plot(x, [r["p50_ms"] for r in rs], marker="o", label=name)[0]
            ax.fill_between(x, [r["p90_ms"] for r in rs], [r["p99_ms"] for r in rs],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per call (p50; band p90-p99)")
        ax.set_title(f"{tower} {'end-to-end' if mode == 'end_to_end' else 'tower'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    models = ", ".join(sorted({r["model"] for r in rows}))
    where = doc["settings"]["device"]
    if where == "cpu":
        where += f", {machine_isa(doc.get('machine') or {}) or 'ISA not recorded'}"
    fig.suptitle(f"clipfast bench: {models} ({where})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(doc: dict[str, Any], out: str | os.PathLike) -> dict[str, str | None]:
    """Write ``out`` (JSON), and beside it ``.md`` (the report) and ``.png`` (the plot; skipped
    with a note in the document when matplotlib is missing). Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    written = plot_latency(doc, png)
    if written is None:
        note = ("matplotlib is not installed: the latency plot was not written "
                "(pip install 'clipfast[bench]')")
        if note not in doc["notes"]:
            doc["notes"].append(note)
    files = {"json": str(out), "markdown": str(md), "plot": str(written) if written else None}
    doc["files"] = {k: (Path(v).name if v else None) for k, v in files.items()}
    md.write_text(markdown_report(doc))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    return files


def headline_table(docs: Sequence[dict[str, Any]], batch_sizes: Sequence[int] | None = None,
                   backend: str = "onnxruntime") -> str:
    """Compact table across result documents: per model, tower, mode and batch size the
    eager-torch and ``backend`` throughput, the speedup, ``backend``'s median latency and the
    ISA level of the CPU that measured them (documents may come from different hosts)."""
    lines = [f"| model | tower | mode | batch | torch eager items/s | {backend} items/s | "
             f"speedup | {backend} p50 ms | CPU ISA |", "|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        rows = doc["rows"]
        isa = machine_isa(doc.get("machine") or {}) or "not recorded"
        base = {(r["model"], r["tower"], r["mode"], r["batch_size"]): r
                for r in rows if r["backend"] == BASELINE}
        for r in rows:
            if r["backend"] != backend or (batch_sizes and r["batch_size"] not in batch_sizes):
                continue
            b = base.get((r["model"], r["tower"], r["mode"], r["batch_size"]))
            speedup = r.get("speedup_vs_torch")
            mode = "end-to-end" if r["mode"] == "end_to_end" else "tower"
            lines.append(
                f"| {r['model']} ({r['precision']}) | {r['tower']} | {mode} | {r['batch_size']} "
                f"| {_fmt(b['items_per_s'], 1) if b else '-'} | {_fmt(r['items_per_s'], 1)} | "
                f"{f'{speedup:.2f}x' if speedup else '-'} | {_fmt(r['p50_ms'])} | {isa} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return items

    return parse


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="measure latency, throughput, memory and utilisation against torch",
        description="Benchmark artifacts' towers per backend and batch size against the PyTorch "
                    "source model; writes JSON, a markdown table and a PNG plot.")
    b.add_argument("artifact", nargs="+", help="artifact directories (one precision each)")
    b.add_argument("--backends", type=_csv(str), default=DEFAULT_BACKENDS,
                   help="comma-separated (default onnxruntime,tensorrt,torch; unavailable ones "
                        "are skipped with the reason; torch is the eager baseline)")
    b.add_argument("--batch-sizes", type=_csv(int), default=DEFAULT_BATCH_SIZES,
                   help="comma-separated (default 1,8,32,128)")
    b.add_argument("--towers", type=_csv(str), default=TOWERS, help="image,text (default both)")
    b.add_argument("--images", default=None,
                   help="directory of images: adds end-to-end rows (decode + preprocess + encode; "
                        "tokenize + encode for texts)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls per row (default 2)")
    b.add_argument("--min-iters", type=int, default=5, help="timed calls per row, at least")
    b.add_argument("--max-iters", type=int, default=200, help="timed calls per row, at most")
    b.add_argument("--min-seconds", type=float, default=2.0,
                   help="keep timing a row until this much time has passed (default 2)")
    b.add_argument("--interleave", action="store_true",
                   help="load all backends at once and alternate their calls, so each one is "
                        "timed under the same background load (fair ratios on a busy machine; "
                        "memory figures are then the whole process's)")
    b.add_argument("--no-peak", action="store_true",
                   help="skip measuring the matrix-multiply peak (no utilisation figures)")
    b.add_argument("--peak-size", type=int, default=2048,
                   help="matrix size of the CPU peak measurement (default 2048)")
    b.add_argument("--out", required=True,
                   help="results JSON; .md and .png of the same name are written beside it")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        artifacts=[Path(a) for a in args.artifact], backends=tuple(args.backends),
        batch_sizes=tuple(args.batch_sizes), towers=tuple(args.towers),
        images=Path(args.images) if args.images else None, device=args.device,
        threads=args.threads, warmup=args.warmup, min_iters=args.min_iters,
        max_iters=args.max_iters, min_seconds=args.min_seconds, peak=not args.no_peak,
        peak_size=args.peak_size, progress=not args.quiet, interleave=args.interleave,
    )
    doc = run_bench(config)
    doc["command"] = config.command(args.out)
    files = write_results(doc, args.out)
    print(machine_line(doc["machine"]))
    print(markdown_table(doc["rows"]))
    for note in doc["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"results: {files['json']}, {files['markdown']}"
          + (f", {files['plot']}" if files["plot"] else " (no plot: matplotlib missing)"))
    return 0
