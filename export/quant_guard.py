"""The int8 fidelity guard: quantize, measure against the fp32 source, and below the gate retry
progressively safer configurations (portable formats, SmoothQuant, outlier matmuls kept float,
then their whole layers, then the other int8 method, except for TensorRT's s8 format, which has
no dynamic form); the first configuration that passes is kept, with every attempt recorded, or
``FidelityError`` lists each attempt and why it failed."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import check_gates
from clipfast.cpu import host_cpu
from clipfast.errors import FidelityError
from clipfast.export.onnx_files import load_header
from clipfast.export.quant_calibration import (
    PreparedGraph,
    channel_ratio,
    ensure_stats,
    outlier_nodes,
    outlier_summary,
    prepare_graph,
)
from clipfast.export.quant_graph import GraphIndex, layer_of
from clipfast.export.quant_options import QuantOptions
from clipfast.export.quant_ort import quantize_prepared

log = logging.getLogger("clipfast.export")

__all__ = ["attempt_lines", "guarded_quantize", "refusal_advice"]


def _layer_nodes(prep: PreparedGraph, graph: GraphIndex, nodes: list[str]) -> list[str]:
    """Every weight node in the layers holding ``nodes``: same block by name, plus the weight
    matmuls straight after them (MLP fc2 after fc1, out-projection after a fused Attention)."""
    layers = {layer_of(n) for n in nodes} - {None}
    same = [n for n in prep.candidates if layer_of(n) in layers]
    after = [d for n in nodes for d in graph.downstream_weight_nodes(n)]
    return [n for n in dict.fromkeys([*same, *after]) if n not in nodes]


def _config_key(o: QuantOptions) -> tuple:
    d = o.to_dict()
    d["exclude_nodes"] = sorted(d["exclude_nodes"])
    return tuple(sorted((k, str(v)) for k, v in d.items()))


def _mixed_precision_plan(prep: PreparedGraph, options: QuantOptions
                          ) -> Iterator[tuple[str, QuantOptions]]:
    """The outlier matmuls kept float, then also the rest of their layers, then the other int8
    method on top of that."""
    stats = ensure_stats(prep, options.calibration_batch)
    outliers = outlier_nodes(prep, batch=options.calibration_batch)
    for n in outliers:
        ratio = channel_ratio(stats[prep.inputs_of[n]])
        prep.reasons[n] = f"outlier input channels (max/median {ratio:.0f})"
    # Mixed precision starts again from the requested configuration: SmoothQuant inflates the
    # weight ranges of the layers that stay int8, and keeping the outlier layers float is the
    # direct fix.
    keep = tuple(dict.fromkeys([*options.exclude_nodes, *outliers]))
    yield (f"mixed precision: {len(outliers)} matmul(s) whose input has outlier channels "
           "kept float"), options.replace(exclude_nodes=keep)
    layer = _layer_nodes(prep, GraphIndex(load_header(prep.path)), outliers)
    for n in layer:
        prep.reasons.setdefault(n, "in a layer with outlier inputs (MLP fc2 / out-projection)")
    o3 = options.replace(exclude_nodes=tuple(dict.fromkeys([*keep, *layer])))
    n_layers = len({layer_of(n) for n in outliers} - {None})
    yield (f"mixed precision: also the other {len(layer)} matmul(s) (MLP fc2, "
           f"out-projection) of the {n_layers or 'outlier'} layer(s) kept float"), o3
    if options.method == "static_qdq":
        # s8 activations are TensorRT's format: ONNX Runtime's dynamic int8 computes u8
        # activations with its own integer operators, which TensorRT cannot build.
        if options.activation_type != "s8":
            yield ("dynamic int8 (activation ranges per batch instead of calibrated ones)",
                   o3.replace(method="dynamic"))
    else:
        yield ("static int8 (calibrated, percentile-clipped activation ranges instead of "
               "per-batch)", o3.replace(method="static_qdq"))


def _attempt_plan(prep: PreparedGraph, options: QuantOptions
                  ) -> Iterable[tuple[str, QuantOptions]]:
    """The requested configuration, then progressively safer ones, each configuration once
    (lazily: the statistics are computed only once the first attempt has failed)."""
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
    for why, o in _mixed_precision_plan(prep, options):
        if fresh(o):
            yield why, o


def _attempt(prep: PreparedGraph, out_path: Path, number: int, why: str, opts: QuantOptions,
             measure: Callable[[Path], dict[str, Any]], gates: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Quantize and measure one configuration: ``(attempt record, report or None)``."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"attempt": number, "why": why, "config": opts.describe(),
                              "options": opts.to_dict()}
    try:
        report = quantize_prepared(prep, out_path, opts)
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
    return record, report


def guarded_quantize(fp32_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]],
                     measure: Callable[[Path], dict[str, Any]], gates: dict[str, Any],
                     options: QuantOptions | None = None) -> dict[str, Any]:
    """Quantize, measure, and fall back to safer configurations until ``gates`` pass.

    measure(path) returns the fidelity figures of the int8 graph at ``path`` against the fp32
    PyTorch source (keys as in ``clipfast.artifact.fidelity.check_gates``). Returns the report of
    the first
    configuration that passes, with ``attempts``: ``[{attempt, why, config, figures, failures,
    passed, seconds}]``; raises ``FidelityError`` naming every attempt and its failures.
    """
    options = options or QuantOptions()
    options.validate()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".quant.", dir=out_path.parent) as tmp:
        prep = prepare_graph(Path(fp32_path), calibration, Path(tmp),
                             options.split_skip_layernorm)
        for i, (why, opts) in enumerate(_attempt_plan(prep, options), start=1):
            record, report = _attempt(prep, out_path, i, why, opts, measure, gates)
            attempts.append(record)
            log.info("int8 %s attempt %d (%s): %s", Path(fp32_path).name, i, opts.describe(),
                     "passed" if record["passed"] else "; ".join(record["failures"]))
            if record["passed"]:
                report["attempts"] = attempts
                report["outlier_inputs"] = outlier_summary(prep) if prep.stats else []
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
