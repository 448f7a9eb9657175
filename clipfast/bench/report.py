"""Reports of a results document: the JSON file, a markdown page with the table, a latency plot
(matplotlib, optional) and the compact headline table across documents."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipfast.bench.config import BASELINE, MODES, TOWERS
from clipfast.bench.machine import machine_isa, machine_line


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def tower_label(row: dict[str, Any]) -> str:
    """``"image"``, ``"text"``, or ``"text L16"`` for a text row at one length."""
    length = row.get("text_length")
    return row["tower"] if length is None else f"{row['tower']} L{length}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one markdown table (model, backend, precision, tower, mode, batch, latency
    percentiles, items/s, speedup against torch, peak memory, GFLOP/item, utilisation)."""
    head = ["model", "backend", "precision", "tower", "mode", "batch", "p50 ms", "p90 ms",
            "p99 ms", "items/s", "vs torch", "peak RSS MiB", "GFLOP/item", "% of peak"]
    gpu = any(r.get("peak_gpu_mb") is not None for r in rows)
    if gpu:
        head.insert(12, "GPU MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        util = r.get("utilisation")
        cells = [r["model"], r["backend"], r["precision"], tower_label(r),
                 "end-to-end" if r["mode"] == "end_to_end" else "tower", str(r["batch_size"]),
                 _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                 _fmt(r["items_per_s"], 1),
                 f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-",
                 _fmt(r.get("peak_rss_mb"), 0), _fmt(r.get("gflop_per_item"), 2),
                 f"{100 * util:.1f}%" if util is not None else "-"]
        if gpu:
            cells.insert(12, _fmt(r.get("peak_gpu_mb") or r.get("gpu_used_mb"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any]) -> str:
    """A readable page: command, machine (CPU model, ISA level, cores first), peak, FLOPs, the
    table, skipped backends, notes."""
    m = doc["machine"]
    models = ", ".join(sorted({a["model"] for a in doc["artifacts"]}))
    out = [f"# clipfast bench: {models}", "", f"Command: `{doc['command']}`", ""]
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    out.append(f"- {machine_line(m)}"
               + (f" (flags {', '.join(m['cpu_features'])})" if m.get("cpu_features") else "")
               + (f", GPU {m['gpu']}" if m.get("gpu") else "")
               + f"; {doc['settings']['threads']} threads; {versions}")
    la = doc.get("load_average") or {}
    out.append(f"- Load average (1, 5, 15 min): {la.get('start')} at start, {la.get('end')} at "
               "end")
    out.append(f"- Timing: {doc['settings']['warmup']} warm-up call(s), then at least "
               f"{doc['settings']['min_iters']} calls and {doc['settings']['min_seconds']} s; "
               "latency percentiles over calls, items/s at the median call"
               + ("; backends interleaved call by call" if doc["settings"].get("interleave")
                  else ""))
    peak = doc.get("peak")
    if peak:
        meas = ", ".join(f"{k} {v}" for k, v in peak.get("measured", {}).items())
        out.append(f"- Matrix-multiply peak ({peak['device']}, {peak['size']}x{peak['size']}, "
                   f"best of {peak.get('repeats', '?')} calls): "
                   f"fp32 {peak.get('fp32_gflops')} GFLOP/s"
                   + (f", fp16 {peak['fp16_gflops']} GFLOP/s" if peak.get("fp16_gflops") else "")
                   + (f", int8 {peak['int8_gops']} GOP/s" if peak.get("int8_gops") else "")
                   + f" ({meas})")
    for a in doc["artifacts"]:
        fl = ", ".join(f"{t} {v['gflop']} GFLOP" for t, v in a.get("flops", {}).items())
        out.append(f"- {a['model']} ({a['precision']}, {a['path']})"
                   + (" [random weights]" if a.get("random_weights") else "")
                   + (f": {fl} per item" if fl else ""))
    out += ["", markdown_table(doc["rows"]), ""]
    out.append("`vs torch`: throughput over the PyTorch source model in eager mode, same tower, "
               "mode and batch, measured in the same run. `% of peak`: GFLOP/item x items/s over "
               "the measured matrix-multiply peak for the row's precision. `peak RSS`: the "
               "process's resident-set high-water mark during the row (loaded weights and "
               "runtime arenas included). End-to-end image rows: file decode + preprocess + "
               "encode (torch: PIL + the source's own transform + the eager model); text rows: "
               "tokenize + encode.")
    if doc.get("notes"):
        out += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(out) + "\n"


def plot_latency(doc: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Latency (p50, with a p90..p99 band) against batch size per backend, one panel per tower
    and mode, log-log. Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = doc["rows"]
    panels = sorted({(tower_label(r), r["mode"]) for r in rows},
                    key=lambda p: (TOWERS.index(p[0].split()[0]) if p[0].split()[0] in TOWERS
                                   else 9, MODES.index(p[1]) if p[1] in MODES else 9,
                                   int(p[0].split(" L")[1]) if " L" in p[0] else 0))
    multi_model = len({r["model"] for r in rows}) > 1
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (tower, mode) in zip(axes.flat, panels):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if (tower_label(r), r["mode"]) == (tower, mode):
                name = f"{r['backend']} {r['precision']}"
                if multi_model:
                    name = f"{r['model']} {name}"
                series.setdefault(name, []).append(r)
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["batch_size"])
            x = [r["batch_size"] for r in rs]
            line = ax.plot(x, [r["p50_ms"] for r in rs], marker="o", label=name)[0]
            ax.fill_between(x, [r["p90_ms"] for r in rs], [r["p99_ms"] for r in rs],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per call (p50; band p90-p99)")
        ax.set_title(f"{tower} {'end-to-end' if mode == 'end_to_end' else 'tower'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    models = ", ".join(sorted({r["model"] for r in rows}))
    where = doc["settings"]["device"]
    if where == "cpu":
        where += f", {machine_isa(doc.get('machine') or {}) or 'ISA not recorded'}"
    fig.suptitle(f"clipfast bench: {models} ({where})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(doc: dict[str, Any], out: str | os.PathLike) -> dict[str, str | None]:
    """Write ``out`` (JSON), and beside it ``.md`` (the report) and ``.png`` (the plot; skipped
    with a note in the document when matplotlib is missing). Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    written = plot_latency(doc, png)
    if written is None:
        note = ("matplotlib is not installed: the latency plot was not written "
                "(pip install 'clipfast[bench]')")
        if note not in doc["notes"]:
            doc["notes"].append(note)
    files = {"json": str(out), "markdown": str(md), "plot": str(written) if written else None}
    doc["files"] = {k: (Path(v).name if v else None) for k, v in files.items()}
    md.write_text(markdown_report(doc))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    return files


def headline_table(docs: Sequence[dict[str, Any]], batch_sizes: Sequence[int] | None = None,
                   backend: str = "onnxruntime") -> str:
    """Compact table across result documents: per model, tower, mode and batch size the
    eager-torch and ``backend`` throughput, the speedup, ``backend``'s median latency and the
    ISA level of the CPU that measured them (documents may come from different hosts)."""
    lines = [f"| model | tower | mode | batch | torch eager items/s | {backend} items/s | "
             f"speedup | {backend} p50 ms | CPU ISA |", "|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        rows = doc["rows"]
        isa = machine_isa(doc.get("machine") or {}) or "not recorded"
        base = {(r["model"], tower_label(r), r["mode"], r["batch_size"]): r
                for r in rows if r["backend"] == BASELINE}
        for r in rows:
            if r["backend"] != backend or (batch_sizes and r["batch_size"] not in batch_sizes):
                continue
            b = base.get((r["model"], tower_label(r), r["mode"], r["batch_size"]))
            speedup = r.get("speedup_vs_torch")
            mode = "end-to-end" if r["mode"] == "end_to_end" else "tower"
            lines.append(
                f"| {r['model']} ({r['precision']}) | {tower_label(r)} | {mode} | "
                f"{r['batch_size']} "
                f"| {_fmt(b['items_per_s'], 1) if b else '-'} | {_fmt(r['items_per_s'], 1)} | "
                f"{f'{speedup:.2f}x' if speedup else '-'} | {_fmt(r['p50_ms'])} | {isa} |")
    return "\n".join(lines)
