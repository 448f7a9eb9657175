"""int8 quantization of an exported tower (ONNX Runtime quantization), with a fidelity guard.

``quantize_tower`` turns one fp32 tower graph into an int8 graph with ONNX Runtime's own tools:
``quant_pre_process`` (shape inference + basic graph optimisation), then either
- ``static_qdq`` (the default): explicit QuantizeLinear/DequantizeLinear pairs (the portable
  form TensorRT and ONNX Runtime both consume), symmetric per-channel int8 weights, activations
  calibrated on the given feeds with percentile / entropy / min-max ranges; or
- ``dynamic`` (faster on CPU: ViT-B-32 image tower +2%, text tower +27%): symmetric
  per-channel int8 weights, activation ranges computed per batch at run time (MatMulInteger,
  QAttention on fused graphs); no calibration ranges are needed, but the calibration feeds'
  per-channel statistics still drive SmoothQuant and the guard.

Kept in float by default, because int8 is where their error comes from and they cost little:
the patch-embedding Conv (the Conv reading the pixels), LayerNormalization (also the fused
SkipLayerNormalization), Softmax (only weight MatMuls are quantized, so attention scores and
probabilities never get Q/DQ pairs) and the final projection (the last MatMul/Gemm before the
embedding output).

Trained CLIP towers carry a few residual-stream channels whose activations are 50-100x the rest;
one per-tensor activation scale then spends its 256 levels on those channels and rounds every
other channel to a handful of levels. ``guarded_quantize`` measures the result against the fp32
source and, below the gate, retries safer configurations: SmoothQuant (migrates the outlier scale
from LayerNorm outputs into the next weights, an exact fp32 rewrite), then the matmuls whose input
has the largest max/median channel ratio (from calibration statistics) kept in float, then every
matmul of those layers (MLP fc2, attention out-projection), then dynamic quantization; it returns
the first configuration that passes, with every attempt recorded, or raises ``FidelityError``
listing each attempt and why it failed.

ONNX Runtime's fused SkipLayerNormalization is split back into Add + LayerNormalization (see
``QuantOptions.split_skip_layernorm``): standard ONNX, and far faster on the CPU provider.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.cpu import host_cpu
from clipfast.errors import ExportError, FidelityError
from clipfast.fidelity import check_gates

log = logging.getLogger("clipfast.export")

__all__ = [
    "DEFAULT_EXCLUDED_OP_TYPES",
    "INT8_FORMATS",
    "OUTLIER_RATIO",
    "QuantOptions",
    "TowerCalibrationReader",
    "activation_channel_stats",
    "attempt_lines",
    "channel_ratio",
    "format_record",
    "guarded_quantize",
    "int8_weight_abs_max",
    "quantize_tower",
    "refusal_advice",
    "smooth_layernorm_outliers",
    "split_skip_layernorm",
]

METHODS = ("static_qdq", "dynamic")
# The int8 formats an export can choose (QuantOptions.int8_format names them). Which integers a
# CPU computes depends on the format (clipfast.cpu): ONNX Runtime's u8 x s8 GEMM on x86 without
# VNNI adds pairs of products into a saturating int16.
# - portable: u8 activations x 7-bit symmetric s8 weights (|w| <= 64). A pair of products stays
#   within 2 * 255 * 64 = 32640, so every CPU (AVX2, AVX-512, VNNI, AMX, aarch64) computes the
#   same integers: the default. Its cost, one weight bit: ViT-B-32 image tower centred error
#   0.045 -> 0.051 at the same speed (benchmarks/results/int8_cpu_sweep.md).
# - portable-u8: u8 activations x 8-bit u8 weights (zero point 128). u8 x u8 products are widened
#   to int16 before the multiply-add into int32, so no CPU saturates and no weight bit is lost,
#   but on VNNI its matrix multiplies run at about half the u8 x s8 rate (a 768x3072 MLP,
#   2 threads: 29.1 ms against 12.4 ms). The guard's second choice.
# - full-range: u8 activations x 8-bit s8 weights: exact only on CPUs with an int32 dot product
#   (VNNI, AMX, aarch64). The runtime runs it as float Q/DQ on other CPUs.
# - tensorrt: symmetric s8 activations and weights, zero point 0 (TensorRT's only int8).
# name -> (activation_type, reduce_range, weight_type)
INT8_FORMATS = {
    "portable": ("u8", True, "s8"),
    "portable-u8": ("u8", False, "u8"),
    "full-range": ("u8", False, "s8"),
    "tensorrt": ("s8", False, "s8"),
}
WEIGHT_TYPES = ("s8", "u8")
# Largest |weight| of a 7-bit symmetric quantization (ONNX Runtime's reduce_range range).
SAFE_WEIGHT_MAX = 64
CALIBRATIONS = ("percentile", "entropy", "minmax")
ACTIVATION_TYPES = ("u8", "s8")
# Ops with a weight that int8 quantization targets. Attention is ONNX Runtime's fused attention
# (com.microsoft): only the dynamic quantizer has an int8 form of it (QAttention).
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention")
DEFAULT_EXCLUDED_OP_TYPES = ("LayerNormalization", "SkipLayerNormalization", "Softmax")
# A MatMul input whose largest channel (max |x| over the calibration set) is this many times its
# median channel is an outlier input: one per-tensor int8 scale cannot cover both.
OUTLIER_RATIO = 20.0
_PROTOBUF_LIMIT = 2**31 - 2**24
_LAYERNORMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}
# Ops that keep the channel (last) axis in place: outlier statistics and SmoothQuant scales pass
# through them unchanged.
_CHANNEL_PRESERVING = {"Cast", "Identity"}
# Block index in exporter node names: open_clip "resblocks.3", transformers "layers.3"/"layer.3".
_LAYER_RE = re.compile(r"(?:resblocks|layers|layer|blocks|block)[./_]\d+(?=[./_]|$)")
# Elementwise ops between an MLP's first and second matmul (bias, GELU variants).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "BiasGelu",
                "FastGelu", "QuickGelu", "Cast", "Identity", "Pow"}


@dataclass
class QuantOptions:
    """How to quantize one tower (one dataclass, recorded in the manifest via ``to_dict``).

    method: "static_qdq" (explicit Q/DQ graph with activation ranges calibrated ahead of time:
        the default, and what TensorRT consumes) or "dynamic" (int8 weights stored ahead of
        time, activation ranges taken per batch at run time).
        Measured on ViT-B-32, 2 cores (benchmarks/results/int8_cpu_sweep.md): dynamic on the
        fused graph 70.9 img/s at batch 32 (2.46x eager open_clip in the same run), static QDQ
        61.9 (unfused graph) / 53.2 (fused graph, whose Attention has no static int8 form), at
        equal fidelity (centred error 0.047 / 0.047 / 0.045). The price of dynamic: an
        embedding depends slightly on the other images of its batch (max centred difference
        0.058 between an image alone and in a batch of 24; static: 0). The export's choice and
        its reasons: export/pipeline.py INT8_METHODS.
    calibration: "percentile" | "entropy" | "minmax" (static only).
    percentile: the percentile of |activation| kept in range (percentile calibration).
    activation_type: "u8" (asymmetric; the fast form on x86 CPUs) or "s8" (symmetric, what
        TensorRT requires).
    per_channel: one weight scale per output channel (else one per tensor).
    symmetric_weights: zero-point 0 for weights.
    reduce_range: 7-bit weights (|w| <= 64): the portable int8 format (INT8_FORMATS), exact on
        every CPU; off, x86 CPUs without VNNI saturate u8 x s8 products (clipfast.cpu).
    exclude_op_types: op types never quantized (also removed from the quantized op types).
    exclude_nodes: node names kept in float, on top of the automatic ones below.
    keep_patch_embedding_float / keep_final_projection_float: the Conv that reads the pixels and
        the last MatMul/Gemm before the embedding output stay float.
    smoothquant: rescale LayerNorm outputs by ``s = max|x|^a / max|W|^(1-a)`` per channel and
        fold ``s`` into the next weights (exact in fp32) before quantizing.
    quantize_outputs: also put Q/DQ on the outputs of quantized matmuls (static): int8 between
        ops, at the cost of a requantization per matmul; off, matmuls output float.
    split_skip_layernorm: rewrite ONNX Runtime's fused SkipLayerNormalization (com.microsoft)
        as Add + LayerNormalization (standard ONNX, which TensorRT also parses). On ONNX Runtime
        1.31's CPU provider the fused kernel is ~9x slower than the pair (11.5 ms vs 1.3 ms at
        (32, 50, 768)); a CPU session should also pass
        ``disabled_optimizers=["SkipLayerNormFusion"]`` or it fuses the pair again at load.
    calibration_batch: rows per calibration run (bounds memory, not results).
    """

    method: str = "static_qdq"
    calibration: str = "percentile"
    percentile: float = 99.99
    activation_type: str = "u8"
    per_channel: bool = True
    weight_type: str = "s8"
    symmetric_weights: bool = True
    reduce_range: bool = True
    exclude_op_types: tuple[str, ...] = DEFAULT_EXCLUDED_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    keep_patch_embedding_float: bool = True
    keep_final_projection_float: bool = True
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5
    quantize_outputs: bool = False
    split_skip_layernorm: bool = True
    calibration_batch: int = 8

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"int8 method {self.method!r}: expected one of {METHODS}")
        if self.calibration not in CALIBRATIONS:
            raise ExportError(f"int8 calibration {self.calibration!r}: expected one of "
                              f"{CALIBRATIONS}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ExportError(f"int8 weight_type {self.weight_type!r}: expected one of "
                              f"{WEIGHT_TYPES}")
        if self.weight_type == "u8" and self.activation_type == "s8":
            raise ExportError("int8 weight_type u8 needs u8 activations (ONNX Runtime has no "
                              "s8 x u8 kernels; TensorRT takes s8 weights only)")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ExportError(f"int8 activation_type {self.activation_type!r}: expected one of "
                              f"{ACTIVATION_TYPES}")
        if not 50.0 < self.percentile <= 100.0:
            raise ExportError(f"int8 percentile {self.percentile}: expected a value in (50, 100]")
        if not 0.0 < self.smoothquant_alpha < 1.0:
            raise ExportError(f"smoothquant_alpha {self.smoothquant_alpha}: expected 0 < a < 1")
        if self.calibration_batch < 1:
            raise ExportError(f"calibration_batch {self.calibration_batch}: must be at least 1")

    @classmethod
    def for_format(cls, int8_format: str, **changes: Any) -> QuantOptions:
        """Options of one of INT8_FORMATS ("portable", "full-range", "tensorrt")."""
        if int8_format not in INT8_FORMATS:
            raise ExportError(f"int8 format {int8_format!r}: expected one of "
                              f"{tuple(INT8_FORMATS)}")
        act, reduce, weights = INT8_FORMATS[int8_format]
        return cls(activation_type=act, reduce_range=reduce, weight_type=weights, **changes)

    @property
    def int8_format(self) -> str:
        """The INT8_FORMATS name of these options, or a description of another combination
        ("s8 activations, 7-bit s8 weights": TensorRT's int8, portable)."""
        key = (self.activation_type, self.reduce_range, self.weight_type)
        for name, fmt in INT8_FORMATS.items():
            if key == fmt:
                return name
        bits = 7 if self.reduce_range else 8
        return f"{self.activation_type} activations, {bits}-bit {self.weight_type} weights"

    @property
    def saturation_safe(self) -> bool:
        """Whether every CPU computes the same integers: 7-bit s8 weights, or u8 weights (s8
        activations run as u8 + 128 on x86, so the activation type does not matter)."""
        return self.reduce_range or self.weight_type == "u8"

    def portable_variants(self) -> list[QuantOptions]:
        """Saturation-safe versions of these options, cheapest first: 7-bit weights, then (not
        for TensorRT, which takes s8 weights only) 8-bit u8 weights."""
        out = [self.replace(reduce_range=True, weight_type="s8")]
        if self.activation_type == "u8":
            out.append(self.replace(reduce_range=False, weight_type="u8"))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude_op_types"] = list(self.exclude_op_types)
        d["exclude_nodes"] = list(self.exclude_nodes)
        return d

    def replace(self, **changes: Any) -> QuantOptions:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for logs and error messages."""
        parts = [self.method, f"{self.int8_format} format"]
        if self.method == "static_qdq":
            cal = (f"percentile {self.percentile}" if self.calibration == "percentile"
                   else self.calibration)
            parts += [f"{self.activation_type} activations", cal]
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.smoothquant:
            parts.append(f"smoothquant a={self.smoothquant_alpha}")
        if self.exclude_nodes:
            parts.append(f"+{len(self.exclude_nodes)} node(s) kept float")
        return ", ".join(parts)


# -- calibration feeds ------------------------------------------------------------------------

_ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64}


def _model_inputs(model) -> dict[str, Any]:
    """``{name: numpy dtype}`` of a ModelProto's real inputs (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        out[vi.name] = _ONNX_TO_NUMPY.get(vi.type.tensor_type.elem_type, np.float32)
    return out


def _check_feeds(calibration: list[dict[str, np.ndarray]], inputs: dict[str, Any],
                 what: str) -> list[dict[str, np.ndarray]]:
    """Validate calibration feeds against the graph inputs; cast to the inputs' dtypes."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        size = len(calibration) if hasattr(calibration, "__len__") else "?"
        raise ExportError(f"int8 calibration for {what}: expected a non-empty list of feed dicts "
                          f"({', '.join(inputs)}), got {type(calibration).__name__} of length "
                          f"{size}")
    checked = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, dict):
            raise ExportError(f"int8 calibration for {what}: item {i} is a "
                              f"{type(feed).__name__}, expected a dict of input name -> array")
        missing = [n for n in inputs if n not in feed]
        extra = [n for n in feed if n not in inputs]
        if missing or extra:
            raise ExportError(
                f"int8 calibration for {what}: item {i} has inputs {sorted(feed)}, the graph "
                f"takes {list(inputs)} (missing {missing}, unexpected {extra})")
        arrays = {n: np.ascontiguousarray(feed[n], dtype=dt) for n, dt in inputs.items()}
        rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(rows) != 1 or 0 in rows:
            raise ExportError(f"int8 calibration for {what}: item {i} has inputs with batch sizes "
                              f"{sorted(rows)}; every input needs the same, non-zero batch")
        checked.append(arrays)
    return checked


def _calibration_rows(feeds: list[dict[str, np.ndarray]]) -> int:
    return sum(next(iter(f.values())).shape[0] for f in feeds)


class TowerCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over feed dicts, re-batched to ``batch`` rows.

    feeds: ``[{"pixel_values": float32 (n, 3, H, W)}, ...]`` for an image tower,
    ``[{"input_ids": int32 (n, L)[, "attention_mask": ...]}, ...]`` for a text tower.
    ``limit`` ends a chunk after that many batches, or earlier where the batch shape changes (so
    collection runs in memory-bounded chunks of stackable outputs); ``next_chunk`` starts the next
    chunk, ``rewind`` starts over.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], batch: int = 8,
                 limit: int | None = None):
        self.batches: list[dict[str, np.ndarray]] = []
        for feed in feeds:
            n = next(iter(feed.values())).shape[0]
            for s in range(0, n, batch):
                self.batches.append({k: v[s:s + batch] for k, v in feed.items()})
        self.limit = limit
        self._pos = 0
        self._served = 0
        self._shape: tuple = ()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.batches):
            return None
        item = self.batches[self._pos]
        if self.limit is not None:
            # A chunk holds batches of one shape: ONNX Runtime's histogram calibrators stack the
            # outputs of one collection call into a single array.
            if self._served >= self.limit or (self._served and _shapes(item) != self._shape):
                return None
            self._shape = _shapes(item)
        self._pos += 1
        self._served += 1
        return item

    def next_chunk(self) -> None:
        """Allow ``limit`` more batches (chunked collection)."""
        self._served = 0

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self.batches)

    def rewind(self) -> None:
        self._pos = 0
        self._served = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _shapes(feed: dict[str, np.ndarray]) -> tuple:
    return tuple(v.shape for v in feed.values())


def _as_ort_reader(reader: TowerCalibrationReader):
    """Wrap in a subclass of onnxruntime's abstract reader (its quantizers check the type)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def __len__(self):
            return len(reader)

    return _Reader()


# -- graph facts ------------------------------------------------------------------------------


class _Graph:
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
            while p is not None and p.op_type in _CHANNEL_PRESERVING:
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


def _graph_bytes(path: Path) -> int:
    """Size of a graph on disk, external data files included."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    header = _load_header(path)
    files = {ExternalDataInfo(t).location for t in header.graph.initializer
             if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).is_file())


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _save(model, path: Path) -> None:
    import onnx

    big = model.ByteSize() > _PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)


def _preprocess(fp32_path: Path, out: Path) -> str:
    """``quant_pre_process`` into ``out``; returns which steps ran.

    Symbolic shape inference is what types the outputs of fused com.microsoft ops (Attention,
    SkipLayerNormalization); it trips on the unfused nn.MultiheadAttention graph (a Reshape
    whose shape has unknown rank), where ONNX's own shape inference is enough.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = _graph_bytes(fp32_path) > _PROTOBUF_LIMIT
    kw = dict(save_as_external_data=big, all_tensors_to_one_file=True,
              external_data_location=out.name + ".data")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
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
        eps = _attr(n, "epsilon", 1e-12)
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


# -- activation statistics and SmoothQuant ----------------------------------------------------


def activation_channel_stats(model_path: Path, tensors: Iterable[str],
                             feeds: list[dict[str, np.ndarray]], batch: int = 8,
                             workdir: Path | None = None) -> dict[str, np.ndarray]:
    """Per-channel ``max |x|`` over the calibration feeds for each named float tensor.

    The channel is the last axis (the reduction axis of the MatMul that reads the tensor).
    Returns ``{name: float32 (channels,)}``. Runs the fp32 graph once with those tensors added as
    outputs (ONNX Runtime, basic optimisations, so the named tensors survive).
    """
    import onnx
    import onnxruntime as ort

    tensors = list(dict.fromkeys(tensors))
    model = _load(model_path)
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT,
                                                                         None))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "stats.onnx"
        _save(model, path)
        del model
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        stats: dict[str, np.ndarray] = {}
        for b in TowerCalibrationReader(feeds, batch):
            for name, value in zip(names, sess.run(None, b)):
                if name not in tensors or value.ndim == 0:
                    continue
                v = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
                stats[name] = v if name not in stats else np.maximum(stats[name], v)
    return stats


def channel_ratio(absmax: np.ndarray) -> float:
    """max / median of per-channel ``max |x|``: about 2-5 for well-behaved activations."""
    med = float(np.median(absmax))
    return float(absmax.max() / med) if med > 0 else math.inf if absmax.max() > 0 else 1.0


def _to_numpy(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _set_node_param(model, node, index: int, value: np.ndarray, uses: Counter) -> None:
    """Give ``node`` its own initializer ``value`` at input ``index`` (exporters share identical
    constants between nodes: LayerNorms initialised to ones share one gamma)."""
    from onnx import numpy_helper

    name = node.input[index]
    for i, t in enumerate(model.graph.initializer):
        if t.name == name and uses[name] == 1:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    # Shared, or reached through an Identity: this node gets a copy of its own.
    new = f"{node.name}.smoothquant.{index}"
    model.graph.initializer.append(numpy_helper.from_array(value, new))
    node.input[index] = new
    uses[name] -= 1


def _smoothable_groups(g: _Graph) -> list[tuple[Any, list[tuple[Any, str]]]]:
    """LayerNorms whose normalised output feeds only weight MatMul/Gemm/Attention nodes (through
    Cast/Identity or last-axis-preserving Transposes; Shape reads are harmless), with unshared
    weights.

    Returns ``[(layernorm_node, [(consumer_node, tensor_name_at_consumer), ...]), ...]``.
    """
    uses = Counter(i for n in g.model.graph.node for i in n.input if i)
    groups = []
    for ln in g.model.graph.node:
        if ln.op_type not in _LAYERNORMS:
            continue
        gi, bi = _LAYERNORMS[ln.op_type]
        params = [ln.input[gi]] + ([ln.input[bi]] if len(ln.input) > bi and ln.input[bi] else [])
        if any(g.resolve(p) not in g.inits for p in params):
            continue
        consumers, ok, stack = [], True, [ln.output[0]]
        while stack and ok:
            tensor = stack.pop()
            if tensor in g.outputs:
                ok = False
                break
            for c in g.consumers.get(tensor, []):
                if c.op_type == "Shape":
                    continue
                if c.op_type in _CHANNEL_PRESERVING or (c.op_type == "Transpose"
                                                        and _keeps_last_axis(c)):
                    stack.append(c.output[0])
                elif (c.op_type in ("MatMul", "Gemm", "Attention") and c.input[0] == tensor
                      and g.resolve(c.input[1]) in g.inits and uses[c.input[1]] == 1
                      and not (c.op_type == "Gemm" and _attr(c, "transA", 0))):
                    consumers.append((c, tensor))
                else:
                    ok = False
                    break
        if ok and consumers:
            groups.append((ln, consumers))
    return groups


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _keeps_last_axis(node) -> bool:
    perm = _attr(node, "perm", None)
    return perm is not None and list(perm)[-1] == len(perm) - 1


def smooth_layernorm_outliers(model, stats: dict[str, np.ndarray], alpha: float = 0.5
                              ) -> list[str]:
    """SmoothQuant, folded (in place on ``model``): for each LayerNorm that feeds only weight
    matmuls, ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``; gamma and beta are divided by ``s``
    and weight input-row ``j`` multiplied by it, so the fp32 function is unchanged while the
    activation range flattens. Returns the names of the LayerNorms smoothed.

    stats: per-channel ``max |x|`` of each consumer's input tensor (``activation_channel_stats``).
    """
    g = _Graph(model)
    uses = Counter(i for n in model.graph.node for i in n.input if i)
    done = []
    for ln, consumers in _smoothable_groups(g):
        act = None
        for _, tensor in consumers:
            if tensor in stats:
                act = stats[tensor] if act is None else np.maximum(act, stats[tensor])
        if act is None:
            continue
        weights = []
        for c, _ in consumers:
            w = _to_numpy(g.inits[g.resolve(c.input[1])])
            # Gemm with transB stores (N, K): the input channel is axis 1.
            row_axis = 1 if c.op_type == "Gemm" and _attr(c, "transB", 0) else 0
            weights.append((c, w, row_axis))
        if any(w.ndim != 2 or w.shape[ax] != act.shape[0] for _, w, ax in weights):
            continue
        wmax = np.max([np.abs(w).max(axis=1 - ax) for _, w, ax in weights], axis=0)
        s = np.power(np.maximum(act, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1 - alpha)
        s = np.where((act > 0) & (wmax > 0), s, 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float64)
        gi, bi = _LAYERNORMS[ln.op_type]
        for idx in (gi, bi):
            if len(ln.input) > idx and ln.input[idx]:
                param = _to_numpy(g.inits[g.resolve(ln.input[idx])])
                _set_node_param(model, ln, idx, (param / s).astype(param.dtype), uses)
        for c, w, ax in weights:
            shape = (-1, 1) if ax == 0 else (1, -1)
            _set_node_param(model, c, 1, (w * s.reshape(shape)).astype(w.dtype), uses)
        done.append(ln.name)
    return done


# -- quantization -----------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A pre-processed fp32 graph plus what the guard learns about it (reused across attempts)."""

    path: Path
    preprocess: str
    feeds: list[dict[str, np.ndarray]]
    workdir: Path
    candidates: dict[str, str] = field(default_factory=dict)  # weight node name -> op type
    inputs_of: dict[str, str] = field(default_factory=dict)  # weight node -> activation input
    patch_embedding: list[str] = field(default_factory=list)
    final_projection: list[str] = field(default_factory=list)
    stats: dict[str, np.ndarray] | None = None
    smoothed: dict[float, tuple[Path, list[str]]] = field(default_factory=dict)
    calib_cache: dict[tuple, Path] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why the guard keeps a node float


def _prepare(fp32_path: Path, feeds: list[dict[str, np.ndarray]], workdir: Path,
             split_skip: bool = True) -> _Prepared:
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise ExportError(f"int8: fp32 graph {str(fp32_path)!r} not found")
    import onnx

    header = onnx.load(str(fp32_path), load_external_data=False)
    feeds = _check_feeds(feeds, _model_inputs(header), fp32_path.name)
    del header
    pre = workdir / "preprocessed.onnx"
    how = _preprocess(fp32_path, pre)
    if split_skip:
        model = _load(pre)
        if split_skip_layernorm(model):
            how += "; SkipLayerNormalization split into Add + LayerNormalization"
            _save(model, pre)
        del model
    model = onnx.load(str(pre), load_external_data=False)
    g = _Graph(model)
    prep = _Prepared(path=pre, preprocess=how, feeds=feeds, workdir=workdir)
    for n in g.weight_nodes():
        prep.candidates[n.name] = n.op_type
        prep.inputs_of[n.name] = n.input[0]
    prep.patch_embedding = g.patch_embedding()
    prep.final_projection = g.final_projections()
    return prep


def _ensure_stats(prep: _Prepared, batch: int) -> dict[str, np.ndarray]:
    if prep.stats is None:
        tensors = [t for n, t in prep.inputs_of.items() if prep.candidates[n] != "Conv"]
        prep.stats = activation_channel_stats(prep.path, tensors, prep.feeds, batch,
                                              prep.workdir)
    return prep.stats


def _smoothed_model(prep: _Prepared, alpha: float, batch: int) -> tuple[Path, list[str]]:
    if alpha not in prep.smoothed:
        stats = _ensure_stats(prep, batch)
        model = _load(prep.path)
        done = smooth_layernorm_outliers(model, stats, alpha)
        path = prep.workdir / f"smoothed_{len(prep.smoothed)}.onnx"
        _save(model, path)
        prep.smoothed[alpha] = (path, done)
    return prep.smoothed[alpha]


def _excluded(prep: _Prepared, options: QuantOptions) -> dict[str, str]:
    """``{node name: reason}`` of the weight nodes kept in float."""
    out: dict[str, str] = {}
    if options.keep_patch_embedding_float:
        out.update(dict.fromkeys(prep.patch_embedding, "patch embedding"))
    if options.keep_final_projection_float:
        out.update(dict.fromkeys(prep.final_projection, "final projection"))
    for name, op in prep.candidates.items():
        if op in options.exclude_op_types:
            out.setdefault(name, f"op type {op} excluded")
    for name in options.exclude_nodes:
        out.setdefault(name, prep.reasons.get(name, "excluded by configuration"))
    return out


def _calibration_method(options: QuantOptions):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[options.calibration]


def _calibrate(prep: _Prepared, model_path: Path, options: QuantOptions, op_types: list[str],
               key: tuple) -> Path:
    """Activation ranges from ONNX Runtime's calibrator, collected in memory-bounded chunks and
    saved as a calibration cache (reused by attempts that only change exclusions)."""
    if key in prep.calib_cache:
        return prep.calib_cache[key]
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    method = _calibration_method(options)
    symmetric = options.activation_type == "s8"
    extra: dict[str, Any] = {"symmetric": symmetric}
    if options.calibration == "percentile":
        extra.update(percentile=options.percentile, num_bins=2048)
    big = _graph_bytes(model_path) > _PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=prep.workdir) as tmp, \
            contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(
            model_path, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method, use_external_data_format=big, extra_options=extra)
        # Histogram calibrators keep every intermediate output of one collect_data call (for
        # ViT-L, ~1.5 GB per batch of 8): feed them one batch per call; ranges and histograms
        # merge across calls.
        reader = TowerCalibrationReader(prep.feeds, options.calibration_batch, limit=1)
        ort_reader = _as_ort_reader(reader)
        while not reader.exhausted:
            reader.next_chunk()
            calibrator.collect_data(ort_reader)
        ranges = calibrator.compute_data()
        del calibrator
    cache = prep.workdir / f"calibration_{len(prep.calib_cache)}.json"
    save_tensors_data(ranges, cache)
    prep.calib_cache[key] = cache
    return cache


def _weight_qtype(options: QuantOptions):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if options.weight_type == "s8" else QuantType.QUInt8


def _run_quantizer(prep: _Prepared, out_path: Path, options: QuantOptions
                   ) -> tuple[dict[str, str], list[str], list[str]]:
    """Quantize into ``out_path``; returns (excluded nodes, op types quantized, smoothed LNs)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    model_path, smoothed = prep.path, []
    if options.smoothquant:
        model_path, smoothed = _smoothed_model(prep, options.smoothquant_alpha,
                                               options.calibration_batch)
    excluded = _excluded(prep, options)
    op_types = [t for t in WEIGHT_OPS if t not in options.exclude_op_types]
    if options.method == "static_qdq":
        # No static QDQ form of the fused Attention op: it stays float in a static graph.
        op_types = [t for t in op_types if t != "Attention"]
    targets = [n for n, op in prep.candidates.items() if op in op_types and n not in excluded]
    if not targets:
        # (ONNX Runtime reads an empty nodes_to_quantize as "every node".)
        raise ExportError(f"int8 ({options.describe()}): every weight node of the graph is "
                          "excluded; nothing is left to quantize")
    big = _graph_bytes(model_path) > _PROTOBUF_LIMIT
    extra = {
        "WeightSymmetric": options.symmetric_weights,
        # Only matmuls with a constant weight: the attention QK^T and probs@V products (and
        # so the Softmax between them) keep float inputs and outputs.
        "MatMulConstBOnly": True,
    }
    for p in out_path.parent.glob(out_path.name + "*"):
        p.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        if options.method == "dynamic":
            # The dynamic quantizer first rewrites Gemm as MatMul "<name>_MatMul" + Add.
            names = [*excluded, *(f"{n}_MatMul" for n in excluded
                                  if prep.candidates.get(n) == "Gemm")]
            quantize_dynamic(
                model_path, out_path, op_types_to_quantize=op_types,
                per_channel=options.per_channel, reduce_range=options.reduce_range,
                weight_type=_weight_qtype(options), nodes_to_exclude=names,
                use_external_data_format=big, extra_options=extra)
        else:
            act = QuantType.QUInt8 if options.activation_type == "u8" else QuantType.QInt8
            extra["ActivationSymmetric"] = options.activation_type == "s8"
            key = (str(model_path), options.calibration, options.percentile,
                   options.activation_type, tuple(op_types))
            cache = _calibrate(prep, model_path, options, op_types, key)
            if not options.quantize_outputs:
                # Float outputs: ONNX Runtime runs DQ -> MatMul as MatMulIntegerToFloat, with
                # no requantization of a tensor that the next (float) op dequantizes anyway.
                extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
            # nodes_to_quantize: only weight nodes. ONNX Runtime's QDQ MatMul quantizer ignores
            # MatMulConstBOnly and would put Q/DQ pairs around the attention products, and so
            # around the Softmax between them.
            quantize_static(
                model_path, out_path, None, quant_format=QuantFormat.QDQ,
                nodes_to_quantize=targets,
                op_types_to_quantize=op_types, per_channel=options.per_channel,
                reduce_range=options.reduce_range, activation_type=act,
                weight_type=_weight_qtype(options), nodes_to_exclude=list(excluded),
                use_external_data_format=big, extra_options=extra,
                calibrate_method=_calibration_method(options), calibration_cache_path=cache)
    return excluded, op_types, smoothed


def _quantized_nodes(out_path: Path, prep: _Prepared) -> tuple[dict[str, str], bool, list[str]]:
    """Inspect the int8 graph: ``({original node: op type} quantized, all weights per-channel,
    integer op types present)``."""
    import onnx

    model = onnx.load(str(out_path), load_external_data=False)
    g = _Graph(model)
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
            name = base if base in prep.candidates else base[:-len("_MatMul")]
            # Per-channel weights carry one scale (or zero point) per output channel.
            scale_idx = {"QAttention": 4, "DynamicQuantizeMatMul": 2, "MatMulInteger": 3,
                         "ConvInteger": 3}.get(n.op_type)
            if scale_idx is not None and len(n.input) > scale_idx:
                scale = g.inits.get(n.input[scale_idx])
                if scale is not None and int(np.prod(scale.dims or [1])) <= 1:
                    per_channel = False
        if name is not None and name in prep.candidates:
            found[name] = prep.candidates[name]
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

    model = onnx.load(str(path))
    found = None
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            a = _to_numpy(t)
            if a.size:
                m = int(np.abs(a.astype(np.int16)).max())
                found = m if found is None else max(found, m)
    return found


def format_record(options: QuantOptions, weight_abs_max: int | None) -> dict[str, Any]:
    """The manifest's record of the int8 format: what it is, whether every CPU computes the
    same integers (checked on the written weights, not only assumed from the options), and why
    it was chosen."""
    safe = options.weight_type == "u8" or weight_abs_max is None \
        or weight_abs_max <= SAFE_WEIGHT_MAX
    if options.int8_format == "portable":
        why = ("default: 7-bit weights keep u8 x s8 pair sums within int16 (2 * 255 * 64), so "
               "CPUs without VNNI (AVX2, AVX-512) compute what VNNI, AMX and aarch64 compute")
    elif options.weight_type == "u8":
        why = ("8-bit u8 weights: u8 x u8 products are widened before accumulating, so every "
               "CPU computes the same integers without losing a weight bit (slower on VNNI)")
    elif options.activation_type == "s8":
        why = ("TensorRT: symmetric s8 activations and weights with zero point 0, the only int8 "
               "TensorRT accepts")
    else:
        why = ("requested: full-range 8-bit weights, exact on CPUs with an int32 dot product "
               "(VNNI, AMX, aarch64); other x86 CPUs run the graph as float Q/DQ")
    return {"name": options.int8_format,
            "activations": "uint8" if options.activation_type == "u8" else "int8",
            "weights": "uint8" if options.weight_type == "u8" else "int8",
            "weight_bits": 7 if options.reduce_range else 8,
            "weight_abs_max": weight_abs_max, "saturation_safe": safe, "why": why}


def _quantize(prep: _Prepared, out_path: Path, options: QuantOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    excluded, op_types, smoothed = _run_quantizer(prep, out_path, options)
    quantized, per_channel, int_ops = _quantized_nodes(out_path, prep)
    float_weights = sorted(set(prep.candidates) - set(quantized))
    not_quantizable = {n: "no static QDQ form of fused Attention" for n in float_weights
                       if n not in excluded and prep.candidates[n] == "Attention"
                       and options.method == "static_qdq"}
    counts = Counter(quantized.values())
    return {
        "method": options.method,
        "format": "QDQ" if options.method == "static_qdq" else "integer ops (dynamic)",
        "activation_dtype": ("uint8" if options.activation_type == "u8" else "int8")
        if options.method == "static_qdq" else "uint8 (per batch, at run time)",
        "weight_dtype": "uint8" if options.weight_type == "u8" else "int8",
        "per_channel": bool(options.per_channel and per_channel),
        "symmetric_weights": options.symmetric_weights,
        "reduce_range": options.reduce_range,
        "int8_format": format_record(options, int8_weight_abs_max(out_path)),
        "calibration": {
            "method": options.calibration if options.method == "static_qdq" else None,
            "percentile": options.percentile
            if options.method == "static_qdq" and options.calibration == "percentile" else None,
            "rows": _calibration_rows(prep.feeds),
            "feeds": len(prep.feeds),
        },
        "smoothquant": {"alpha": options.smoothquant_alpha, "layernorms": len(smoothed)}
        if options.smoothquant else None,
        "preprocess": prep.preprocess,
        "op_types_quantized": op_types,
        "excluded_op_types": list(options.exclude_op_types),
        "excluded_nodes": excluded,
        "not_quantizable": not_quantizable,
        "quantized": {t: counts.get(t, 0) for t in WEIGHT_OPS},
        "quantized_total": len(quantized),
        "float_weight_nodes": len(float_weights),
        "integer_ops": int_ops,
        "options": options.to_dict(),
        "bytes": _graph_bytes(out_path),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def quantize_tower(fp32_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]],
                   *, options: QuantOptions | None = None) -> dict[str, Any]:
    """Quantize one fp32 tower graph to int8 at ``out_path``; return the report.

    calibration: feed dicts for the tower's inputs, e.g. ``[{"pixel_values": float32 (n, 3, H,
    W)}]`` or ``[{"input_ids": int32 (n, L)}]`` (preprocessed exactly as at run time).
    The report gives the method, activation dtype, per-channel flag, the float-kept nodes with the
    reason for each, the excluded op types, counts of quantized MatMul/Gemm/Conv/Attention, and the
    calibration size.
    """
    options = options or QuantOptions()
    options.validate()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant.", dir=out_path.parent) as tmp:
        prep = _prepare(Path(fp32_path), calibration, Path(tmp), options.split_skip_layernorm)
        report = _quantize(prep, out_path, options)
        if options.smoothquant or prep.stats is not None:
            report["outlier_inputs"] = _outlier_summary(prep)
    return report


# -- the guard --------------------------------------------------------------------------------


def _outlier_summary(prep: _Prepared, top: int = 8) -> list[dict[str, Any]]:
    stats = prep.stats or {}
    rows = [{"node": n, "op_type": prep.candidates[n],
             "ratio": round(channel_ratio(stats[t]), 1)}
            for n, t in prep.inputs_of.items() if t in stats]
    rows.sort(key=lambda r: -r["ratio"])
    return rows[:top]


def _outlier_nodes(prep: _Prepared, threshold: float = OUTLIER_RATIO,
                  batch: int = 8) -> list[str]:
    """Weight nodes whose input's max/median channel ratio is at least ``threshold``; when none
    is, the top tenth by ratio (something must change between attempts)."""
    stats = _ensure_stats(prep, batch)
    ratios = {n: channel_ratio(stats[t]) for n, t in prep.inputs_of.items() if t in stats}
    ranked = sorted(ratios, key=lambda n: -ratios[n])
    hits = [n for n in ranked if ratios[n] >= threshold]
    return hits or ranked[:max(1, math.ceil(len(ranked) / 10))]


def _layer_of(name: str) -> str | None:
    """The block a node belongs to, from the exporter's module-path names
    ("/visual/transformer/resblocks.3/mlp/c_fc/MatMul" -> ".../resblocks.3"), or None."""
    m = _LAYER_RE.search(name)
    return name[:m.end()] if m else None


def _layer_nodes(prep: _Prepared, graph: _Graph, nodes: list[str]) -> list[str]:
    """Every weight node in the layers holding ``nodes``: same block by name, plus the weight
    matmuls straight after them (MLP fc2 after fc1, out-projection after a fused Attention)."""
    layers = {_layer_of(n) for n in nodes} - {None}
    same = [n for n in prep.candidates if _layer_of(n) in layers]
    after = [d for n in nodes for d in graph.downstream_weight_nodes(n)]
    return [n for n in dict.fromkeys([*same, *after]) if n not in nodes]


def _attempt_plan(prep: _Prepared, options: QuantOptions) -> Iterable[tuple[str, QuantOptions]]:
    """The requested configuration, then progressively safer ones (lazily: the statistics are
    computed only once the first attempt has failed)."""
    yield "requested configuration", options
    seen = {_config_key(options)}

    def fresh(o: QuantOptions) -> bool:
        k = _config_key(o)
        if k in seen:
            return False
        seen.add(k)
        return True

    # The portable formats next: a full-range one can miss the gate for the CPU's sake alone
    # (x86 without VNNI), and 8-bit u8 weights recover the bit 7-bit weights lose. Every later
    # attempt builds on the last (most accurate) of them.
    for variant in options.portable_variants():
        if fresh(variant):
            yield (f"portable format {variant.int8_format}: the same integers on every CPU "
                   f"({host_cpu().isa} here)"), variant
        options = variant

    sq = options.replace(smoothquant=True)
    if fresh(sq):
        yield "SmoothQuant: outlier scale folded from LayerNorm outputs into the weights", sq
    stats = _ensure_stats(prep, options.calibration_batch)
    outliers = _outlier_nodes(prep, batch=options.calibration_batch)
    for n in outliers:
        ratio = channel_ratio(stats[prep.inputs_of[n]])
        prep.reasons[n] = f"outlier input channels (max/median {ratio:.0f})"
    # Mixed precision starts again from the requested configuration: SmoothQuant inflates the
    # weight ranges of the layers that stay int8, and keeping the outlier layers float is the
    # direct fix.
    keep = tuple(dict.fromkeys([*options.exclude_nodes, *outliers]))
    o2 = options.replace(exclude_nodes=keep)
    if fresh(o2):
        yield (f"mixed precision: {len(outliers)} matmul(s) whose input has outlier channels "
               "kept float"), o2
    graph = _Graph(_load_header(prep.path))
    layer = _layer_nodes(prep, graph, outliers)
    for n in layer:
        prep.reasons.setdefault(n, "in a layer with outlier inputs (MLP fc2 / out-projection)")
    o3 = options.replace(exclude_nodes=tuple(dict.fromkeys([*keep, *layer])))
    if fresh(o3):
        n_layers = len({_layer_of(n) for n in outliers} - {None})
        yield (f"mixed precision: also the other {len(layer)} matmul(s) (MLP fc2, "
               f"out-projection) of the {n_layers or 'outlier'} layer(s) kept float"), o3
    if options.method == "static_qdq":
        o4 = o3.replace(method="dynamic")
        why = "dynamic int8 (activation ranges per batch instead of calibrated ones)"
    else:
        o4 = o3.replace(method="static_qdq")
        why = "static int8 (calibrated, percentile-clipped activation ranges instead of per-batch)"
    if fresh(o4):
        yield why, o4


def _load_header(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _config_key(o: QuantOptions) -> tuple:
    d = o.to_dict()
    d["exclude_nodes"] = sorted(d["exclude_nodes"])
    return tuple(sorted((k, str(v)) for k, v in d.items()))


def guarded_quantize(fp32_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]],
                     measure: Callable[[Path], dict[str, Any]], gates: dict[str, Any],
                     options: QuantOptions | None = None) -> dict[str, Any]:
    """Quantize, measure, and fall back to safer configurations until ``gates`` pass.

    measure(path) returns the fidelity figures of the int8 graph at ``path`` against the fp32
    PyTorch source (keys as in ``clipfast.fidelity.check_gates``). Returns the report of the first
    configuration that passes, with ``attempts``: ``[{attempt, why, config, figures, failures,
    passed, seconds}]``; raises ``FidelityError`` naming every attempt and its failures.
    """
    options = options or QuantOptions()
    options.validate()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".quant.", dir=out_path.parent) as tmp:
        prep = _prepare(Path(fp32_path), calibration, Path(tmp), options.split_skip_layernorm)
        for i, (why, opts) in enumerate(_attempt_plan(prep, options), start=1):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"attempt": i, "why": why, "config": opts.describe(),
                                      "options": opts.to_dict()}
            try:
                report = _quantize(prep, out_path, opts)
                figures = measure(out_path)
                failures = check_gates(figures, gates)
            except Exception as e:  # noqa: BLE001 - one failed attempt must not end the guard
                report, figures = None, {}
                failures = [f"{type(e).__name__}: {e}"]
                record["error"] = True
            record.update(figures=figures, failures=failures, passed=not failures,
                          seconds=round(time.perf_counter() - t0, 2))
            if report is not None:
                record["quantized_total"] = report["quantized_total"]
                record["float_weight_nodes"] = report["float_weight_nodes"]
            attempts.append(record)
            log.info("int8 %s attempt %d (%s): %s", Path(fp32_path).name, i, opts.describe(),
                     "passed" if not failures else "; ".join(failures))
            if not failures:
                report["attempts"] = attempts
                report["outlier_inputs"] = _outlier_summary(prep) if prep.stats else []
                report["gates"] = gates
                return report
    for p in out_path.parent.glob(out_path.name + "*"):
        p.unlink()
    error = FidelityError(
        f"int8 quantization of {Path(fp32_path).name}: no configuration reached the fidelity "
        f"gate; nothing written to {out_path}.\n" + attempt_lines(attempts)
        + "\n" + refusal_advice(attempts))
    error.attempts = attempts  # type: ignore[attr-defined]
    raise error


def attempt_lines(attempts: list[dict[str, Any]], indent: str = "  ") -> str:
    """One line per guard attempt: number, configuration, why it was tried, what failed."""
    return "\n".join(f"{indent}attempt {a['attempt']}: {a['config']} ({a['why']}): "
                     + ("passed" if a.get("passed") else "; ".join(a["failures"]))
                     for a in attempts)


def refusal_advice(attempts: list[dict[str, Any]]) -> str:
    """What to do, from what the attempts show: a CPU that saturates full-range weights, a
    configuration error, or towers that int8 cannot represent well enough."""
    cpu = host_cpu()
    advice = []
    if all(a.get("error") for a in attempts):
        advice.append("every attempt failed with an error, not a fidelity figure: see the "
                      "errors above")
    else:
        advice.append("int8 cannot represent this tower within the gate, even with its outlier "
                      "layers kept float: export --precision fp16 (on a GPU) or fp32 instead")
        advice.append("if the images you will embed differ from the built-in generated "
                      "calibration set, calibrating on them (--calibration-images DIR) may help")
    if cpu.int8_saturates and any(not a["options"].get("reduce_range") for a in attempts):
        advice.append(f"this CPU ({cpu.isa}) saturates full-range int8 weights; the portable "
                      "attempts are the ones that count here")
    return "advice: " + "; ".join(advice) + "."
