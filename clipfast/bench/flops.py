"""FLOPs per item of an ONNX tower: MatMul / Gemm / Conv and their integer, QLinear and fused
ONNX Runtime forms, counted at the bound input shapes (multiply-add = 2 FLOPs).

Own per-node formulas: onnx-tool, the maintained counter, fails on the com.microsoft fused ops.

Shapes come from the libraries: ``onnx.shape_inference`` with data propagation, and where that
leaves a compute node unknown (Reshape targets computed at run time through Div, fused
com.microsoft ops it does not know) one ONNX Runtime run at the bound shapes, its intermediate
tensors made outputs, fills the gaps.

``onnx`` is imported only when FLOPs are counted: the runtime does not need it, and without it
``count_flops`` raises an ImportError that says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfast.bench.stats import round_sig

ONNX_MISSING = ("counting FLOPs needs the onnx package, which is not installed "
                "(pip install onnx)")

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
        return {"gflop": round_sig(self.total / 1e9, 6), "by_op_gflop":
                {k: round_sig(v / 1e9, 6) for k, v in sorted(self.by_op.items())},
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


def _import_onnx():
    """The onnx module, or an ImportError that names what is missing and how to get it."""
    try:
        import onnx
        from onnx import shape_inference  # noqa: F401  (the piece count_flops uses)
    except ImportError as e:
        raise ImportError(ONNX_MISSING) from e
    return onnx


def _has_external_data(proto) -> bool:
    from onnx import TensorProto

    return any(i.data_location == TensorProto.EXTERNAL for i in proto.graph.initializer)


def _probe_shapes(model: Any, names: list[str], input_shapes: dict[str, list[int]]
                  ) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run at the bound input shapes (no graph
    optimisation, so every tensor still exists). ``model``: a path (external data is read by
    onnxruntime from the file's folder, not loaded here) or an ``onnx.ModelProto``."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
        if _has_external_data(proto):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(Path(model).resolve().parent))
    # The graph's inputs at the bound shapes (which may differ from the declared ones), and no
    # stale intermediate shapes: onnxruntime infers them at those shapes.
    _bind_inputs(proto, input_shapes, 1)
    del proto.graph.value_info[:]
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    del proto
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


def _load_graph(model: Any):
    """(a private copy of the graph, its path or None). From a path only the graph and the
    initializers' dims are needed, not their bytes: dropping the big ones keeps shape
    inference's copy small (a tower's weights are hundreds of MB)."""
    onnx = _import_onnx()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = onnx.load(str(path), load_external_data=False)
        for init in proto.graph.initializer:
            if len(init.raw_data) > 4096:
                init.ClearField("raw_data")
        return proto, path
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    return proto, None


def _tally(compute: list, shape: Callable[[str], list[int | None] | None],
           producers: dict[str, str]) -> tuple[float, float, dict[str, float], list[str], int]:
    """(total, integer share, per op, unresolved node names, nodes counted)."""
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
    return total, int8, by_op, unresolved, counted


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
    leaves a compute node unknown and ``probe`` is set, one onnxruntime run at those shapes
    fills the gaps (``method`` says so). Raises ImportError without the onnx package.
    """
    proto, path = _load_graph(model)
    from onnx import shape_inference

    _bind_inputs(proto, input_shapes, batch)
    bound = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
             for i in proto.graph.input}
    method = "onnx.shape_inference"
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    try:
        inferred = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and plain RuntimeErrors
        inferred = proto
        method = f"declared shapes only (shape inference failed: {e})"
    shapes = _shape_table(inferred)
    compute = [n for n in inferred.graph.node if n.op_type in COMPUTE_OPS]
    pending = [n for n in compute if node_flops(n, shapes.get) is None]
    if pending and probe:
        wanted = sorted({t for n in pending for t in list(n.input) + list(n.output)
                         if t and t not in bound and not _known(shapes.get(t))})
        try:
            shapes.update(_probe_shapes(path if path is not None else model, wanted, bound))
            method += " + onnxruntime probe"
        except Exception as e:  # a probe failure leaves those nodes unresolved, and says why
            method += f" (onnxruntime probe failed: {type(e).__name__}: {e})"
    total, int8, by_op, unresolved, counted = _tally(compute, shapes.get, producers)
    uncounted = sorted({n.op_type for n in inferred.graph.node
                        if n.op_type in _UNCOUNTED_COMPUTE})
    return FlopCount(total=total, by_op=by_op, int8_fraction=int8 / total if total else 0.0,
                     nodes=counted, unresolved=unresolved, uncounted_ops=uncounted,
                     method=method)


def tower_shapes(manifest, tower: str) -> dict[str, list[int]]:
    """Batch-1 input shapes of a tower from the manifest (the text length is the context
    length even where the graph leaves it symbolic)."""
    if tower == "image":
        return {manifest.spec.image.input: [1, *manifest.spec.image.shape]}
    length = manifest.spec.tokenizer.context_length
    return {name: [1, length] for name in manifest.spec.text.inputs}


def count_tower_flops(manifest, tower: str) -> FlopCount:
    """FLOPs per item of one tower of a loaded artifact manifest."""
    return count_flops(manifest.path(manifest.spec.tower(tower).file),
                       tower_shapes(manifest, tower))
