"""ONNX graph files as the export writes them: the 2 GiB protobuf limit (bigger graphs keep their
weights in one external data file beside them), loading with or without the weights, sizes on
disk, and the operators outside the standard ONNX domain."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PROTOBUF_LIMIT", "contrib_ops", "graph_bytes", "load_graph", "load_header",
           "model_bytes", "payload_bytes", "save_graph"]

# 2 GiB protobuf limit (less a margin for the graph itself): bigger graphs are saved with
# external data.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_graph(path: Path):
    """The ModelProto of ``path``, weights included."""
    import onnx

    return onnx.load(str(path))


def load_header(path: Path):
    """The ModelProto of ``path`` without external weights (cheap for a multi-GiB graph)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def model_bytes(model) -> int:
    """Serialised size of an in-memory ModelProto. protobuf cannot even size a message past
    2 GiB (``ByteSize`` raises EncodeError, e.g. a 900k-token fp32 embedding in one tensor); the
    sum of its initializers' payloads stands in then, which is over the limit too."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except EncodeError:
        return payload_bytes(model)


def payload_bytes(model) -> int:
    """Bytes of the initializers' data of ``model`` (what dominates a tower's size)."""
    return sum(len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
               + 8 * (len(t.int64_data) + len(t.double_data)) for t in model.graph.initializer)


def save_graph(model, path: Path) -> None:
    """Save ``model`` at ``path``; over the protobuf limit its weights go to one
    ``path.name + ".data"`` file beside it."""
    import onnx

    big = model_bytes(model) > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)


def graph_bytes(path: Path) -> int:
    """Size of a graph on disk, external data files included."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    header = load_header(path)
    files = {ExternalDataInfo(t).location for t in header.graph.initializer
             if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).is_file())


def _graph_op_types(graph, standard: tuple[str, ...], out: set[str]) -> None:
    for node in graph.node:
        if node.domain not in standard:
            out.add(node.op_type)
        for attr in node.attribute:  # control-flow bodies (If / Loop / Scan)
            if attr.g is not None and len(attr.g.node):
                _graph_op_types(attr.g, standard, out)
            for sub in attr.graphs:
                _graph_op_types(sub, standard, out)


def contrib_ops(path: Path) -> list[str]:
    """Sorted op types of ``path`` outside the standard ONNX domain (ONNX Runtime's
    com.microsoft contrib operators: Attention, SkipLayerNormalization, QAttention ...), which
    TensorRT's ONNX parser rejects. The manifest records them per tower, so that the runtime
    knows without reading the graph."""
    from clipfast.backends.tensorrt.graph_ops import STANDARD_DOMAINS

    found: set[str] = set()
    _graph_op_types(load_header(path).graph, tuple(STANDARD_DOMAINS), found)
    return sorted(found)
