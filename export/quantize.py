"""int8 quantization of an exported tower (ONNX Runtime quantization), with a fidelity guard.

``quantize_tower`` turns one fp32 tower graph into an int8 graph with ONNX Runtime's own tools:
``quant_pre_process`` (shape inference + basic graph optimisation), then either
- ``static_qdq`` (the default): explicit QuantizeLinear/DequantizeLinear pairs (the portable
  form TensorRT and ONNX Runtime both consume), symmetric per-channel int8 weights, activations
  calibrated on the given feeds with percentile / entropy / min-max ranges; or
- ``dynamic`` (faster on CPU, benchmarks/results/int8_cpu_sweep.md): symmetric per-channel int8
  weights, activation ranges computed per batch at run time (MatMulInteger, QAttention on fused
  graphs); no calibration ranges are needed, but the calibration feeds' per-channel statistics
  still drive SmoothQuant and the guard.

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

This module is the public interface; the work is done in
- ``quant_options``: the int8 formats and ``QuantOptions``;
- ``quant_graph``: graph facts (weight nodes, patch embedding, final projection, blocks);
- ``quant_calibration``: calibration feeds and ONNX Runtime's calibrators, activation
  statistics, the prepared graph shared by the quantizer and the guard;
- ``smoothquant``: SmoothQuant folded into the graph;
- ``quant_ort``: ONNX Runtime's quantizers and the report;
- ``quant_guard``: the fidelity guard.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.export.quant_calibration import (
    OUTLIER_RATIO,
    TowerCalibrationReader,
    activation_channel_stats,
    channel_ratio,
    outlier_summary,
    prepare_graph,
)
from clipfast.export.quant_graph import int8_weight_abs_max, split_skip_layernorm
from clipfast.export.quant_guard import attempt_lines, guarded_quantize, refusal_advice
from clipfast.export.quant_options import (
    ACTIVATION_TYPES,
    CALIBRATIONS,
    DEFAULT_EXCLUDED_OP_TYPES,
    INT8_FORMATS,
    METHODS,
    SAFE_WEIGHT_MAX,
    WEIGHT_OPS,
    WEIGHT_TYPES,
    QuantOptions,
    format_record,
)
from clipfast.export.quant_ort import quantize_prepared
from clipfast.export.smoothquant import smooth_layernorm_outliers

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATIONS",
    "DEFAULT_EXCLUDED_OP_TYPES",
    "INT8_FORMATS",
    "METHODS",
    "OUTLIER_RATIO",
    "SAFE_WEIGHT_MAX",
    "WEIGHT_OPS",
    "WEIGHT_TYPES",
    "QuantOptions",
    "TowerCalibrationReader",
    "activation_channel_stats",
    "attempt_lines",
    "channel_ratio",
    "format_record",
    "guarded_quantize",
    "int8_weight_abs_max",
    "prepare_graph",
    "quantize_tower",
    "refusal_advice",
    "smooth_layernorm_outliers",
    "split_skip_layernorm",
]


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
        prep = prepare_graph(Path(fp32_path), calibration, Path(tmp),
                             options.split_skip_layernorm)
        report = quantize_prepared(prep, out_path, options)
        if options.smoothquant or prep.stats is not None:
            report["outlier_inputs"] = outlier_summary(prep)
    return report
