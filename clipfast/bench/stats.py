"""Timing and statistics: per-call latencies of one or several callables (interleaved so that
they share the background load), their percentiles and throughput, and the speedup of every row
against the eager-torch baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from clipfast.bench.config import BASELINE


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Per-call latencies in ms -> p50 / p90 / p99 (linear interpolation between order
    statistics, numpy's default), mean, min, max, std, and throughput at the median."""
    import numpy as np

    if len(times_ms) == 0:
        raise ValueError("summarize: no timings")
    if batch_size < 1:
        raise ValueError(f"summarize: batch_size must be at least 1, got {batch_size}")
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {
        "iterations": int(t.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "std_ms": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        # The median call, not the mean: one slow outlier should not move the headline figure.
        "items_per_s": batch_size * 1000.0 / float(p50) if p50 > 0 else math.inf,
        "ms_per_item": float(p50) / batch_size,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    min_iters: int = 5,
    max_iters: int = 200,
    min_seconds: float = 2.0,
    sync: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float] | Exception]:
    """Time several callables in rounds, one call of each per round (the order rotating), so
    that all of them see the same background load: on a shared machine the ratios stay fair
    even when absolute times drift. Each gets ``warmup`` untimed calls first; rounds go on
    until every callable has ``min_iters`` calls and ``min_seconds`` have passed, or
    ``max_iters`` rounds. ``sync`` runs after every call, inside the timed region. Returns ms
    per call for each name, or the exception a callable raised (it leaves the rotation)."""
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got {min_iters} and {max_iters}")
    out: dict[str, list[float] | Exception] = {}
    live: list[str] = []
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 0)):
                fn()
            if sync is not None:
                sync()
        except Exception as e:  # reported per callable; the others go on
            out[name] = e
            continue
        out[name] = []
        live.append(name)
    start = clock()
    rounds = 0
    while live and rounds < max_iters:
        shift = rounds % len(live)
        for name in live[shift:] + live[:shift]:
            t0 = clock()
            try:
                fns[name]()
                if sync is not None:
                    sync()
            except Exception as e:  # e.g. out of memory at a large batch
                out[name] = e
                continue
            out[name].append((clock() - t0) * 1000.0)
        live = [n for n in live if not isinstance(out[n], Exception)]
        rounds += 1
        if rounds >= min_iters and clock() - start >= min_seconds:
            break
    return out


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    min_iters: int = 5,
    max_iters: int = 200,
    min_seconds: float = 2.0,
    sync: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time calls (ms each) until at least
    ``min_iters`` calls and ``min_seconds`` have passed, or ``max_iters`` calls. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after every call, inside the timed region, so queued GPU
    work is counted where it belongs. Exceptions from ``fn`` propagate."""
    got = time_interleaved({"fn": fn}, warmup=warmup, min_iters=min_iters, max_iters=max_iters,
                           min_seconds=min_seconds, sync=sync, clock=clock)["fn"]
    if isinstance(got, Exception):
        raise got
    return got


def add_speedups(rows: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Set ``speedup_vs_torch`` on every row: its items/s over the baseline backend's items/s
    for the same model, tower, mode and batch size (None where the baseline was not
    measured). The baseline's own rows get 1.0. Rows with a ``group`` (timed interleaved)
    compare only within their group."""
    def key(r: dict[str, Any]) -> tuple:
        # "group": rows timed together (--interleave) compare only with each other.
        return (r["model"], r["tower"], r["mode"], r["batch_size"], r.get("text_length"),
                r.get("group"))

    base = {key(r): r["items_per_s"] for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get(key(r))
        r["speedup_vs_torch"] = (round(r["items_per_s"] / b, 3) if b and b > 0
                                 and math.isfinite(r["items_per_s"]) else None)


def round_sig(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits (FLOPs of tiny and huge towers alike)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))

