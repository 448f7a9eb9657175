"""int8 on CPU: which quantization of the image tower is fastest at the int8 fidelity gate?

    python benchmarks/int8_cpu_sweep.py                       # ViT-B-32, ~15 minutes on 2 cores
    python benchmarks/int8_cpu_sweep.py --rounds 3 --quick    # fewer variants, for a smoke run

Builds one open_clip tower with random weights (seed 0; no download), exports it twice (the plain
TorchScript graph, and the fused graph of export/fusion.py: one Attention per block), quantizes it
with export/quantize.py in every configuration below, measures each graph's fidelity against the
fp32 PyTorch source with the export's own measure (pipeline.TowerFidelity: 24 generated images,
24 captions), then times every graph and open_clip's eager PyTorch tower in the same run.

Timing: the runners (eager PyTorch included) take turns, one batch each per round, for
``--rounds`` rounds, each warmed up right before its turn, so that load from other processes hits
all of them alike; reported are the median images/s (and the best, the least disturbed batch)
and the 90th-percentile batch latency, at batch 32 and batch 1 (``--b1-calls`` calls per
round). The 1-minute load average before and after is recorded: on a shared machine the absolute
figures move with other processes' load, and even the ratios to eager shift (eager PyTorch's
two-thread parallel regions suffer most from a busy second core).

Variants: graph (plain / fused), method (static QDQ / QOperator / dynamic), activation type
(u8 / s8), per-channel or per-tensor weights, reduce_range, quantized matmul outputs,
SmoothQuant, the patch-embedding Conv in int8, the SkipLayerNormalization split and the matching
ONNX Runtime session setting (``disabled_optimizers=["SkipLayerNormFusion"]``), and 1 vs 2 threads.

Results: benchmarks/results/int8_cpu_sweep.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SKIPLN = ["SkipLayerNormFusion"]
_POOL = None


@dataclass
class Variant:
    """One graph to build and time. ``options`` None: the fp32 graph itself."""

    name: str
    graph: str  # "plain" | "fused"
    options: dict[str, Any] | None = None
    qoperator: bool = False  # sweep-only: ONNX Runtime's QOperator format, for comparison
    disabled_optimizers: list[str] = field(default_factory=lambda: list(SKIPLN))
    threads: int | None = None  # None: --threads
    config: dict[str, str] = field(default_factory=dict)  # ORT session config entries
    split_batch: bool = False  # two 1-thread runs of half the batch at once (bulk embedding)
    note: str = ""


def variants(quick: bool) -> list[Variant]:
    st, dy = {"method": "static_qdq"}, {"method": "dynamic"}
    v = [
        Variant("ort fp32, plain graph", "plain", disabled_optimizers=[]),
        Variant("ort fp32, fused graph", "fused", disabled_optimizers=[]),
        Variant("ort fp32, fused, SkipLN split", "fused", {"split_only": True}),
        Variant("static QDQ u8, plain graph", "plain", st),
        Variant("static QDQ u8, fused", "fused", st, note="fused Attention stays fp32"),
        Variant("dynamic, plain graph", "plain", dy),
        Variant("dynamic, fused", "fused", dy),
        Variant("dynamic, fused, SkipLN fused (ORT default)", "fused",
                {**dy, "split_skip_layernorm": False}, disabled_optimizers=[]),
        Variant("dynamic, fused, 1 thread", "fused", dy, threads=1),
        Variant("dynamic, fused, no spinning", "fused", dy,
                config={"session.intra_op.allow_spinning": "0"}),
        Variant("dynamic, fused, 2 x 1-thread half batches", "fused", dy, threads=1,
                split_batch=True,
                note="one session, two concurrent run() calls on half the batch each"),
    ]
    if quick:
        return v
    return v + [
        Variant("static QDQ s8 (symmetric act.), fused", "fused", {**st, "activation_type": "s8"}),
        Variant("static QDQ u8 per-tensor weights, fused", "fused", {**st, "per_channel": False}),
        Variant("static QDQ u8 reduce_range, fused", "fused", {**st, "reduce_range": True}),
        Variant("static QDQ u8 quantized outputs, fused", "fused",
                {**st, "quantize_outputs": True}),
        Variant("static QDQ u8 minmax calibration, fused", "fused",
                {**st, "calibration": "minmax"}),
        Variant("static QDQ u8 + SmoothQuant, fused", "fused", {**st, "smoothquant": True}),
        Variant("static QOperator u8, fused", "fused", st, qoperator=True),
        Variant("dynamic per-tensor weights, fused", "fused", {**dy, "per_channel": False}),
        Variant("dynamic reduce_range, fused", "fused", {**dy, "reduce_range": True}),
        Variant("dynamic + SmoothQuant, fused", "fused", {**dy, "smoothquant": True}),
        Variant("dynamic + int8 patch Conv, fused", "fused",
                {**dy, "keep_patch_embedding_float": False},
                note="patch embedding in int8 (float by default)"),
    ]


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu() -> dict[str, Any]:
    """The host CPU's model, ISA level and flags (int8 speed and fidelity depend on them)."""
    from clipfast.cpu import host_cpu

    host = host_cpu()
    return {"cpu": host.model, "arch": host.machine, "isa": host.isa,
            "cpu_features": list(host.flags), "int8_saturates": host.int8_saturates}


def _cpu_line(machine: dict[str, Any]) -> str:
    """The report's CPU line, e.g. ``CPU: Intel Xeon, AVX-512 VNNI, 2 logical CPUs`` (results
    written before the ISA was recorded say "ISA not recorded")."""
    from clipfast.bench import machine_isa

    line = (f"CPU: {machine['cpu']}, {machine_isa(machine) or 'ISA not recorded'}, "
            f"{machine['logical_cpus']} logical CPUs")
    if "int8_saturates" in machine:
        line += (" (u8 x s8 int8 products can saturate in int16 here)"
                 if machine["int8_saturates"] else " (int8 products accumulate in int32)")
    return line


def build_graphs(source, work: Path) -> dict[str, Path]:
    """The plain and the fused fp32 image tower graphs (what the export produces)."""
    from clipfast.export.fusion import attention_spec, optimize
    from clipfast.export.onnx_export import export_image_tower

    plain = work / "image.plain.onnx"
    export_image_tower(source, plain, fusable=False)
    raw = work / "image.raw.onnx"
    note = export_image_tower(source, raw, fusable=True)
    spec, reason = attention_spec(source.image_tower, "image")
    if spec is None or note:
        raise SystemExit(f"image tower is not fusable: {note or reason}")
    fused = work / "image.fused.onnx"
    counts = optimize(raw, fused, spec.model_type, spec.num_heads, spec.hidden_size)
    if counts["Attention"] != spec.layers:
        raise SystemExit(f"fusion gave {counts['Attention']} Attention nodes for {spec.layers} "
                         "layers")
    return {"plain": plain, "fused": fused}


def _qoperator(fp32: Path, out: Path, calibration: list[dict[str, np.ndarray]]) -> dict:
    """ONNX Runtime's QOperator format (QLinearMatMul etc.), same exclusions as the QDQ graph."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from clipfast.export.quantize import prepare_graph

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prep = prepare_graph(fp32, calibration, Path(tmp))
        keep = set(prep.patch_embedding) | set(prep.final_projection)
        targets = [n for n, op in prep.candidates.items() if op in ("MatMul", "Gemm")
                   and n not in keep]
        batches = [b for f in calibration for b in
                   ({"pixel_values": f["pixel_values"][i:i + 8]}
                    for i in range(0, len(f["pixel_values"]), 8))]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                return next(self.it, None)

        quantize_static(prep.path, out, Reader(), quant_format=QuantFormat.QOperator,
                        nodes_to_quantize=targets, op_types_to_quantize=["MatMul", "Gemm"],
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"WeightSymmetric": True, "CalibPercentile": 99.99,
                                       "MatMulConstBOnly": True})
    g = onnx.load(str(out), load_external_data=False)
    return {"method": "static_qoperator", "quantized_total": sum(
        n.op_type == "QLinearMatMul" for n in g.graph.node), "bytes": out.stat().st_size}


def build_variant(v: Variant, graphs: dict[str, Path], work: Path, index: int,
                  calibration: list[dict[str, np.ndarray]]) -> tuple[Path, dict[str, Any]]:
    import onnx

    from clipfast.export.quantize import QuantOptions, quantize_tower, split_skip_layernorm

    fp32 = graphs[v.graph]
    if v.options is None:
        return fp32, {"method": "fp32", "bytes": fp32.stat().st_size}
    out = work / f"variant{index:02d}.onnx"
    t0 = time.perf_counter()
    if v.options.get("split_only"):
        model = onnx.load(str(fp32))
        n = split_skip_layernorm(model)
        onnx.save(model, str(out))
        report = {"method": "fp32", "skip_layernorm_split": n, "bytes": out.stat().st_size}
    elif v.qoperator:
        report = _qoperator(fp32, out, calibration)
    else:
        report = quantize_tower(fp32, out, calibration, options=QuantOptions(**v.options))
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    return out, report


def _session(path: Path, threads: int, disabled: list[str], config: dict[str, str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, val in config.items():
        so.add_session_config_entry(k, val)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def batch_dependence(path: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Max centred difference between each image's embedding computed alone (batch 1) and in
    one batch with all the others: 0 up to float rounding for fp32 and static int8; dynamic int8
    takes its activation ranges from the whole batch, so an embedding depends on its neighbours.
    """
    from clipfast.artifact.fidelity import centred_relative_error

    sess = _session(path, 2, list(SKIPLN), {})
    pixels = np.concatenate([f["pixel_values"] for f in feeds])
    together = sess.run(None, {"pixel_values": pixels})[0]
    alone = np.concatenate([sess.run(None, {"pixel_values": pixels[i:i + 1]})[0]
                            for i in range(len(pixels))])
    return float(centred_relative_error(alone, together).max())


def _runner(sess, split_batch: bool) -> Callable[[np.ndarray], Any]:
    if not split_batch:
        return lambda x: sess.run(None, {"pixel_values": x})
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(2)  # ONNX Runtime releases the GIL inside run()
    pool = _POOL

    def run(x: np.ndarray) -> Any:
        if len(x) < 2:
            return sess.run(None, {"pixel_values": x})
        h = len(x) // 2
        parts = [pool.submit(sess.run, None, {"pixel_values": p}) for p in (x[:h], x[h:])]
        return [f.result() for f in parts]

    return run


def time_runners(factories: dict[str, Callable[[], Callable[[np.ndarray], Any]]],
                 batches: dict[int, np.ndarray], rounds: int, b1_calls: int
                 ) -> dict[str, dict[int, dict[str, Any]]]:
    """Round-robin timing: per round, each runner is created (an ONNX Runtime session; the
    eager tower is reused), warmed up at every batch size, then does one batch-32 call and
    ``b1_calls`` batch-1 calls, and is dropped again (one session in memory at a time: twenty
    ViT-B sessions at once do not fit beside other work). Returns
    ``{name: {bs: {img_s, median_ms, p90_ms, n}}}``."""
    import gc

    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in factories}
    for r in range(rounds):
        for name, make in factories.items():
            fn = make()
            for bs, x in batches.items():  # warm-up: first calls allocate, pre-pack weights
                for _ in range(1 if bs > 1 else 3):
                    fn(x)
            for bs, x in batches.items():
                for _ in range(1 if bs > 1 else b1_calls):
                    t = time.perf_counter()
                    fn(x)
                    times[name][bs].append(time.perf_counter() - t)
            del fn
            gc.collect()
        print(f"  round {r + 1}/{rounds} done (load {_loadavg()})", flush=True)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, per in times.items():
        out[name] = {}
        for bs, ts in per.items():
            med = statistics.median(ts)
            out[name][bs] = {"img_s": round(bs / med, 2), "best_img_s": round(bs / min(ts), 2),
                             "median_ms": round(med * 1e3, 2),
                             "p90_ms": round(float(np.percentile(ts, 90)) * 1e3, 2),
                             "n": len(ts)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--b1-calls", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="the main variants only")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the graphs here")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_cpu_sweep")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import onnxruntime
    import torch

    import clipfast
    from clipfast.artifact.fidelity import GATES, check_gates
    from clipfast.export.pipeline import TowerFidelity, calibration_inputs
    from clipfast.export.sources import load_source

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="int8_sweep."))
    work.mkdir(parents=True, exist_ok=True)
    load_before = _loadavg()
    print(f"building {args.model} (random weights) in {work}", flush=True)
    source = load_source(args.model, "none", seed=0)
    graphs = build_graphs(source, work)
    calibration, _, described = calibration_inputs(source)
    fidelity = TowerFidelity(source)
    gates = {k: v for k, v in GATES["int8"].items()
             if k.startswith("image_") or k in ("top1_agreement_min", "retrieval_pairs_min")}

    results: list[dict[str, Any]] = []
    factories: dict[str, Callable[[], Callable[[np.ndarray], Any]]] = {}
    built: dict[str, tuple[Path, dict[str, Any], dict[str, Any]]] = {}
    for i, v in enumerate(variants(args.quick)):
        print(f"[{i + 1}] {v.name}", flush=True)
        key = json.dumps([v.graph, v.options, v.qoperator], sort_keys=True)
        if key not in built:  # session-only variants share their graph
            path, report = build_variant(v, graphs, work, i, calibration)
            figures = fidelity.image(path)
            figures["batch_dependence"] = batch_dependence(path, fidelity.image_feeds)
            built[key] = (path, report, figures)
        path, report, figures = built[key]
        threads = v.threads or args.threads
        factories[v.name] = (lambda p=path, t=threads, v=v: _runner(
            _session(p, t, v.disabled_optimizers, v.config), v.split_batch))
        results.append({
            "name": v.name, "graph": v.graph, "options": v.options, "threads": threads,
            "disabled_optimizers": v.disabled_optimizers, "session_config": v.config,
            "split_batch": v.split_batch, "note": v.note,
            "method": report.get("method"), "quantized_total": report.get("quantized_total"),
            "quantized": report.get("quantized"), "bytes": report.get("bytes"),
            "build_seconds": report.get("build_seconds"), "fidelity": figures,
            "passes_int8_gate": not check_gates(figures, gates),
        })
        shown = {k: round(x, 4) if isinstance(x, float) else x for k, x in figures.items()}
        print(f"    {json.dumps(shown)}", flush=True)

    tower = source.image_tower.eval()

    def eager(x: np.ndarray, t: torch.nn.Module = tower) -> Any:
        with torch.inference_mode():
            return t(torch.from_numpy(x))

    def eager_1thread(x: np.ndarray) -> Any:
        torch.set_num_threads(1)
        try:
            return eager(x)
        finally:
            torch.set_num_threads(args.threads)

    runners = {"open_clip eager fp32": lambda: eager,
               "open_clip eager fp32, 1 thread": lambda: eager_1thread, **factories}
    pixels = np.concatenate([f["pixel_values"] for f in calibration])
    reps = -(-args.batch // len(pixels))
    batches = {args.batch: np.ascontiguousarray(np.tile(pixels, (reps, 1, 1, 1))[:args.batch]),
               1: np.ascontiguousarray(pixels[:1])}
    print(f"timing {len(runners)} runners, {args.rounds} rounds", flush=True)
    timing = time_runners(runners, batches, args.rounds, args.b1_calls)
    load_after = _loadavg()

    base = timing["open_clip eager fp32"]
    best_eager = {bs: max(timing[k][bs]["img_s"] for k in
                          ("open_clip eager fp32", "open_clip eager fp32, 1 thread"))
                  for bs in batches}
    rows = [{"name": "open_clip eager fp32", "method": "eager", "threads": args.threads},
            {"name": "open_clip eager fp32, 1 thread", "method": "eager", "threads": 1},
            *results]
    for row in rows:
        t = timing[row["name"]]
        row["timing"] = {str(bs): t[bs] for bs in batches}
        row["speedup_vs_eager"] = {str(bs): round(t[bs]["img_s"] / base[bs]["img_s"], 2)
                                   for bs in batches}
        row["speedup_vs_best_eager"] = {str(bs): round(t[bs]["img_s"] / best_eager[bs], 2)
                                        for bs in batches}
    int8 = [r for r in results if r["method"] not in ("fp32", None) and r["passes_int8_gate"]
            and r["threads"] == args.threads]
    best = max(int8, key=lambda r: timing[r["name"]][args.batch]["img_s"]) if int8 else None
    data = {
        "model": args.model, "weights": "random (seed 0)", "batch": args.batch,
        "threads": args.threads, "rounds": args.rounds, "b1_calls": args.b1_calls,
        "machine": {**_cpu(), "logical_cpus": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__, "clipfast": clipfast.__version__},
        "load_average_1min": {"before": load_before, "after": load_after},
        "calibration": described, "fidelity_set": {"images": len(fidelity.ref_img),
                                                   "pairs": fidelity.pairs},
        "gates": gates, "best_int8_at_gate": best["name"] if best else None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(data: dict[str, Any]) -> str:
    b = str(data["batch"])
    lines = [
        f"# int8 on CPU: {data['model']} image tower ({data['weights']})",
        "",
        f"{_cpu_line(data['machine'])}, onnxruntime {data['machine']['onnxruntime']}, "
        f"torch {data['machine']['torch']}; "
        f"{data['threads']} threads unless stated; {data['rounds']} interleaved rounds; "
        f"1-min load average {data['load_average_1min']['before']} before, "
        f"{data['load_average_1min']['after']} after (a shared machine: compare ratios).",
        f"Fidelity against fp32 PyTorch on {data['fidelity_set']['images']} images / "
        f"{data['fidelity_set']['pairs']} image-caption pairs; int8 gate: centred error <= "
        f"{data['gates']['image_centred_rel_error_max']}, cosine >= "
        f"{data['gates']['image_cosine_min']}, top-1 agreement >= "
        f"{data['gates']['top1_agreement_min']}. Batch dep.: max centred difference between "
        "an image embedded alone and in a batch of 24 (dynamic int8 takes activation ranges from "
        "the whole batch).",
        "",
        f"| variant | img/s b{b} | x eager b{b} | best img/s b{b} | p90 ms b{b} | img/s b1 | "
        "x eager b1 | centred err | cosine | top-1 | gate | batch dep. | int8 nodes | MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        t, s = r["timing"], r["speedup_vs_eager"]
        f = r.get("fidelity") or {}
        gate = "" if "passes_int8_gate" not in r else ("yes" if r["passes_int8_gate"] else "NO")
        mb = f"{r['bytes'] / 2**20:.0f}" if r.get("bytes") else ""
        fig = (f"{f['image_centred_rel_error']:.4f} | {f['image_cosine']:.5f} | "
               f"{f['top1_agreement']:.3f}") if f else " | | "
        dep = f"{f['batch_dependence']:.4f}" if "batch_dependence" in f else ""
        lines.append(
            f"| {r['name']} | {t[b]['img_s']:.1f} | {s[b]:.2f} | {t[b]['best_img_s']:.1f} | "
            f"{t[b]['p90_ms']:.0f} | "
            f"{t['1']['img_s']:.1f} | {s['1']:.2f} | {fig} | {gate} | {dep} | "
            f"{r.get('quantized_total') or ''} | {mb} |")
    lines += ["", f"Fastest int8 variant at the gate ({data['threads']} threads, batch {b}): "
              f"**{data['best_int8_at_gate']}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
