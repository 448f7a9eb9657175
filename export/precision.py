"""The export's precision steps after fp32: fp16 conversion of both towers, and int8
quantization of both towers with the fidelity guard (which fp32 graph each tower quantizes, in
which int8 format, with which calibration)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfast.artifact.fidelity import l2_normalize
from clipfast.cpu import host_cpu
from clipfast.errors import ExportError, FidelityError
from clipfast.export.measure import (
    TowerFidelity,
    calibration_inputs,
    ort_session,
    run_graph,
    tower_gates,
)

if TYPE_CHECKING:
    from clipfast.export.options import ExportOptions
    from clipfast.export.quant_options import QuantOptions

log = logging.getLogger("clipfast.export")

__all__ = ["INT8_FORMAT_CHOICES", "INT8_METHODS", "convert_towers_fp16", "int8_format",
           "int8_options", "quantize_towers"]

# --int8-method -> (QuantOptions.method, {tower: which fp32 graph it quantizes}). Measured on
# ViT-B-32 (benchmarks/results/int8_cpu_sweep.md, README.md): the image tower in static QDQ is
# faster from the plain graph than from the fused graph (a fused Attention has no static int8
# form, so its Q/K/V projections stay fp32), at equal fidelity. The text tower suffers from int8
# Q/K/V projections: its centred error is higher from the plain graph than from the fused one,
# and the MetaCLIP QuickGELU text tower missed the gate from the plain graph; it is cheap next to
# the image tower, so it keeps the fused graph. Dynamic int8 on the fused graphs is faster still
# at equal fidelity, but is not the default: its embeddings depend on the other images of the
# batch (activation ranges per batch), and TensorRT cannot build it. With --tensorrt (or
# --no-fuse) both graphs are the plain one.
INT8_METHODS = {"static": ("static_qdq", {"image": "plain", "text": "fused"}),
                "dynamic": ("dynamic", {"image": "fused", "text": "fused"})}
# --int8-format choices (export/quant_options.py INT8_FORMATS; "tensorrt" comes with --tensorrt)
INT8_FORMAT_CHOICES = ("portable", "portable-u8", "full-range")


def convert_towers_fp16(fp32_graphs: dict[str, Path], outs: dict[str, Path], io: str,
                        graph: dict[str, dict[str, Any]]) -> None:
    """fp16 conversion of each tower's fp32 graph to ``outs[tower]``; the conversion report goes
    to ``graph[tower]["fp16"]``.

    Each converted graph is first loaded by ONNX Runtime in a child process, with the session
    options the runtime uses for fp16 (all optimizations except
    clipfast.backends.onnxruntime.FP16_DISABLED_OPTIMIZERS: ONNX Runtime 1.32's NCHWc layout
    transformer crashes the process, SIGSEGV, on CoCa ViT-B-32's fused fp16 image tower and on
    ViT-M-16-alt's). A fused graph that still crashes is replaced by the unfused one; a graph
    that crashes either way is refused with the reason, instead of taking the export (and every
    later Engine) down.
    """
    from clipfast.export.fp16 import convert_to_fp16

    for which, path in list(fp32_graphs.items()):
        graph[which]["fp16"] = convert_to_fp16(path, outs[which], io=io)
        crash = _session_crash(outs[which])
        if crash is None:
            continue
        why = f"ONNX Runtime crashed ({crash}) creating a session for the fp16 {which} tower"
        plain = path.with_name(path.name.replace(".fused.onnx", ".fp32.onnx"))
        if plain == path or not plain.is_file():
            raise ExportError(f"{why}. Export --precision fp32 instead.")
        why += "; the unfused graph was converted instead"
        log.warning("export: %s", why)
        fp32_graphs[which] = plain  # later fp16 retries convert the same graph
        graph[which].update(fused=None, fusion=f"dropped for fp16: {why}")
        graph[which]["fp16"] = convert_to_fp16(plain, outs[which], io=io)
        crash = _session_crash(outs[which])
        if crash is not None:
            raise ExportError(f"{why}, which crashed too ({crash}). Export --precision fp32 "
                              "instead.")


def _session_crash(path: Path) -> str | None:
    """Create an ONNX Runtime CPU session for the fp16 graph ``path`` (all optimizations but
    FP16_DISABLED_OPTIMIZERS, as the runtime does) in a child process: None when it loads, else
    how the child died. A graph that crashes ORT would otherwise take the export (and every
    later Engine) down with it."""
    import signal
    import subprocess
    import sys

    from clipfast.backends.onnxruntime import FP16_DISABLED_OPTIMIZERS

    code = ("import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], "
            "providers=['CPUExecutionProvider'], disabled_optimizers=sys.argv[2:] or None)")
    proc = subprocess.run([sys.executable, "-c", code, str(path), *FP16_DISABLED_OPTIMIZERS],
                          capture_output=True, text=True)
    if proc.returncode >= 0:  # 0: loads; > 0: a Python error the export itself reports later
        return None
    try:
        return signal.Signals(-proc.returncode).name
    except ValueError:
        return f"signal {-proc.returncode}"


def int8_format(options: ExportOptions) -> str:
    """The INT8_FORMATS name an export quantizes to: TensorRT takes zero-point-0 s8 only
    (``--tensorrt``); ONNX Runtime gets ``--int8-format``, by default the portable format every
    CPU computes alike."""
    return "tensorrt" if options.tensorrt else options.int8_format


def int8_options(options: ExportOptions) -> QuantOptions:
    """The quantizer options of an export: its int8 format and ``--int8-method``."""
    from clipfast.export.quant_options import QuantOptions

    method, _ = INT8_METHODS[options.int8_method]
    return QuantOptions.for_format(int8_format(options), method=method)


def _guarded_tower(quant, options: ExportOptions, which: str, graphs: dict[str, Path],
                   graph_kind: str, out: Path, calib: list[dict[str, np.ndarray]],
                   measure: Callable[[Path], dict[str, Any]], gates: dict[str, Any],
                   quant_options: QuantOptions) -> tuple[str, dict[str, Any]]:
    """The guard on one tower, from ``graph_kind``'s graph, then from the other fp32 graph when
    it is a different file: ``(kind of the graph that passed, report)``; FidelityError naming
    every attempt when none passes.

    A static build on the fused graph keeps the Q/K/V projections inside the float Attention op,
    which can rescue a tower whose every plain-graph configuration missed the gate."""
    src_graph = graphs[graph_kind]
    kinds = [graph_kind, *(k for k, g in graphs.items() if g != src_graph)]
    refusals: list[str] = []
    attempts: list[dict[str, Any]] = []
    for kind in kinds:
        try:
            report = quant.guarded_quantize(graphs[kind], out, calib, measure,
                                            tower_gates(gates, which), quant_options)
        except FidelityError as e:
            refusals.append(f"{kind} graph: {e}")
            attempts.extend({**a, "attempt": f"{kind} graph {a['attempt']}"}
                            for a in getattr(e, "attempts", []))
            continue
        if refusals:
            report["graph_fallback"] = (f"{graph_kind} graph refused, {kind} graph passed: "
                                        + refusals[0].splitlines()[0])
            log.warning("export: int8 %s tower built from the %s graph: %s", which, kind,
                        report["graph_fallback"])
        return kind, report
    error = FidelityError(
        f"{options.model} int8: the {which} tower stays below the gate with every quantization "
        f"the guard tried ({host_cpu().describe()}); nothing written to {options.out}.\n"
        + quant.attempt_lines(attempts) + "\n" + quant.refusal_advice(attempts))
    error.attempts = attempts  # type: ignore[attr-defined]
    raise error


def quantize_towers(source, options: ExportOptions, graphs: dict[str, dict[str, Path]],
                    outs: dict[str, Path], gates: dict[str, Any]) -> dict[str, Any]:
    """int8 both towers into ``outs[tower]``; return manifest["quantization"]. ``graphs[tower]``
    holds the "plain" and the "fused" fp32 graph (the same file when fusion was off or refused);
    INT8_METHODS picks which one a method quantizes."""
    try:
        from clipfast.export import quantize as quant
    except ImportError as e:
        raise ExportError(f"--precision int8: the quantizer (clipfast.export.quantize) is not "
                          f"available: {e}") from e
    image_calib, text_calib, described = calibration_inputs(source, options.calibration_images)
    from clipfast.export.verify import images_from_dir

    images = [str(p) for p in images_from_dir(options.images)] if options.images else None
    fidelity = TowerFidelity(source, images)
    _, graph_kinds = INT8_METHODS[options.int8_method]
    quant_options = int8_options(options)
    reports: dict[str, Any] = {"calibration": described, "int8_method": options.int8_method,
                               "int8_format": quant_options.int8_format}
    for which, calib, measure in (("image", image_calib, fidelity.image),
                                  ("text", text_calib, fidelity.text)):
        kind = graph_kinds[which]
        if options.gate:
            kind, report = _guarded_tower(quant, options, which, graphs[which], kind,
                                          outs[which], calib, measure, gates, quant_options)
        else:  # --no-gate: first configuration, measured later like any other
            report = quant.quantize_tower(graphs[which][kind], outs[which], calib,
                                          options=quant_options)
        reports[f"{which}_graph"] = kind
        if which == "image":
            fidelity.img = l2_normalize(run_graph(ort_session(outs[which]), fidelity.image_feeds))
        reports[which] = report
    return reports
