"""The ``clipfast bench`` subcommand: its flags (``add_parser``) and what it does with them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipfast.bench.config import DEFAULT_BACKENDS, DEFAULT_BATCH_SIZES, TOWERS, BenchConfig
from clipfast.bench.machine import machine_line
from clipfast.bench.report import markdown_table, write_results
from clipfast.bench.run import run_bench


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return items

    return parse


def add_parser(sub) -> None:
    """Add the ``bench`` subcommand to ``sub`` (the CLI's subparsers)."""
    b = sub.add_parser(
        "bench", help="measure latency, throughput and memory against torch",
        description="Benchmark artifacts' towers per backend and batch size against the PyTorch "
                    "source model; writes JSON, a markdown table and a PNG plot.")
    b.add_argument("artifact", nargs="+", help="artifact directories (one precision each)")
    b.add_argument("--backends", type=_csv(str), default=DEFAULT_BACKENDS,
                   help="comma-separated (default onnxruntime,tensorrt,torch; unavailable ones "
                        "are skipped with the reason; torch is the eager baseline); also "
                        "openvino, openvino-bf16, auto, auto-bf16 (the host's measured choice)")
    b.add_argument("--batch-sizes", type=_csv(int), default=DEFAULT_BATCH_SIZES,
                   help="comma-separated (default 1,8,32,128)")
    b.add_argument("--towers", type=_csv(str), default=TOWERS, help="image,text (default both)")
    b.add_argument("--images", default=None,
                   help="directory of images: adds end-to-end rows (decode + preprocess + encode; "
                        "tokenize + encode for texts)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls per row (default 2)")
    b.add_argument("--min-iters", type=int, default=5, help="timed calls per row, at least")
    b.add_argument("--max-iters", type=int, default=200, help="timed calls per row, at most")
    b.add_argument("--min-seconds", type=float, default=2.0,
                   help="keep timing a row until this much time has passed (default 2)")
    b.add_argument("--interleave", action="store_true",
                   help="load all backends at once and alternate their calls, so each one is "
                        "timed under the same background load (fair ratios on a busy machine; "
                        "memory figures are then the whole process's)")
    b.add_argument("--no-peak", action="store_true",
                   help="skip measuring the matrix-multiply peak (no utilisation figures)")
    b.add_argument("--peak-size", type=int, default=2048,
                   help="matrix size of the CPU peak measurement (default 2048)")
    b.add_argument("--out", required=True,
                   help="results JSON; .md and .png of the same name are written beside it")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        artifacts=[Path(a) for a in args.artifact], backends=tuple(args.backends),
        batch_sizes=tuple(args.batch_sizes), towers=tuple(args.towers),
        images=Path(args.images) if args.images else None, device=args.device,
        threads=args.threads, warmup=args.warmup, min_iters=args.min_iters,
        max_iters=args.max_iters, min_seconds=args.min_seconds, peak=not args.no_peak,
        peak_size=args.peak_size, progress=not args.quiet, interleave=args.interleave,
    )
    doc = run_bench(config)
    doc["command"] = config.command(args.out)
    files = write_results(doc, args.out)
    print(machine_line(doc["machine"]))
    print(markdown_table(doc["rows"]))
    for note in doc["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"results: {files['json']}, {files['markdown']}"
          + (f", {files['plot']}" if files["plot"] else " (no plot: matplotlib missing)"))
    return 0
