"""Small shared names with no dependencies inside clipfast: modules that need them import them
from here, not from each other (the CLI, the bench and the export side all list image files; the
Engine and the GPU preprocessing both report per-item failures as ``Failure``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# File suffixes taken as images when a folder is listed (files with other suffixes are sniffed).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif",
                            ".tif", ".tiff"})


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, with an ``s`` unless ``n`` is 1 ("1 file", "3 files", "0 files")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class Failure:
    """One input that could not be used: its batch position, a short description, the reason."""

    index: int
    item: str
    error: str


@dataclass
class BatchResult:
    """What ``errors="skip"`` returns: the rows that worked and the inputs that did not.

    embeddings: float32 ``(M, D)`` for the M good inputs, in input order.
    indices: int64 ``(M,)`` position of each row in the input batch.
    failures: one Failure per bad input.
    """

    embeddings: np.ndarray
    indices: np.ndarray
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures
