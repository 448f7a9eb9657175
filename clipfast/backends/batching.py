"""The batch planner: how many rows each tower call gets, and at what shape.

One module decides every batch: the Engine's chunk size (``chunk_size``: the batch size asked
for, capped by the backend's ``max_batch``), the padded row chunks of the GPU backends
(``plan_rows``: chunks of at most the profile's max, each padded to a bucket), and the text plan
on the dynamic-length path (``plan_text_batches``: texts grouped by length). Backends state their
limits (``Backend.max_batch``, ``text_lengths``, a ``BatchProfile``); they do not plan.

Batch profiles and buckets, the shapes a GPU backend builds for and replays: TensorRT engines
are built for an optimization profile (min / opt / max batch) and CUDA graphs are captured for
fixed shapes. A request of any size is split into chunks of at most the profile's max, and each
chunk is padded up to the smallest *bucket* that holds it, so a handful of captured shapes
(powers of two, plus opt and max) serve every batch size with at most 2x padding waste. Pure
logic, no GPU: the CPU tests cover it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipfast.backends.base import Option
from clipfast.errors import ClipfastError, InputError


@dataclass(frozen=True)
class BatchProfile:
    """An optimization profile's batch range: ``min <= opt <= max``, all at least 1."""

    min: int = 1
    opt: int = 64
    max: int = 256

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ClipfastError(f"batch profile: --{name}-batch {value!r} must be an "
                                    "integer of at least 1")
        if not self.min <= self.opt <= self.max:
            raise ClipfastError(f"batch profile: need min <= opt <= max, got min {self.min}, "
                                f"opt {self.opt}, max {self.max}")

    def covers(self, n: int) -> bool:
        return self.min <= n <= self.max

    def buckets(self) -> tuple[int, ...]:
        """Powers of two inside ``[min, max]``, plus ``min``, ``opt`` and ``max`` themselves."""
        sizes = {self.min, self.opt, self.max}
        p = 1
        while p <= self.max:
            if p >= self.min:
                sizes.add(p)
            p *= 2
        return tuple(sorted(sizes))

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def tag(self) -> str:
        """Short form for file names and cache keys: ``b1-64-256``."""
        return f"b{self.min}-{self.opt}-{self.max}"


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``n`` rows; ``n`` above the largest bucket is an error (split
    first with ``chunks``)."""
    if n < 1:
        raise ClipfastError(f"batch of {n} rows: nothing to run")
    for b in buckets:
        if b >= n:
            return b
    raise ClipfastError(f"batch of {n} rows exceeds the largest bucket {buckets[-1]}; split it "
                        "with clipfast.backends.batching.chunks first")


def chunks(n: int, max_batch: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``max_batch`` rows covering ``range(n)``."""
    if max_batch < 1:
        raise ClipfastError(f"max_batch={max_batch}: must be at least 1")
    return [(s, min(s + max_batch, n)) for s in range(0, n, max_batch)]


def as_profile(value: Any, what: str = "batch profile") -> BatchProfile:
    """A BatchProfile from a BatchProfile, a mapping with min / opt / max, or a (min, opt, max)
    sequence; None gives the default (1, 64, 256). ``what`` names the input in errors."""
    if value is None:
        return BatchProfile()
    if isinstance(value, BatchProfile):
        return value
    try:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"min", "opt", "max"})
            if unknown:
                raise InputError(f"{what}={value!r}: unknown keys {unknown}; expected min, opt, "
                                 "max")
            return BatchProfile(**value)
        if isinstance(value, (tuple, list)) and len(value) == 3:
            return BatchProfile(*value)
    except InputError:
        raise
    except (TypeError, ClipfastError) as e:
        raise InputError(f"{what}={value!r}: {e}") from e
    raise InputError(f"{what}={value!r}: expected a BatchProfile, a dict with min, opt and max, "
                     "or a (min, opt, max) tuple")


# The ``profile`` backend option: a BatchProfile, {"min", "opt", "max"} or (min, opt, max); None
# is the default (1, 64, 256).
PROFILE = Option("profile", BatchProfile(), lambda v: as_profile(v, "backend option profile"))


# -- the Engine's chunks ---------------------------------------------------------------------------
def chunk_size(batch_size: int, max_batch: int | None) -> int:
    """Rows per tower call: ``batch_size``, capped by the backend's ``max_batch`` (None: any)."""
    if batch_size < 1:
        raise ClipfastError(f"batch_size={batch_size}: must be at least 1")
    return min(batch_size, max_batch) if max_batch else batch_size


# -- padded row chunks (GPU backends) -------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of a request, run as a batch of ``bucket`` rows (zero padded)."""

    start: int
    stop: int
    bucket: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_rows(n: int, max_batch: int | None, buckets: tuple[int, ...] | None = None
              ) -> list[Chunk]:
    """Chunks covering ``range(n)``: at most ``max_batch`` rows each (None: the largest bucket,
    or all ``n`` without buckets), each run at the smallest bucket holding it, or at its own
    size when ``buckets`` is None (eager runs need no padding)."""
    if n < 0:
        raise InputError(f"batch of {n} rows: a row count cannot be negative")
    if n == 0:
        return []
    limit = max_batch if max_batch is not None else (buckets[-1] if buckets else n)
    if buckets is not None and limit > buckets[-1]:
        raise ClipfastError(f"max_batch {limit} exceeds the largest bucket {buckets[-1]}")
    return [Chunk(s, e, bucket_for(e - s, buckets) if buckets is not None else e - s)
            for s, e in chunks(n, limit)]


# -- texts grouped by length (the dynamic-length text path) ---------------------------------------
# The fixed cost charged per tower call, in token-rows of work: what splitting a sorted batch
# in two must save to be worth it (a call's session overhead, thread wake-ups and the poorer
# efficiency of smaller GEMMs). A set value, not measured per host: 96 is about 1.2 rows of 77
# tokens, so a batch is split only where that saves more than one full-length row of work.
BATCH_OVERHEAD_TOKENS = 96
# Above this many texts the sorted order is simply cut into full batches: neighbours in a long
# sorted list have nearly equal lengths, and the exact partition costs O(texts x batch).
_EXACT_PLAN_LIMIT = 2048


@dataclass(frozen=True)
class TextBatch:
    """Rows ``rows`` (positions in the input) run together, padded to ``length`` tokens."""

    rows: np.ndarray
    length: int


def _padded(length: int, allowed: Sequence[int] | None, context: int) -> int:
    if not allowed:
        return length
    for a in allowed:
        if a >= length:
            return int(a)
    return context


def plan_text_batches(lengths: np.ndarray, max_batch: int, *, context: int,
                      allowed: Sequence[int] | None = None,
                      overhead: int = BATCH_OVERHEAD_TOKENS) -> list[TextBatch]:
    """Batches covering every row once, each of at most ``max_batch`` rows.

    Rows are sorted by length (stably); the sorted list is cut where that minimises
    ``sum(rows x padded length + overhead)`` over the batches (exactly, by dynamic programming,
    up to ``_EXACT_PLAN_LIMIT`` rows; beyond, in full batches). ``allowed``: the lengths the
    backend accepts, ascending (None: any); a batch is padded up to the first one that holds
    its longest row, or to ``context``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: must be >= 1")
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    padded = np.array([_padded(int(min(v, context)), allowed, context)
                       for v in lengths[order]], dtype=np.int64)
    if n > _EXACT_PLAN_LIMIT:
        cuts = list(range(0, n, max_batch)) + [n]
    else:
        # best[j]: least cost of the first j sorted rows; a batch ending at row j-1 is padded to
        # padded[j-1] (the longest of a sorted run is its last).
        best = np.zeros(n + 1, dtype=np.float64)
        start = np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            i = np.arange(max(0, j - max_batch), j)
            cost = best[i] + (j - i) * padded[j - 1] + overhead
            # ties go to the latest start: batches fill in order and the remainder comes last,
            # as plain chunking would cut texts of one length
            k = len(cost) - 1 - int(np.argmin(cost[::-1]))
            best[j], start[j] = cost[k], i[k]
        cuts = [n]
        while cuts[-1] > 0:
            cuts.append(int(start[cuts[-1]]))
        cuts.reverse()
    return [TextBatch(order[a:b], int(padded[b - 1])) for a, b in zip(cuts, cuts[1:])
            if b > a]


__all__ = ["BATCH_OVERHEAD_TOKENS", "PROFILE", "BatchProfile", "Chunk", "TextBatch", "as_profile",
           "bucket_for", "chunk_size", "chunks", "plan_rows", "plan_text_batches"]
