"""What one bench run measures: the constants of the results document and ``BenchConfig``,
which the CLI fills from its flags and ``run_bench`` takes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipfast.errors import ClipfastError

SCHEMA = "clipfast-bench"
SCHEMA_VERSION = 1
DEFAULT_BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
TOWERS = ("image", "text")
# Text tower rows run texts of exactly these many tokens (capped at the context length): on the
# dynamic sequence path the cost follows the length, padded to the context it does not.
TEXT_LENGTHS = (8, 16, 32, 77)
MODES = ("tower", "end_to_end")
BASELINE = "torch"
# Above this 1-minute load average other jobs share the cores and timings are not clean.
BUSY_LOAD = 1.5


@dataclass
class BenchConfig:
    """Everything one bench run needs; the CLI fills it from its flags."""

    artifacts: list[Path]
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    towers: tuple[str, ...] = TOWERS
    images: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 200
    min_seconds: float = 2.0
    peak: bool = True
    peak_size: int = 2048
    flops: bool = True
    progress: bool = True
    interleave: bool = False

    def validate(self) -> None:
        if not self.artifacts:
            raise ClipfastError("bench: give at least one artifact directory")
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise ClipfastError(f"--towers {','.join(self.towers)}: expected a comma-separated "
                                f"subset of {','.join(TOWERS)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ClipfastError(f"--batch-sizes {self.batch_sizes}: expected positive integers")
        if not self.backends:
            raise ClipfastError("--backends: name at least one backend")
        if self.device not in ("cpu", "cuda"):
            raise ClipfastError(f"--device {self.device!r}: expected 'cpu' or 'cuda'")
        if self.images is not None and not Path(self.images).is_dir():
            raise ClipfastError(f"--images {str(self.images)!r} is not a directory")
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ClipfastError(f"need 1 <= --min-iters <= --max-iters, got {self.min_iters} "
                                f"and {self.max_iters}")

    def command(self, out: str | os.PathLike | None = None) -> str:
        """The canonical command line that reproduces this run."""
        parts = ["clipfast", "bench", *[str(a) for a in self.artifacts],
                 "--backends", ",".join(self.backends),
                 "--batch-sizes", ",".join(str(b) for b in self.batch_sizes),
                 "--towers", ",".join(self.towers), "--device", self.device]
        if self.images is not None:
            parts += ["--images", str(self.images)]
        if self.threads:
            parts += ["--threads", str(self.threads)]
        defaults = BenchConfig(artifacts=[])
        for name in ("warmup", "min_iters", "max_iters", "min_seconds"):
            if getattr(self, name) != getattr(defaults, name):
                parts += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        if self.interleave:
            parts.append("--interleave")
        if not self.peak:
            parts.append("--no-peak")
        if out is not None:
            parts += ["--out", str(out)]
        return " ".join(parts)
