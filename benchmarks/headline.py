"""Print the headline table (torch eager vs onnxruntime, per model, tower, mode and batch size)
of `clipfast bench` result files, each row naming the ISA level (AVX2, AVX-512 VNNI, AMX, ...)
of the CPU it was measured on, from the file's machine info::

    python benchmarks/headline.py benchmarks/results/cpu-*.json [--batch-sizes 1,32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipfast.bench import headline_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by `clipfast bench --out`")
    p.add_argument("--batch-sizes", default=None, help="comma-separated subset to show")
    p.add_argument("--backend", default="onnxruntime", help="the backend compared with torch")
    args = p.parse_args(argv)
    docs = [json.loads(Path(f).read_text()) for f in args.results]
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    print(headline_table(docs, batch_sizes=sizes, backend=args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
