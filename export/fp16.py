"""fp32 ONNX tower -> fp16, keeping overflow-prone operators in fp32.

Uses ONNX Runtime's ``OnnxModel.convert_float_to_float16``: it runs symbolic shape inference
first, which knows the fused ``com.microsoft`` operators (Attention, SkipLayerNormalization,
BiasGelu) that onnx's own shape inference does not, and then removes the Cast pairs the
conversion leaves between two fp32 operators (so the residual stream between two fp32
SkipLayerNormalizations stays fp32 instead of being rounded to fp16 on the way).

Kept in fp32 (``FP32_OPS``): LayerNormalization and its fused forms, and the pieces of an
unfused LayerNorm / L2 norm (ReduceMean, Pow, Sqrt, ReduceL2, ReduceSumSquare, Div), Softmax:
their sums of squares and exponentials overflow fp16 (max 65504) on real activations.
MatMul / Conv / Attention / Gelu run in fp16.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from clipfast.errors import ExportError

log = logging.getLogger("clipfast.export")

__all__ = ["FP32_OPS", "IO_DTYPES", "convert_to_fp16", "dtype_summary"]

FP32_OPS: tuple[str, ...] = (
    "LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Softmax", "ReduceMean", "Pow", "Sqrt", "ReduceL2", "ReduceSumSquare", "Div",
    "LpNormalization",
)
IO_DTYPES = ("fp32", "fp16")
_PROTOBUF_LIMIT = 2**31 - 2**24


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
                    fp32_ops: tuple[str, ...] = FP32_OPS) -> dict[str, Any]:
    """Convert the fp32 graph at ``path`` to fp16, write ``out_path``; return a report
    (``{"fp32_ops": [...], "io_dtype": ..., **dtype_summary}``).

    io: "fp32" keeps float inputs/outputs float32 (Casts inside the graph), "fp16" makes
    ``pixel_values`` and the embedding outputs float16 (integer inputs are never changed).
    """
    if io not in IO_DTYPES:
        raise ExportError(f"--io {io!r}: expected one of {IO_DTYPES}")
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    block = list(dict.fromkeys([*DEFAULT_OP_BLOCK_LIST, *fp32_ops]))
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = OnnxModel(onnx.load(str(path)))
        # Symbolic shape inference types the fused contrib operators but gives up on some plain
        # graphs (SigLIP's pooling head); onnx's own inference types every standard graph.
        contrib = any(n.domain == "com.microsoft" for n in model.model.graph.node)
        model.convert_float_to_float16(use_symbolic_shape_infer=contrib,
                                       keep_io_types=(io == "fp32"), op_block_list=block)
    except Exception as e:  # the converter and shape inference raise assorted types
        raise ExportError(f"fp16 conversion of {Path(path).name} failed: "
                          f"{type(e).__name__}: {e}") from e
    finally:
        quiet.setLevel(level)
    proto = model.model
    dropped = _dedupe_nodes(proto)
    if dropped:
        log.debug("fp16: dropped %d duplicate Cast nodes in %s", dropped, Path(path).name)
    # The converter appends its Casts at the end of the node list; ONNX requires topological order.
    model.topological_sort()
    big = proto.ByteSize() > _PROTOBUF_LIMIT
    if not big:  # the in-memory checker refuses protos over 2 GiB; ORT's load checks those
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise ExportError(f"fp16 graph of {Path(path).name} does not pass onnx.checker: "
                              f"{e}") from e
    model.save_model_to_file(str(out_path), use_external_data_format=big)
    present = sorted({n.op_type for n in proto.graph.node} & set(fp32_ops))
    return {"io_dtype": io, "fp32_ops": present, **dtype_summary(proto)}
