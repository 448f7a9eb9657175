"""fp32 ONNX tower -> fp16, keeping overflow-prone operators in fp32.

Uses ONNX Runtime's ``OnnxModel.convert_float_to_float16``: it runs symbolic shape inference
first, which knows the fused ``com.microsoft`` operators (Attention, SkipLayerNormalization,
BiasGelu) that onnx's own shape inference does not, and then removes the Cast pairs the
conversion leaves between two fp32 operators (so the residual stream between two fp32
SkipLayerNormalizations stays fp32 instead of being rounded to fp16 on the way).

Kept in fp32 (``FP32_OPS``): LayerNormalization and its fused forms, and the pieces of an
unfused LayerNorm / L2 norm (ReduceMean, Pow, Sqrt, ReduceL2, ReduceSumSquare, Div), Softmax:
their sums of squares and exponentials overflow fp16 (max 65504) on real activations.
MatMul / Conv / Attention / Gelu run in fp16. The softmax inside a fused Attention node is part
of that operator: ONNX Runtime's fp16 attention kernels accumulate it in fp32. On the CPU
execution provider, ORT inserts Casts around fp16 operators it has no fp16 kernel for, so an fp16
graph runs there too (for fidelity checks; its speed story is the GPU).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from clipfast.errors import ExportError
from clipfast.export.onnx_files import PROTOBUF_LIMIT, model_bytes

log = logging.getLogger("clipfast.export")

__all__ = ["FP32_OPS", "IO_DTYPES", "convert_to_fp16", "dtype_summary", "fp16_fed_nodes"]

FP32_OPS: tuple[str, ...] = (
    "LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Softmax", "ReduceMean", "Pow", "Sqrt", "ReduceL2", "ReduceSumSquare", "Div",
    "LpNormalization",
)
IO_DTYPES = ("fp32", "fp16")


def _dedupe_nodes(model: Any) -> int:
    """Drop repeated identical nodes; return how many were dropped.

    ONNX Runtime's converter names the Cast it puts in front of an fp32 operator after the input
    tensor, so two fp32 operators reading one fp16 tensor get two identical Cast nodes (same
    name, same output): an invalid graph. Identical copies are redundant; anything else with a
    repeated name is a real conflict.
    """
    seen: dict[str, bytes] = {}
    keep, dropped = [], 0
    for node in model.graph.node:
        key = node.SerializeToString()
        if node.name and node.name in seen:
            if seen[node.name] != key:
                raise ExportError(f"fp16 conversion produced two different nodes named "
                                  f"{node.name!r}")
            dropped += 1
            continue
        if node.name:
            seen[node.name] = key
        keep.append(node)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        names = set()
        infos = []
        for vi in model.graph.value_info:
            if vi.name not in names:
                names.add(vi.name)
                infos.append(vi)
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)
    return dropped


def _typed_by_path(path: Path) -> Any:
    """The graph at ``path`` with onnx's shape inference applied through files, which works past
    the 2 GiB protobuf limit (the typed copy sits beside ``path`` so its external data resolves)."""
    import os
    import tempfile

    import onnx

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".typed.onnx")
    os.close(fd)
    try:
        onnx.shape_inference.infer_shapes_path(str(path), tmp)
        return onnx.load(tmp)
    finally:
        os.remove(tmp)


def _add_symbolic_types(model: Any) -> None:
    """Add element types (not shapes) from ORT's symbolic shape inference to ``value_info``, so
    the converter knows which tensors around contrib operators are float."""
    from onnx import TensorProto, ValueInfoProto
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    try:
        inferred = SymbolicShapeInferenceHelper(model).infer_shapes(
            model, auto_merge=True, guess_output_rank=False)
    except Exception as e:  # noqa: BLE001 - partial typing still helps; say so
        log.debug("fp16: symbolic shape inference failed: %s", e)
        return
    if inferred is None:
        return
    known = {vi.name for vi in model.graph.value_info}
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if vi.name and vi.name not in known and t.elem_type != TensorProto.UNDEFINED:
            copy = ValueInfoProto()
            copy.CopyFrom(vi)
            copy.type.tensor_type.ClearField("shape")
            model.graph.value_info.append(copy)


def fp16_fed_nodes(model: Any, ops: tuple[str, ...] = FP32_OPS) -> list[str]:
    """Names of ``ops`` nodes whose data input (input 0) is typed float16: operators that were
    meant to stay fp32 but would run in fp16. Untyped inputs are not counted."""
    from onnx import TensorProto

    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.input)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Cast":
            types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
    return [n.name for n in g.node
            if n.op_type in ops and n.input and types.get(n.input[0]) == TensorProto.FLOAT16]


def dtype_summary(model: Any) -> dict[str, Any]:
    """What ran in which precision: fp16 / fp32 initializer counts, Cast count, fp32 op types."""
    from onnx import TensorProto

    init = Counter(t.data_type for t in model.graph.initializer)
    return {
        "fp16_initializers": init.get(TensorProto.FLOAT16, 0),
        "fp32_initializers": init.get(TensorProto.FLOAT, 0),
        "casts": sum(1 for n in model.graph.node if n.op_type == "Cast"),
    }


def convert_to_fp16(path: str | Path, out_path: str | Path, *, io: str = "fp32",
                    fp32_ops: tuple[str, ...] = FP32_OPS,
                    fp32_nodes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert the fp32 graph at ``path`` to fp16, write ``out_path``; return a report
    (``{"fp32_ops": [...], "io_dtype": ..., **dtype_summary}``).

    io: "fp32" keeps float inputs/outputs float32 (Casts inside the graph), "fp16" makes
    ``pixel_values`` and the embedding outputs float16 (integer inputs are never changed).
    """
    if io not in IO_DTYPES:
        raise ExportError(f"--io {io!r}: expected one of {IO_DTYPES}")
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from clipfast.export.fusion import quiet_ort_tools

    block = list(dict.fromkeys([*DEFAULT_OP_BLOCK_LIST, *fp32_ops]))
    try:
        proto = onnx.load(str(path))
        # Symbolic shape inference types the fused contrib operators, which onnx's own inference
        # cannot, but gives up on some plain graphs (SigLIP's pooling head), which onnx's types.
        contrib = any(n.domain == "com.microsoft" for n in proto.graph.node)
        typed = contrib
        if not contrib and model_bytes(proto) > PROTOBUF_LIMIT:
            # onnx's in-memory inference (what the converter runs) serialises the whole proto
            # and fails past 2 GiB (a 250k-token multilingual embedding); the path-based one
            # reads the external data itself.
            del proto  # one copy of a multi-GiB graph in memory at a time
            proto = _typed_by_path(Path(path))
            typed = True
        with quiet_ort_tools():
            if contrib:
                _add_symbolic_types(proto)
            proto = convert_float_to_float16(
                proto, keep_io_types=(io == "fp32"), op_block_list=block,
                node_block_list=list(fp32_nodes), disable_shape_infer=typed)
            model = OnnxModel(proto)
            # fp32 -> fp16 -> fp32 between two fp32 operators: keep the value fp32 (the residual
            # stream between SkipLayerNormalizations). Deliberately not OnnxModel's
            # remove_useless_cast_nodes: it misreads stale types and deletes the Casts in front
            # of fp32 operators, which then silently run in fp16.
            model.remove_cascaded_cast_nodes()
    except Exception as e:  # the converter and shape inference raise assorted types
        raise ExportError(f"fp16 conversion of {Path(path).name} failed: "
                          f"{type(e).__name__}: {e}") from e
    proto = model.model
    dropped = _dedupe_nodes(proto)
    if dropped:
        log.debug("fp16: dropped %d duplicate Cast nodes in %s", dropped, Path(path).name)
    # The converter appends its Casts at the end of the node list; ONNX requires topological order.
    model.topological_sort()
    unprotected = fp16_fed_nodes(proto, fp32_ops)
    if unprotected:
        raise ExportError(f"fp16 conversion of {Path(path).name}: {len(unprotected)} operator(s) "
                          f"meant to stay fp32 read fp16 inputs: {unprotected[:5]}")
    big = model_bytes(proto) > PROTOBUF_LIMIT
    if not big:  # the in-memory checker refuses protos over 2 GiB; ORT's load checks those
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise ExportError(f"fp16 graph of {Path(path).name} does not pass onnx.checker: "
                              f"{e}") from e
    model.save_model_to_file(str(out_path), use_external_data_format=big)
    present = sorted({n.op_type for n in proto.graph.node} & set(fp32_ops))
    return {"io_dtype": io, "fp32_ops": present, **dtype_summary(proto)}
