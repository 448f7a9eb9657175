"""The options of an export (``clipfast export``'s flags) and their validation, done once,
before any work: a bad combination fails in a second, naming the flag, not after a minute of
export."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from clipfast.backends.batching import BatchProfile
from clipfast.errors import ExportError
from clipfast.export.fp16 import IO_DTYPES
from clipfast.export.precision import INT8_FORMAT_CHOICES, INT8_METHODS

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportOptions:
    """Everything an export needs; the CLI fills it from its flags.

    precision: "fp32", "fp16" or "int8". io: dtype of the image input and the embedding outputs,
    "fp32" (default) or "fp16" (``--precision fp16`` only). calibration_images: directory of
    images to calibrate int8 activations on (default: a built-in varied set). fuse: rewrite
    attention and run ONNX Runtime's transformer fusions (default on). int8_method: "static"
    (default: QDQ graphs with calibrated activation ranges; the image tower from the plain
    graph, the text tower from the fused one) or "dynamic" (int8 weights, activation ranges per
    batch, from the fused graphs); see INT8_METHODS for why. int8_format: "portable" (default:
    7-bit weights, the same integers on every CPU), "portable-u8" (8-bit u8 weights, also
    exact everywhere, slower on VNNI) or "full-range" (8-bit s8 weights, exact only on CPUs with
    VNNI / AMX / aarch64; others run it as float Q/DQ); --tensorrt implies TensorRT's symmetric
    int8 (export/quant_options.py INT8_FORMATS). tensorrt: also build a TensorRT
    engine per tower on this machine's GPU into ``<out>/tensorrt/`` for the batch range
    ``batch_profile`` (default min 1, opt 64, max 256); implies plain ONNX graphs (no fusion:
    TensorRT's parser reads standard ONNX operators only).
    """

    model: str
    out: Path
    pretrained: str | None = None
    precision: str = "fp32"
    io: str = "fp32"
    opset: int = 17
    seed: int = 0
    images: Path | None = None
    calibration_images: Path | None = None
    fuse: bool = True
    int8_method: str = "static"
    int8_format: str = "portable"
    overwrite: bool = False
    gate: bool = True
    progress: bool = True
    tensorrt: bool = False
    batch_profile: BatchProfile | None = None

    @property
    def fusion_off_reason(self) -> str | None:
        """Why ONNX Runtime's fusions do not run (the graph record says it), or None when they
        do: --no-fuse, or --tensorrt, whose parser rejects the com.microsoft operators they
        produce."""
        if self.tensorrt:
            from clipfast.backends.tensorrt.graph_ops import FUSION_OFF_NOTE

            return FUSION_OFF_NOTE
        return None if self.fuse else "off (--no-fuse)"

    @property
    def fuse_graphs(self) -> bool:
        """Whether ONNX Runtime's fusions run."""
        return self.fusion_off_reason is None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.precision == "int8" and importlib.util.find_spec(
                "clipfast.export.quantize") is None:
            raise ExportError("--precision int8 is not available: the quantizer "
                              "(clipfast.export.quantize) is not installed with this clipfast")
        if self.io not in IO_DTYPES:
            raise ExportError(f"--io {self.io!r}: expected one of {IO_DTYPES}")
        if self.io == "fp16" and self.precision != "fp16":
            raise ExportError(f"--io fp16 needs --precision fp16 (got --precision "
                              f"{self.precision}): fp32 and int8 graphs take float32 pixels")
        if self.int8_method not in INT8_METHODS:
            raise ExportError(f"--int8-method {self.int8_method!r}: expected one of "
                              f"{tuple(INT8_METHODS)}")
        if self.int8_method != "static" and self.precision != "int8":
            raise ExportError(f"--int8-method {self.int8_method} only applies to --precision int8")
        if self.int8_format not in INT8_FORMAT_CHOICES:
            raise ExportError(f"--int8-format {self.int8_format!r}: expected one of "
                              f"{INT8_FORMAT_CHOICES}")
        if self.int8_format != "portable" and (self.precision != "int8" or self.tensorrt):
            raise ExportError(f"--int8-format {self.int8_format} applies to --precision int8 "
                              "without --tensorrt (TensorRT takes its own symmetric int8)")
        if self.calibration_images is not None:
            if self.precision != "int8":
                raise ExportError("--calibration-images only applies to --precision int8")
            if not Path(self.calibration_images).is_dir():
                raise ExportError(f"--calibration-images {str(self.calibration_images)!r}: not a "
                                  "directory")
        if self.opset < 17:
            raise ExportError(f"--opset {self.opset}: 17 or newer is required "
                              "(LayerNormalization)")
        if self.batch_profile is not None:
            if not self.tensorrt:
                raise ExportError("a batch profile (--min-batch/--opt-batch/--max-batch) only "
                                  "applies with --tensorrt")
            if not isinstance(self.batch_profile, BatchProfile):
                raise ExportError("batch_profile: expected a "
                                  "clipfast.backends.batching.BatchProfile, "
                                  f"got {type(self.batch_profile).__name__}")
        if self.tensorrt:
            if self.precision == "int8" and self.int8_method != "static":
                raise ExportError(f"--tensorrt needs --int8-method static (QDQ graphs): "
                                  f"{self.int8_method} int8 uses ONNX Runtime operators "
                                  "TensorRT cannot parse")
            # before a minute of export: a machine without TensorRT or a GPU fails here
            from clipfast.backends.tensorrt.build import unavailable_reason

            reason = unavailable_reason()
            if reason:
                raise ExportError(f"--tensorrt cannot build engines on this machine: {reason}. "
                                  "Export without --tensorrt (add --no-fuse for plain graphs) "
                                  "and run `clipfast build-engines ARTIFACT` on the GPU host")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise ExportError(f"--out {str(out)!r} exists and is not empty; pass --overwrite "
                              "to replace it")
