"""`clipfast bench`: latency, throughput, memory and utilisation of an artifact's towers.

::

    clipfast bench ARTIFACT [ARTIFACT ...] [--backends onnxruntime,tensorrt,torch]
        [--batch-sizes 1,8,32,128] [--towers image,text] [--images DIR] [--device cpu|cuda]
        --out results.json

For every artifact (one precision each: its manifest says which), backend, tower and batch size
one row: latency p50 / p90 / p99 in ms over timed calls after warm-up (CUDA synchronised around
each call), throughput in items/s at the median, the process's peak memory during the row, FLOPs
per item counted from the ONNX graph, the fraction of the machine's measured matrix-multiply peak
that throughput reaches, and the speedup against the PyTorch source model in eager mode
(backend ``torch``), measured in the same run. ``--images DIR`` adds end-to-end rows: decode +
preprocess + encode for images (the number users feel), tokenize + encode for texts. The results
go to ``--out`` as JSON, with a markdown table (``.md``) and a latency-against-batch-size plot
(``.png``, needs matplotlib: ``pip install 'clipfast[bench]'``) written beside it. Both name the
CPU's instruction-set level (``clipfast.cpu``: AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI, AMX,
aarch64): int8 kernels, their speed and even their results differ between levels. Measured
results live in ``benchmarks/results/``.

By default one backend is loaded at a time (clean per-backend memory). ``--interleave`` loads
them together and alternates their calls, so on a shared machine every backend is timed under
the same background load and the speedups stay meaningful.

Modules: ``config`` (constants, ``BenchConfig``), ``stats`` (timing, percentiles, speedups),
``memory`` (peak RSS / GPU memory per row), ``flops`` (FLOPs counted from the ONNX graph),
``peak`` (matrix-multiply peak), ``machine`` (CPU, ISA level, versions), ``workload`` (inputs and
the callable each row times), ``run`` (the run loop), ``report`` (JSON, markdown, plot, headline
table), ``cli`` (the ``clipfast bench`` subcommand).

Importing this package is cheap (standard library only): numpy, onnx, onnxruntime, torch and
matplotlib are imported by the functions that need them. The onnx package is needed only to
count FLOPs; without it a run leaves the FLOP columns empty and says why in its notes.
"""

from __future__ import annotations

from clipfast.bench.cli import add_parser
from clipfast.bench.config import (
    BASELINE,
    BUSY_LOAD,
    DEFAULT_BACKENDS,
    DEFAULT_BATCH_SIZES,
    MODES,
    SCHEMA,
    SCHEMA_VERSION,
    TOWERS,
    BenchConfig,
)
from clipfast.bench.flops import (
    COMPUTE_OPS,
    FlopCount,
    count_flops,
    count_tower_flops,
    node_flops,
    tower_shapes,
)
from clipfast.bench.machine import load_average, machine_info, machine_isa, machine_line
from clipfast.bench.memory import MemoryProbe, current_rss_mb, peak_rss_mb, reset_peak_rss
from clipfast.bench.peak import measure_cpu_peak, measure_gpu_peak, peak_for
from clipfast.bench.report import (
    headline_table,
    markdown_report,
    markdown_table,
    plot_latency,
    write_results,
)
from clipfast.bench.run import run_bench
from clipfast.bench.stats import add_speedups, summarize, time_callable, time_interleaved
from clipfast.bench.workload import model_label

__all__ = [
    "BASELINE", "BUSY_LOAD", "COMPUTE_OPS", "DEFAULT_BACKENDS", "DEFAULT_BATCH_SIZES", "MODES",
    "SCHEMA", "SCHEMA_VERSION", "TOWERS", "BenchConfig", "FlopCount", "MemoryProbe",
    "tower_shapes", "add_parser", "add_speedups", "count_flops", "count_tower_flops",
    "current_rss_mb", "headline_table", "load_average", "machine_info", "machine_isa",
    "machine_line", "markdown_report", "markdown_table", "measure_cpu_peak", "measure_gpu_peak",
    "model_label", "node_flops", "peak_for", "peak_rss_mb", "plot_latency", "reset_peak_rss",
    "run_bench", "summarize", "time_callable", "time_interleaved", "write_results",
]
