"""ONNX Runtime's quantizers on a prepared tower graph: which weight nodes stay float and why,
``quantize_static`` (QDQ with calibrated activation ranges) or ``quantize_dynamic`` (activation
ranges per batch at run time), and the report of what the int8 graph holds."""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

from clipfast.errors import ExportError
from clipfast.export.onnx_files import PROTOBUF_LIMIT, graph_bytes
from clipfast.export.quant_calibration import (
    PreparedGraph,
    calibrate,
    calibration_method,
    calibration_rows,
)
from clipfast.export.quant_graph import int8_weight_abs_max, quantized_nodes
from clipfast.export.quant_options import WEIGHT_OPS, QuantOptions, format_record
from clipfast.export.smoothquant import smoothed_graph

__all__ = ["excluded_nodes", "quantize_prepared", "run_quantizer"]


def excluded_nodes(prep: PreparedGraph, options: QuantOptions) -> dict[str, str]:
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


def _weight_qtype(options: QuantOptions):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if options.weight_type == "s8" else QuantType.QUInt8


def _quantized_op_types(options: QuantOptions) -> list[str]:
    op_types = [t for t in WEIGHT_OPS if t not in options.exclude_op_types]
    if options.method == "static_qdq":
        # No static QDQ form of the fused Attention op: it stays float in a static graph.
        op_types = [t for t in op_types if t != "Attention"]
    return op_types


def _quantize_dynamic(prep: PreparedGraph, model_path: Path, out_path: Path,
                      options: QuantOptions, op_types: list[str], excluded: dict[str, str],
                      extra: dict[str, Any]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    # The dynamic quantizer first rewrites Gemm as MatMul "<name>_MatMul" + Add.
    names = [*excluded, *(f"{n}_MatMul" for n in excluded if prep.candidates.get(n) == "Gemm")]
    quantize_dynamic(
        model_path, out_path, op_types_to_quantize=op_types,
        per_channel=options.per_channel, reduce_range=options.reduce_range,
        weight_type=_weight_qtype(options), nodes_to_exclude=names,
        use_external_data_format=graph_bytes(model_path) > PROTOBUF_LIMIT, extra_options=extra)


def _quantize_static(prep: PreparedGraph, model_path: Path, out_path: Path,
                     options: QuantOptions, op_types: list[str], excluded: dict[str, str],
                     targets: list[str], extra: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    act = QuantType.QUInt8 if options.activation_type == "u8" else QuantType.QInt8
    extra["ActivationSymmetric"] = options.activation_type == "s8"
    key = (str(model_path), options.calibration, options.percentile, options.activation_type,
           tuple(op_types))
    cache = calibrate(prep, model_path, options, op_types, key)
    if not options.quantize_outputs:
        # Float outputs: ONNX Runtime runs DQ -> MatMul as MatMulIntegerToFloat, with no
        # requantization of a tensor that the next (float) op dequantizes anyway.
        extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
    # nodes_to_quantize: only weight nodes. ONNX Runtime's QDQ MatMul quantizer ignores
    # MatMulConstBOnly and would put Q/DQ pairs around the attention products, and so around the
    # Softmax between them.
    quantize_static(
        model_path, out_path, None, quant_format=QuantFormat.QDQ, nodes_to_quantize=targets,
        op_types_to_quantize=op_types, per_channel=options.per_channel,
        reduce_range=options.reduce_range, activation_type=act,
        weight_type=_weight_qtype(options), nodes_to_exclude=list(excluded),
        use_external_data_format=graph_bytes(model_path) > PROTOBUF_LIMIT, extra_options=extra,
        calibrate_method=calibration_method(options), calibration_cache_path=cache)


def run_quantizer(prep: PreparedGraph, out_path: Path, options: QuantOptions
                  ) -> tuple[dict[str, str], list[str], list[str]]:
    """Quantize into ``out_path``; returns (excluded nodes, op types quantized, smoothed LNs)."""
    model_path, smoothed = prep.path, []
    if options.smoothquant:
        model_path, smoothed = smoothed_graph(prep, options.smoothquant_alpha,
                                              options.calibration_batch)
    excluded = excluded_nodes(prep, options)
    op_types = _quantized_op_types(options)
    targets = [n for n, op in prep.candidates.items() if op in op_types and n not in excluded]
    if not targets:
        # (ONNX Runtime reads an empty nodes_to_quantize as "every node".)
        raise ExportError(f"int8 ({options.describe()}): every weight node of the graph is "
                          "excluded; nothing is left to quantize")
    extra: dict[str, Any] = {
        "WeightSymmetric": options.symmetric_weights,
        # Only matmuls with a constant weight: the attention QK^T and probs@V products (and
        # so the Softmax between them) keep float inputs and outputs.
        "MatMulConstBOnly": True,
    }
    for p in out_path.parent.glob(out_path.name + "*"):
        p.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        if options.method == "dynamic":
            _quantize_dynamic(prep, model_path, out_path, options, op_types, excluded, extra)
        else:
            _quantize_static(prep, model_path, out_path, options, op_types, excluded, targets,
                             extra)
    return excluded, op_types, smoothed


def _calibration_record(prep: PreparedGraph, options: QuantOptions) -> dict[str, Any]:
    static = options.method == "static_qdq"
    return {
        "method": options.calibration if static else None,
        "percentile": options.percentile
        if static and options.calibration == "percentile" else None,
        "rows": calibration_rows(prep.feeds),
        "feeds": len(prep.feeds),
    }


def quantize_prepared(prep: PreparedGraph, out_path: Path, options: QuantOptions
                      ) -> dict[str, Any]:
    """Quantize the prepared graph into ``out_path``; return the report (quantize_tower)."""
    t0 = time.perf_counter()
    excluded, op_types, smoothed = run_quantizer(prep, out_path, options)
    quantized, per_channel, int_ops = quantized_nodes(out_path, prep.candidates)
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
        "calibration": _calibration_record(prep, options),
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
        "bytes": graph_bytes(out_path),
        "seconds": round(time.perf_counter() - t0, 2),
    }
