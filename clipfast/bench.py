"""`clipfast bench`: latency and throughput of an artifact's towers (placeholder parser)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure latency and throughput")
    b.add_argument("artifact")
    b.set_defaults(fn=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError("clipfast bench is being built")
