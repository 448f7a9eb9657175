"""The int8 formats an export can choose and the options of one quantization (``QuantOptions``),
with the manifest's record of a format (``format_record``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipfast.errors import ExportError

__all__ = ["ACTIVATION_TYPES", "CALIBRATIONS", "DEFAULT_EXCLUDED_OP_TYPES", "INT8_FORMATS",
           "METHODS", "SAFE_WEIGHT_MAX", "WEIGHT_OPS", "WEIGHT_TYPES", "QuantOptions",
           "format_record"]

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
#   but on VNNI its matrix multiplies run slower than u8 x s8 ones (VNNI's dot product takes
#   u8 x s8 only). The guard's second choice.
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


@dataclass
class QuantOptions:
    """How to quantize one tower (one dataclass, recorded in the manifest via ``to_dict``).

    method: "static_qdq" (explicit Q/DQ graph with activation ranges calibrated ahead of time:
        the default, and what TensorRT consumes) or "dynamic" (int8 weights stored ahead of
        time, activation ranges taken per batch at run time).
        On CPU, dynamic on the fused graph is the fastest, static QDQ from the unfused graph
        next and static QDQ from the fused graph (whose Attention has no static int8 form)
        slowest, at equal fidelity (benchmarks/results/int8_cpu_sweep.md). The price of
        dynamic: an embedding depends slightly on the other images of its batch (static: not
        at all). The export's choice and its reasons: export/precision.py INT8_METHODS.
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
        as Add + LayerNormalization (standard ONNX, which TensorRT also parses). On ONNX
        Runtime's CPU provider the fused kernel is far slower than the pair (the default's
        reason: the "SkipLN" rows of benchmarks/results/int8_cpu_sweep.md); a CPU session
        should also pass ``disabled_optimizers=["SkipLayerNormFusion"]`` or it fuses the pair
        again at load.
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

