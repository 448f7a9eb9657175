"""Batch profiles and buckets: the shapes a GPU backend builds for and replays.

TensorRT engines are built for an optimization profile (min / opt / max batch) and CUDA graphs
are captured for fixed shapes. A request of any size is split into chunks of at most the
profile's max, and each chunk is padded up to the smallest *bucket* that holds it, so a handful
of captured shapes (powers of two, plus opt and max) serve every batch size with at most 2x
padding waste. Pure logic, no GPU: the CPU tests cover it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
