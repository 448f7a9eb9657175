"""Facts about a tower graph that quantization needs: producers and consumers, the weight nodes
and which of them stay float (patch embedding, final projection), the block a node belongs to,
ONNX Runtime's pre-processing and the SkipLayerNormalization split, and what a quantized graph
holds (which nodes became int8, the largest int8 weight)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.errors import ExportError
from clipfast.export.onnx_files import PROTOBUF_LIMIT, graph_bytes, load_graph, load_header
from clipfast.export.quant_options import WEIGHT_OPS

log = logging.getLogger("clipfast.export")

__all__ = ["CHANNEL_PRESERVING", "GraphIndex", "int8_weight_abs_max", "layer_of",
           "model_inputs", "node_attr", "preprocess_graph", "quantized_nodes",
           "split_skip_layernorm", "to_numpy"]

# Ops that keep the channel (last) axis in place: outlier statistics and SmoothQuant scales pass
# through them unchanged.
CHANNEL_PRESERVING = {"Cast", "Identity"}
# Elementwise ops between an MLP's first and second matmul (bias, GELU variants).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
                "BiasGelu", "FastGelu", "QuickGelu", "Cast", "Identity", "Pow"}
_ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64}


def model_inputs(model) -> dict[str, Any]:
    """``{name: numpy dtype}`` of a ModelProto's real inputs (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        out[vi.name] = _ONNX_TO_NUMPY.get(vi.type.tensor_type.elem_type, np.float32)
    return out


class GraphIndex:
    """Producer/consumer maps and initializers of a ModelProto (read-only helper)."""

    def __init__(self, model):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = [vi.name for vi in g.input if vi.name not in self.inits]
        self.outputs = [vi.name for vi in g.output]
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.nodes = {n.name: n for n in g.node}

    def resolve(self, name: str) -> str:
        """The initializer behind ``name`` through Identity nodes (the TorchScript exporter
        shares identical parameters that way), or ``name`` itself."""
        p = self.producer.get(name)
        while name not in self.inits and p is not None and p.op_type == "Identity":
            name = p.input[0]
            p = self.producer.get(name)
        return name

    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def weight_nodes(self) -> list[Any]:
        """MatMul/Gemm/Conv/Attention nodes whose second input is a constant weight."""
        return [n for n in self.model.graph.node
                if n.op_type in WEIGHT_OPS and len(n.input) > 1 and self.is_const(n.input[1])]

    def patch_embedding(self) -> list[str]:
        """Conv nodes that read a graph input (through Cast/Identity only)."""
        out = []
        for n in self.model.graph.node:
            if n.op_type != "Conv":
                continue
            src, p = n.input[0], self.producer.get(n.input[0])
            while p is not None and p.op_type in CHANNEL_PRESERVING:
                src, p = p.input[0], self.producer.get(p.input[0])
            if src in self.inputs:
                out.append(n.name)
        return out

    def final_projections(self) -> list[str]:
        """For each graph output, the first weight MatMul/Gemm found walking back from it
        (none when a Conv or Attention comes first: ALIGN's image tower has no projection)."""
        found: list[str] = []
        for out in self.outputs:
            seen, stack = set(), [out]
            while stack:
                p = self.producer.get(stack.pop())
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                if p.op_type in ("MatMul", "Gemm") and len(p.input) > 1 and self.is_const(
                        p.input[1]):
                    if p.name not in found:
                        found.append(p.name)
                    continue
                if p.op_type in ("Conv", "Attention", "MatMul", "Gemm"):
                    continue
                stack.extend(i for i in p.input if i and not self.is_const(i))
        return found

    def downstream_weight_nodes(self, name: str) -> list[str]:
        """Weight MatMul/Gemm nodes reached from node ``name``'s output through elementwise ops
        only: the MLP's second matmul from its first (bias, GELU in between)."""
        start = self.nodes[name]
        found, seen = [], set()
        stack = list(start.output)
        while stack:
            for c in self.consumers.get(stack.pop(), []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in ("MatMul", "Gemm") and len(c.input) > 1 and self.is_const(
                        c.input[1]):
                    found.append(c.name)
                elif c.op_type in _ELEMENTWISE:
                    stack.extend(c.output)
        return found


def layer_of(name: str) -> str | None:
    """The block a node belongs to, from the exporter's module-path names
    ("/visual/transformer/resblocks.3/mlp/c_fc/MatMul" -> ".../resblocks.3"), or None."""
    from clipfast.export.families import layer_regex

    # block names come from the families: open_clip "resblocks.3", transformers "layers.3" /
    # "layer.3", timm "blocks.3"
    m = layer_regex().search(name)
    return name[:m.end()] if m else None


def to_numpy(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def node_attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@contextlib.contextmanager
def _scratch_cwd():
    """A temporary working directory for the block (removed after), the previous one restored.
    os.chdir is process-wide: the export's quantization step runs on one thread and passes
    absolute paths, so only ONNX Runtime's own relative writes move."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="clipfast-quant-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(before)


def preprocess_graph(fp32_path: Path, out: Path) -> str:
    """``quant_pre_process`` into ``out``; returns which steps ran.

    Symbolic shape inference is what types the outputs of fused com.microsoft ops (Attention,
    SkipLayerNormalization); it trips on the unfused nn.MultiheadAttention graph (a Reshape
    whose shape has unknown rank), where ONNX's own shape inference is enough.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = graph_bytes(fp32_path) > PROTOBUF_LIMIT
    kw = dict(save_as_external_data=big, all_tensors_to_one_file=True,
              external_data_location=out.name + ".data")
    fp32_path, out = Path(fp32_path).resolve(), Path(out).resolve()
    try:
        # When symbolic inference gives up, ONNX Runtime saves its partial graph as
        # sym_shape_infer_temp.onnx (+ a .data file) in the working directory: run it in a
        # scratch one so nothing lands in the user's folder.
        with contextlib.redirect_stdout(io.StringIO()), _scratch_cwd():
            quant_pre_process(str(fp32_path), str(out), **kw)
        return "symbolic shape inference + basic optimisation + onnx shape inference"
    except Exception as e:  # noqa: BLE001 - the symbolic inferencer raises bare assertions
        log.info("quantize: symbolic shape inference failed on %s (%s: %s); using ONNX shape "
                 "inference only", fp32_path.name, type(e).__name__, e)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True, **kw)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"int8: pre-processing {fp32_path.name} for quantization failed: "
                          f"{type(e).__name__}: {e}") from e
    return "basic optimisation + onnx shape inference (symbolic shape inference not applicable)"


def split_skip_layernorm(model) -> int:
    """Rewrite each com.microsoft SkipLayerNormalization of ``model`` (in place) as
    ``LayerNormalization(input + skip [+ bias])``; returns how many were rewritten.

    Nodes whose mean / inverse-std outputs are used are left alone; the optional sum output keeps
    its name (it is the residual stream the next block reads). Needs opset 17 (LayerNorm).
    """
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        return 0
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    nodes, count = [], 0
    for n in model.graph.node:
        stats_used = any(len(n.output) > k and n.output[k] and n.output[k] in used
                         for k in (1, 2))
        if n.op_type != "SkipLayerNormalization" or n.domain != "com.microsoft" or stats_used:
            nodes.append(n)
            continue
        eps = node_attr(n, "epsilon", 1e-12)
        x, skip, gamma = n.input[0], n.input[1], n.input[2]
        beta = n.input[3] if len(n.input) > 3 else ""
        bias = n.input[4] if len(n.input) > 4 else ""
        total = n.output[3] if len(n.output) > 3 and n.output[3] else f"{n.name}/sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{n.name}/biased"],
                                          name=f"{n.name}/AddBias"))
            x = f"{n.name}/biased"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{n.name}/Add"))
        nodes.append(helper.make_node("LayerNormalization",
                                      [total, gamma] + ([beta] if beta else []), [n.output[0]],
                                      name=f"{n.name}/LayerNormalization", axis=-1,
                                      epsilon=float(eps)))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def quantized_nodes(out_path: Path, candidates: dict[str, str]
                    ) -> tuple[dict[str, str], bool, list[str]]:
    """Inspect the int8 graph against the fp32 graph's weight nodes (``candidates``: ``{name:
    op type}``): ``({original node: op type} quantized, all weights per-channel, integer op
    types present)``."""
    model = load_header(out_path)
    g = GraphIndex(model)
    found: dict[str, str] = {}
    per_channel = True
    for n in model.graph.node:
        name = None
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1:
            p = g.producer.get(n.input[1])
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in g.inits:
                name = n.name
                scale = g.inits.get(p.input[1])
                if scale is not None and int(np.prod(scale.dims or [1])) <= 1:
                    per_channel = False
        elif n.op_type in ("MatMulInteger", "QAttention", "ConvInteger", "QLinearMatMul",
                           "QLinearConv", "DynamicQuantizeMatMul", "QGemm"):
            base = n.name[:-len("_quant")] if n.name.endswith("_quant") else n.name
            name = base if base in candidates else base[:-len("_MatMul")]
            # Per-channel weights carry one scale (or zero point) per output channel.
            scale_idx = {"QAttention": 4, "DynamicQuantizeMatMul": 2, "MatMulInteger": 3,
                         "ConvInteger": 3}.get(n.op_type)
            if scale_idx is not None and len(n.input) > scale_idx:
                scale = g.inits.get(n.input[scale_idx])
                if scale is not None and int(np.prod(scale.dims or [1])) <= 1:
                    per_channel = False
        if name is not None and name in candidates:
            found[name] = candidates[name]
    int_ops = sorted({n.op_type for n in model.graph.node if n.op_type in (
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
        "QAttention", "ConvInteger")})
    if model.graph.node and not found:
        per_channel = False
    return found, per_channel, int_ops


def int8_weight_abs_max(path: Path) -> int | None:
    """Largest |value| of the graph's int8 initializers (the quantized weights; symmetric zero
    points are 0), or None when it has none. At most SAFE_WEIGHT_MAX: the graph cannot saturate
    a CPU's int16 pair sums (INT8_FORMATS)."""
    import onnx

    model = load_graph(path)
    found = None
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            a = to_numpy(t)
            if a.size:
                m = int(np.abs(a.astype(np.int16)).max())
                found = m if found is None else max(found, m)
    return found

